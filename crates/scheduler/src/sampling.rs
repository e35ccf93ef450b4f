//! Choosing a request's next token from its logits, with OpenAI's and vLLM's settings.
//!
//! One step, in order:
//! 1. the logits are processed: repetition penalty, presence and frequency penalties (kept
//!    incrementally, see `logits_processors.rs`), logit bias, then the banned tokens
//!    (min_tokens) set to -inf;
//! 2. logprobs, when asked for, are the log-softmax of these processed logits, before
//!    temperature and truncation (see [`Sampled`]);
//! 3. temperature 0 takes the argmax; otherwise the logits are divided by the temperature and
//!    cut down by min_p, then top_k, then top_p (vLLM's order), and a token is drawn from what
//!    remains, renormalised, with the request's own random generator.
//!
//! Each request owns its [`Sampler`] and so its random stream: with a seed, its tokens depend
//! only on its own logits, never on which other requests share the batch or in what order they
//! are sampled. A random step consumes exactly one draw; a greedy step none. (Across builds,
//! the same seed gives the same tokens as long as `rand`'s `StdRng` algorithm stays the same.)

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::logits_processors::{apply_logit_bias, ban, Penalties};

/// The most top logprobs a request may ask for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// The highest temperature (OpenAI's bound). Above it the distribution is close to uniform
/// and the output noise; refusing it keeps the server's answers to `temperature` as OpenAI's.
pub const MAX_TEMPERATURE: f32 = 2.0;

/// The highest repetition penalty. HF and vLLM take any positive value, but past 2 the
/// penalty no longer steers (the output degenerates), and a bounded factor keeps penalised
/// logits finite: a negative logit multiplied by 1e38 would become -inf and could leave no
/// token to sample in the middle of a stream. (0, 2] keeps every value clients use in practice
/// (1.05 to 1.5) and is the range this server's API always had.
pub const MAX_REPETITION_PENALTY: f32 = 2.0;

/// Temperatures below this are greedy, as in vLLM: dividing by them overflows the scaled
/// logits to infinities and NaN.
const GREEDY_BELOW: f32 = 1e-5;

/// How one request wants its tokens chosen. The defaults change nothing: greedy, no
/// truncation, no penalty, no bias, no logprobs.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Divides the logits; 0 (or below 1e-5) means greedy, and then top_k, top_p, min_p and
    /// the seed do not matter. In [0, [`MAX_TEMPERATURE`]]. Not OpenAI's default of 1: the
    /// server fills in its API's defaults.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`; 1 keeps
    /// all. In (0, 1].
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 keeps all. In [0, 1].
    pub min_p: f32,
    /// OpenAI's: subtracted once from the logit of every token generated so far. In [-2, 2].
    pub presence_penalty: f32,
    /// OpenAI's: subtracted from a token's logit once per time it was generated. In [-2, 2].
    pub frequency_penalty: f32,
    /// HF's and vLLM's: every token of the prompt or the output has a positive logit divided by
    /// it, a negative one multiplied by it; 1 is neutral. In (0, [`MAX_REPETITION_PENALTY`]].
    pub repetition_penalty: f32,
    /// Added to the logits of these token ids. Each bias in [-100, 100] as OpenAI: -100
    /// effectively bans a token, 100 effectively forces it.
    pub logit_bias: HashMap<u32, f32>,
    /// `None`: no logprobs. `Some(n)`: the chosen token's logprob and the `n` (at most
    /// [`MAX_TOP_LOGPROBS`]) most likely tokens' (OpenAI chat's `logprobs: true,
    /// top_logprobs: n`; vLLM's `logprobs: n`).
    pub logprobs: Option<usize>,
    /// Makes the choices reproducible; `None` draws a seed from the OS.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: HashMap::new(),
            logprobs: None,
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Checks every setting against its range and the logit bias ids against a vocabulary of
    /// `vocab_size` tokens (the width of the model's logits), so a request can be refused
    /// before it is scheduled. [`Sampler::new`] runs it too.
    pub fn validate(&self, vocab_size: usize) -> Result<(), SamplingError> {
        if vocab_size == 0 {
            return Err(SamplingError::EmptyVocab);
        }
        if !(0.0..=MAX_TEMPERATURE).contains(&self.temperature) {
            return Err(SamplingError::Temperature(self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SamplingError::TopP(self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(SamplingError::MinP(self.min_p));
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return Err(SamplingError::PresencePenalty(self.presence_penalty));
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return Err(SamplingError::FrequencyPenalty(self.frequency_penalty));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty <= MAX_REPETITION_PENALTY) {
            return Err(SamplingError::RepetitionPenalty(self.repetition_penalty));
        }
        // Sorted so that the first offending id is reported, whatever the map's order.
        let mut bias: Vec<(u32, f32)> = self.logit_bias.iter().map(|(&t, &b)| (t, b)).collect();
        bias.sort_by_key(|&(token, _)| token);
        for (token, bias) in bias {
            if token as usize >= vocab_size {
                return Err(SamplingError::LogitBiasToken { token, vocab_size });
            }
            if !(-100.0..=100.0).contains(&bias) {
                return Err(SamplingError::LogitBias { token, bias });
            }
        }
        if let Some(n) = self.logprobs {
            if n > MAX_TOP_LOGPROBS {
                return Err(SamplingError::TopLogprobs(n));
            }
        }
        Ok(())
    }
}

/// Invalid sampling settings, or logits that cannot be sampled. The messages name the API
/// field so that the server can pass them on as they are.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplingError {
    #[error("temperature must be in [0, {MAX_TEMPERATURE}], got {0}")]
    Temperature(f32),
    #[error("top_p must be in (0, 1], got {0}")]
    TopP(f32),
    #[error("min_p must be in [0, 1], got {0}")]
    MinP(f32),
    #[error("presence_penalty must be in [-2, 2], got {0}")]
    PresencePenalty(f32),
    #[error("frequency_penalty must be in [-2, 2], got {0}")]
    FrequencyPenalty(f32),
    #[error("repetition_penalty must be in (0, {MAX_REPETITION_PENALTY}], got {0}")]
    RepetitionPenalty(f32),
    #[error("logit_bias for token {token} must be in [-100, 100], got {bias}")]
    LogitBias { token: u32, bias: f32 },
    #[error("logit_bias names token {token}, but the vocabulary has {vocab_size} tokens")]
    LogitBiasToken { token: u32, vocab_size: usize },
    #[error("top_logprobs must be at most {MAX_TOP_LOGPROBS}, got {0}")]
    TopLogprobs(usize),
    #[error("the vocabulary is empty")]
    EmptyVocab,
    #[error("expected {expected} logits, one per vocabulary entry, got {got}")]
    LogitsLen { expected: usize, got: usize },
    #[error("token {token} is outside the vocabulary of {vocab_size} tokens")]
    TokenOutOfRange { token: u32, vocab_size: usize },
    #[error("no token can be sampled: every logit is -inf or NaN")]
    NoCandidates,
}

impl SamplingError {
    /// The OpenAI/vLLM request field a settings error is about; `None` for errors of the
    /// logits (the model's, not the client's).
    pub fn param(&self) -> Option<&'static str> {
        Some(match self {
            Self::Temperature(_) => "temperature",
            Self::TopP(_) => "top_p",
            Self::MinP(_) => "min_p",
            Self::PresencePenalty(_) => "presence_penalty",
            Self::FrequencyPenalty(_) => "frequency_penalty",
            Self::RepetitionPenalty(_) => "repetition_penalty",
            Self::LogitBias { .. } | Self::LogitBiasToken { .. } => "logit_bias",
            Self::TopLogprobs(_) => "top_logprobs",
            Self::EmptyVocab
            | Self::LogitsLen { .. }
            | Self::TokenOutOfRange { .. }
            | Self::NoCandidates => return None,
        })
    }
}

/// One chosen token.
///
/// The logprobs are the log-softmax of the logits after penalties, logit bias and banned
/// tokens but before temperature, min_p, top_k and top_p: what the model, as steered by the
/// request, thinks of each token, independent of how adventurously it is sampled. This is
/// vLLM V0's behaviour and vLLM V1's `processed_logprobs` minus the temperature; vLLM V1's
/// default (`raw_logprobs`) would be before the penalties as well. So a greedy step's
/// logprob is not 0, and a banned token's is -inf.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// The chosen token's logprob, when the request asked for logprobs.
    pub logprob: Option<f32>,
    /// The most likely tokens, most likely first (lower id first on ties), as many as asked
    /// for, fewer only when fewer tokens have a finite logprob. May or may not contain `token`.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// A request's sampler: its settings, its penalty counts and its own random stream.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    vocab_size: usize,
    /// `params.logit_bias` as a list, by id: applied in a fixed order, without hashing.
    logit_bias: Vec<(u32, f32)>,
    penalties: Option<Penalties>,
    rng: StdRng,
}

impl Sampler {
    /// A sampler for logits of `vocab_size` entries (the model's vocabulary, which may be
    /// larger than the tokenizer's). Fails on settings out of range, see
    /// [`SamplingParams::validate`].
    pub fn new(params: SamplingParams, vocab_size: usize) -> Result<Self, SamplingError> {
        params.validate(vocab_size)?;
        let mut logit_bias: Vec<(u32, f32)> =
            params.logit_bias.iter().map(|(&t, &b)| (t, b)).collect();
        logit_bias.sort_by_key(|&(token, _)| token);
        let penalties = Penalties::new(
            params.presence_penalty,
            params.frequency_penalty,
            params.repetition_penalty,
            vocab_size,
        );
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Ok(Self {
            params,
            vocab_size,
            logit_bias,
            penalties,
            rng,
        })
    }

    /// Picks the next token from one position's `logits`.
    ///
    /// `prompt` and `generated` are the request's prompt and output tokens so far, for the
    /// penalties; across calls they must only grow by appending (the counts are updated
    /// incrementally). `banned` tokens cannot be chosen: pass
    /// [`crate::StopChecker::banned_tokens`] for min_tokens.
    ///
    /// Cost: one pass of exponentials over the vocabulary (about 0.3 ms for 42k entries on
    /// one core; none when greedy), a copy of the logits when penalties, bias or bans apply,
    /// O(distinct tokens seen) for the penalties, and another pass of exponentials for
    /// logprobs. Nothing sorts the vocabulary. Samplers are `Send`, so an engine may sample
    /// its sequences in parallel.
    pub fn sample(
        &mut self,
        logits: &[f32],
        prompt: &[u32],
        generated: &[u32],
        banned: &[u32],
    ) -> Result<Sampled, SamplingError> {
        if logits.len() != self.vocab_size {
            return Err(SamplingError::LogitsLen {
                expected: self.vocab_size,
                got: logits.len(),
            });
        }
        if let Some(penalties) = &mut self.penalties {
            penalties.update(prompt, generated)?;
        }
        let logits: Cow<[f32]> =
            if self.penalties.is_none() && self.logit_bias.is_empty() && banned.is_empty() {
                Cow::Borrowed(logits)
            } else {
                let mut owned = logits.to_vec();
                if let Some(penalties) = &self.penalties {
                    penalties.apply(&mut owned);
                }
                apply_logit_bias(&mut owned, &self.logit_bias);
                ban(&mut owned, banned)?;
                Cow::Owned(owned)
            };
        let token = if self.params.temperature < GREEDY_BELOW {
            let best = argmax(&logits);
            let top = logits[best as usize];
            if top.is_nan() || top == f32::NEG_INFINITY {
                return Err(SamplingError::NoCandidates);
            }
            best
        } else {
            self.draw(&logits)?
        };
        let (logprob, top_logprobs) = match self.params.logprobs {
            None => (None, Vec::new()),
            Some(n) => {
                let log_z = log_sum_exp(&logits);
                let top = most_likely(&logits, n)
                    .into_iter()
                    .map(|(id, l)| (id, l - log_z))
                    .collect();
                (Some(logits[token as usize] - log_z), top)
            }
        };
        Ok(Sampled {
            token,
            logprob,
            top_logprobs,
        })
    }

    /// Draws from softmax(logits / temperature) restricted by min_p, top_k and top_p.
    ///
    /// The exponentials are computed once into a buffer. The truncations do not sort: min_p is
    /// a threshold, and top_k and top_p only need the least likely token they keep (the
    /// cutoff), found by selection in O(vocabulary). The draw then walks the vocabulary in id
    /// order, so that the seeded result does not depend on how the selection arranged things.
    fn draw(&mut self, logits: &[f32]) -> Result<u32, SamplingError> {
        let max = max_logit(logits);
        if max == f32::NEG_INFINITY {
            return Err(SamplingError::NoCandidates);
        }
        if max == f32::INFINITY {
            // Infinitely more likely than everything else; the first one, as greedy would.
            return Ok(argmax(logits));
        }
        let inv_t = 1.0 / self.params.temperature;
        let min_p = self.params.min_p;
        // Probabilities relative to the most likely token (which gets 1), so that min_p is a
        // plain threshold; 0 for what min_p drops and for -inf and NaN logits.
        let mut weights: Vec<f32> = logits
            .iter()
            .map(|&l| {
                let w = ((l - max) * inv_t).exp();
                if w >= min_p {
                    w
                } else {
                    0.0
                }
            })
            .collect();
        if let Some(cutoff) = rank_cutoff(&weights, self.params.top_k, self.params.top_p) {
            for (id, w) in weights.iter_mut().enumerate() {
                if by_rank(&(id as u32, *w), &cutoff).is_gt() {
                    *w = 0.0;
                }
            }
        }
        let total: f64 = weights.iter().map(|&w| w as f64).sum();
        let target = self.rng.random::<f64>() * total;
        let mut acc = 0.0;
        let mut last = 0;
        for (id, &w) in weights.iter().enumerate() {
            if w > 0.0 {
                acc += w as f64;
                last = id as u32;
                if target < acc {
                    return Ok(last);
                }
            }
        }
        // The same sums in the same order make `acc` reach `total > target`: the loop returns
        // on the last kept token at the latest (the most likely token always is kept).
        Ok(last)
    }
}

/// Most likely first, the lower id first among equals: a total order on `(id, weight)`.
fn by_rank(a: &(u32, f32), b: &(u32, f32)) -> Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// The least likely token that top_k and top_p keep, by [`by_rank`], among the tokens of
/// positive weight (at most 1); `None` when neither cuts. top_k keeps the `top_k` most likely
/// (0: all); top_p then keeps the smallest most-likely set whose weight reaches `top_p` of
/// what top_k left (vLLM's top-p: a token stays when the tokens more likely than it hold less
/// than `top_p`).
fn rank_cutoff(weights: &[f32], top_k: usize, top_p: f32) -> Option<(u32, f32)> {
    if top_k == 0 && top_p >= 1.0 {
        return None;
    }
    let (floor, total) = selection_floor(weights, top_k, top_p);
    let mut candidates: Vec<(u32, f32)> = weights
        .iter()
        .enumerate()
        .filter(|&(_, &w)| w > 0.0 && w >= floor)
        .map(|(id, &w)| (id as u32, w))
        .collect();
    let mut cutoff = None;
    let mut kept_total = total;
    if top_k > 0 && top_k < candidates.len() {
        candidates.select_nth_unstable_by(top_k - 1, by_rank);
        cutoff = Some(candidates[top_k - 1]);
        candidates.truncate(top_k);
        kept_total = candidates.iter().map(|&(_, w)| w as f64).sum();
    }
    if top_p < 1.0 {
        cutoff = Some(nucleus_cutoff(&mut candidates, kept_total * top_p as f64));
    }
    cutoff
}

/// A weight such that the tokens at or above it are enough to decide the cutoffs, and the
/// total weight. Selecting among the whole vocabulary costs several passes over it, while a
/// trained model puts nearly all its probability on a few dozen tokens: so the weights are
/// counted by binary order of magnitude, four octaves per bucket, in one pass, and selection
/// only considers the buckets needed to hold `top_k` tokens or, without top_k, `top_p` of the
/// weight.
fn selection_floor(weights: &[f32], top_k: usize, top_p: f32) -> (f32, f64) {
    const BUCKETS: usize = 32;
    let mut count = [0usize; BUCKETS];
    let mut mass = [0f64; BUCKETS];
    for &w in weights.iter().filter(|&&w| w > 0.0) {
        // w <= 1, so its biased exponent is at most 127: octave o holds [2^-o, 2^(1-o)).
        let octave = 127 - ((w.to_bits() >> 23) & 0xff) as usize;
        let bucket = (octave / 4).min(BUCKETS - 1);
        count[bucket] += 1;
        mass[bucket] += w as f64;
    }
    let total: f64 = mass.iter().sum();
    let (mut tokens, mut weight) = (0, 0.0);
    for bucket in 0..BUCKETS - 1 {
        tokens += count[bucket];
        weight += mass[bucket];
        let enough = if top_k > 0 {
            tokens >= top_k
        } else {
            weight >= total * top_p as f64
        };
        if enough {
            // The smallest weight of the bucket, whose lowest octave is 4 * bucket + 3.
            return (0.5f32.powi(4 * bucket as i32 + 3), total);
        }
    }
    (0.0, total)
}

/// The least likely token of the top-p nucleus of `candidates` (not empty, ranked before any
/// token left out of them): the token at which their running weight, most likely first,
/// reaches `target`. By weighted quickselect: split around the median rank, keep the half
/// where the running weight crosses the target, repeat; O(n) expected, where sorting would
/// be O(n log n) on every step for flat distributions, whose nucleus is most of the
/// vocabulary.
fn nucleus_cutoff(candidates: &mut [(u32, f32)], target: f64) -> (u32, f32) {
    // Invariant: `above` is the weight of the tokens ranked before candidates[lo..hi], less
    // than the target, and the crossing token is in candidates[lo..hi].
    let (mut lo, mut hi, mut above) = (0, candidates.len(), 0.0);
    while hi - lo > 32 {
        let mid = lo + (hi - lo) / 2;
        candidates[lo..hi].select_nth_unstable_by(mid - lo, by_rank);
        let upper: f64 = candidates[lo..=mid].iter().map(|&(_, w)| w as f64).sum();
        if above + upper >= target {
            hi = mid + 1;
        } else {
            above += upper;
            lo = mid + 1;
        }
    }
    let rest = &mut candidates[lo..hi];
    rest.sort_unstable_by(by_rank);
    for &candidate in rest.iter() {
        above += candidate.1 as f64;
        if above >= target {
            return candidate;
        }
    }
    // Rounding left the sum just short of the target: keep everything.
    rest[rest.len() - 1]
}

/// The largest logit, skipping NaN; -inf when there is none.
fn max_logit(logits: &[f32]) -> f32 {
    logits
        .iter()
        .copied()
        .filter(|l| !l.is_nan())
        .fold(f32::NEG_INFINITY, f32::max)
}

/// log Σ exp(logits), skipping NaN; the log-softmax is `logit - log_sum_exp`.
fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = max_logit(logits);
    if max == f32::NEG_INFINITY {
        return max;
    }
    let sum: f64 = logits
        .iter()
        .map(|&l| (l - max).exp() as f64)
        .filter(|e| !e.is_nan())
        .sum();
    max + sum.ln() as f32
}

/// The `n` largest finite logits with their ids, by [`by_rank`]. One pass keeping the best
/// `n` in order: after the first few hundred tokens almost none beats the `n`-th, so this is
/// one comparison per token.
fn most_likely(logits: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
    if n == 0 {
        return top;
    }
    for (id, &l) in logits.iter().enumerate() {
        if l.is_nan() || l == f32::NEG_INFINITY {
            continue;
        }
        let candidate = (id as u32, l);
        if top.len() == n && by_rank(&candidate, &top[n - 1]).is_ge() {
            continue;
        }
        let at = top.partition_point(|t| by_rank(t, &candidate).is_lt());
        top.insert(at, candidate);
        top.truncate(n);
    }
    top
}

/// Index of the largest logit; the lowest index wins ties, as torch's argmax does. NaN is
/// never chosen; 0 when no logit is larger than -inf.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_logit = f32::NEG_INFINITY;
    for (i, &l) in logits.iter().enumerate() {
        if l > best_logit {
            best = i;
            best_logit = l;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    const DRAWS: usize = 20_000;

    fn seeded(params: SamplingParams) -> SamplingParams {
        SamplingParams {
            seed: Some(7),
            ..params
        }
    }

    fn with_temperature(temperature: f32) -> SamplingParams {
        seeded(SamplingParams {
            temperature,
            ..Default::default()
        })
    }

    /// Frequencies of each token over [`DRAWS`] seeded draws from the same logits.
    fn frequencies(params: SamplingParams, logits: &[f32], generated: &[u32]) -> Vec<f64> {
        let mut sampler = Sampler::new(params, logits.len()).unwrap();
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..DRAWS {
            let token = sampler.sample(logits, &[], generated, &[]).unwrap().token;
            counts[token as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / DRAWS as f64).collect()
    }

    /// softmax(logits / t) over the tokens `keep` accepts, renormalised; 0 elsewhere.
    fn expected(logits: &[f32], t: f32, keep: impl Fn(usize) -> bool) -> Vec<f64> {
        let w: Vec<f64> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| {
                if keep(i) {
                    (l as f64 / t as f64).exp()
                } else {
                    0.0
                }
            })
            .collect();
        let z: f64 = w.iter().sum();
        w.iter().map(|w| w / z).collect()
    }

    /// Each frequency within 5 standard errors of its expectation; excluded tokens never drawn.
    fn assert_matches(freq: &[f64], expected: &[f64]) {
        for (i, (&f, &p)) in freq.iter().zip(expected).enumerate() {
            let tolerance = 5.0 * (p * (1.0 - p) / DRAWS as f64).sqrt();
            assert!(
                (f - p).abs() <= tolerance,
                "token {i}: frequency {f} vs expected {p} (±{tolerance})"
            );
        }
    }

    /// Indices sorted most likely first, a reference for the truncations.
    fn ranked(logits: &[f32]) -> Vec<usize> {
        let mut ids: Vec<usize> = (0..logits.len()).collect();
        ids.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        ids
    }

    /// The reference nucleus: the smallest most-likely prefix reaching `top_p` of `probs`.
    fn nucleus(probs: &[f64], top_p: f64) -> Vec<usize> {
        let order = ranked(&probs.iter().map(|&p| p as f32).collect::<Vec<_>>());
        let mut mass = 0.0;
        let mut kept = Vec::new();
        for i in order {
            if mass >= top_p || probs[i] == 0.0 {
                break;
            }
            mass += probs[i];
            kept.push(i);
        }
        kept
    }

    #[test]
    fn greedy_takes_the_first_maximum_whatever_the_truncation() {
        let mut s = Sampler::new(
            SamplingParams {
                top_k: 1,
                top_p: 0.1,
                min_p: 1.0,
                ..Default::default()
            },
            4,
        )
        .unwrap();
        let sampled = s.sample(&[0.1, 3.0, -1.0, 3.0], &[], &[], &[]).unwrap();
        assert_eq!(sampled.token, 1);
        assert_eq!((sampled.logprob, sampled.top_logprobs), (None, vec![]));
        assert_eq!(
            argmax(&[f32::NAN, 1.0, f32::NAN, 2.0]),
            3,
            "NaN is never the max"
        );
    }

    #[test]
    fn temperature_scales_the_softmax() {
        let logits = [0.0f32, 1.0, 2.0, 0.5];
        for t in [0.5, 1.0, 2.0] {
            let freq = frequencies(with_temperature(t), &logits, &[]);
            assert_matches(&freq, &expected(&logits, t, |_| true));
        }
    }

    #[test]
    fn top_k_keeps_the_k_most_likely() {
        let logits = [0.3f32, 2.0, -1.0, 1.5, 0.0, 1.0];
        let params = seeded(SamplingParams {
            temperature: 1.0,
            top_k: 3,
            ..Default::default()
        });
        let freq = frequencies(params, &logits, &[]);
        assert_matches(&freq, &expected(&logits, 1.0, |i| [1, 3, 5].contains(&i)));
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // Probabilities 0.4, 0.3, 0.2, 0.1: top_p 0.65 keeps two, 0.75 three.
        let logits = [0.4f32, 0.3, 0.2, 0.1].map(f32::ln);
        for (top_p, kept) in [(0.65, 2), (0.75, 3)] {
            let params = seeded(SamplingParams {
                temperature: 1.0,
                top_p,
                ..Default::default()
            });
            let freq = frequencies(params, &logits, &[]);
            assert_matches(&freq, &expected(&logits, 1.0, |i| i < kept));
        }
    }

    #[test]
    fn top_p_applies_to_what_top_k_left_renormalised() {
        // top_k 3 leaves 0.4, 0.3, 0.2, renormalised 0.44, 0.33, 0.22: top_p 0.75 keeps two
        // (on the original probabilities it would keep three).
        let logits = [0.4f32, 0.3, 0.2, 0.1].map(f32::ln);
        let params = seeded(SamplingParams {
            temperature: 1.0,
            top_k: 3,
            top_p: 0.75,
            ..Default::default()
        });
        let freq = frequencies(params, &logits, &[]);
        assert_matches(&freq, &expected(&logits, 1.0, |i| i < 2));
    }

    #[test]
    fn min_p_is_relative_to_the_most_likely_after_temperature() {
        // Relative to token 0: e^-1 = 0.37, e^-2 = 0.14, e^-3 = 0.05 at temperature 1; at
        // temperature 2: 0.61, 0.37, 0.22.
        let logits = [2.0f32, 1.0, 0.0, -1.0];
        for (t, kept) in [(1.0, 2), (2.0, 3)] {
            let params = seeded(SamplingParams {
                temperature: t,
                min_p: 0.3,
                ..Default::default()
            });
            let freq = frequencies(params, &logits, &[]);
            assert_matches(&freq, &expected(&logits, t, |i| i < kept));
        }
    }

    /// Vocabularies whose nucleus is hundreds of tokens, so that the quickselect has to
    /// recurse, with min_p and top_k in front of it, with many tied weights, and with a tail
    /// that the selection floor leaves out or (top_k 100 > 30 likely tokens) must not: the
    /// kept set must be exactly the one a full sort gives.
    #[test]
    fn cutoffs_equal_a_full_sort() {
        let spread: Vec<f32> = (0..1500)
            .map(|i| ((i * 7919) % 1500) as f32 * -0.004 + (i % 3) as f32 * 0.01)
            .collect();
        let tied: Vec<f32> = (0..1500).map(|i| (i % 50) as f32 * -0.02).collect();
        // A trained model's shape: a few likely tokens, a long tail many octaves below.
        let peaked: Vec<f32> = (0..3000)
            .map(|i| {
                if i % 100 == 7 {
                    -(i as f32) * 1e-3
                } else {
                    -20.0 - (i % 13) as f32
                }
            })
            .collect();
        let cases = [
            (&spread, 0, 0.9, 0.0),
            (&spread, 800, 0.95, 0.0),
            (&spread, 0, 0.8, 0.01),
            (&spread, 700, 1.0, 0.0),
            (&tied, 0, 0.5, 0.0),
            (&tied, 333, 0.9, 0.0),
            (&peaked, 0, 0.9, 0.0),
            (&peaked, 5, 1.0, 0.0),
            (&peaked, 100, 0.999_999_9, 0.0),
        ];
        for (logits, top_k, top_p, min_p) in cases {
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let weights: Vec<f32> = logits
                .iter()
                .map(|&l| {
                    let w = (l - max).exp();
                    if w >= min_p {
                        w
                    } else {
                        0.0
                    }
                })
                .collect();
            let cutoff = rank_cutoff(&weights, top_k, top_p).unwrap();

            let mut ranked: Vec<(u32, f32)> = weights
                .iter()
                .enumerate()
                .filter(|&(_, &w)| w > 0.0)
                .map(|(i, &w)| (i as u32, w))
                .collect();
            ranked.sort_by(by_rank);
            let got: Vec<u32> = ranked
                .iter()
                .filter(|c| by_rank(c, &cutoff).is_le())
                .map(|&(i, _)| i)
                .collect();

            if top_k > 0 {
                ranked.truncate(top_k);
            }
            let total: f64 = ranked.iter().map(|&(_, w)| w as f64).sum();
            let mut mass = 0.0;
            let mut want = Vec::new();
            for &(i, w) in &ranked {
                if mass >= top_p as f64 {
                    break;
                }
                mass += w as f64 / total;
                want.push(i);
            }
            assert_eq!(got, want, "top_k {top_k} top_p {top_p} min_p {min_p}");
            assert!(!want.is_empty());
        }
    }

    #[test]
    fn sampling_a_wide_nucleus_follows_it() {
        let logits: Vec<f32> = (0..300).map(|i| -(i as f32) * 0.01).collect();
        let params = seeded(SamplingParams {
            temperature: 1.0,
            top_p: 0.9,
            ..Default::default()
        });
        let want = nucleus(&expected(&logits, 1.0, |_| true), 0.9);
        assert!(want.len() > 64);
        let freq = frequencies(params, &logits, &[]);
        assert_matches(&freq, &expected(&logits, 1.0, |i| want.contains(&i)));
    }

    #[test]
    fn presence_and_frequency_penalties_shift_the_distribution() {
        let logits = [1.0f32, 1.0, 1.0, 1.0];
        let params = seeded(SamplingParams {
            temperature: 1.0,
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..Default::default()
        });
        let freq = frequencies(params, &logits, &[0, 0, 1, 0]);
        let penalised = [1.0 - 0.5 - 3.0 * 0.25, 1.0 - 0.5 - 0.25, 1.0, 1.0];
        assert_matches(&freq, &expected(&penalised, 1.0, |_| true));
    }

    #[test]
    fn negative_presence_penalty_encourages_repeats() {
        let logits = [0.0f32; 3];
        let params = seeded(SamplingParams {
            temperature: 1.0,
            presence_penalty: -1.0,
            ..Default::default()
        });
        let freq = frequencies(params, &logits, &[2]);
        assert_matches(&freq, &expected(&[0.0, 0.0, 1.0], 1.0, |_| true));
    }

    #[test]
    fn repetition_penalty_covers_prompt_and_output() {
        let logits = [2.0f32, -1.0, 0.5, 0.5];
        let mut sampler = Sampler::new(
            seeded(SamplingParams {
                temperature: 1.0,
                repetition_penalty: 1.5,
                ..Default::default()
            }),
            4,
        )
        .unwrap();
        let mut counts = [0usize; 4];
        let mut generated = vec![1];
        for _ in 0..DRAWS {
            let token = sampler
                .sample(&logits, &[0], &generated, &[])
                .unwrap()
                .token;
            counts[token as usize] += 1;
            // The output grows, but only with tokens already penalised: the repetition
            // penalty applies once per distinct token, so the distribution stays the same.
            if token <= 1 {
                generated.push(token);
            }
        }
        let freq: Vec<f64> = counts.iter().map(|&c| c as f64 / DRAWS as f64).collect();
        // Token 0 (prompt) is positive, divided; token 1 (output) negative, multiplied.
        let penalised = [2.0 / 1.5, -1.5, 0.5, 0.5];
        assert_matches(&freq, &expected(&penalised, 1.0, |_| true));
    }

    #[test]
    fn logit_bias_is_added() {
        let logits = [0.0f32, 0.0, 0.0];
        let params = seeded(SamplingParams {
            temperature: 1.0,
            logit_bias: HashMap::from([(0, 1.0), (2, -100.0)]),
            ..Default::default()
        });
        let freq = frequencies(params, &logits, &[]);
        assert_eq!(freq[2], 0.0);
        assert_matches(&freq, &expected(&[1.0, 0.0, -100.0], 1.0, |_| true));
    }

    #[test]
    fn banned_tokens_are_never_chosen() {
        let logits = [5.0f32, 0.0, 1.0];
        let mut greedy = Sampler::new(SamplingParams::default(), 3).unwrap();
        assert_eq!(greedy.sample(&logits, &[], &[], &[0]).unwrap().token, 2);
        let mut random = Sampler::new(with_temperature(2.0), 3).unwrap();
        for _ in 0..1000 {
            assert_ne!(random.sample(&logits, &[], &[], &[0, 2]).unwrap().token, 0);
        }
        assert_eq!(
            random.sample(&logits, &[], &[], &[0, 1, 2]).unwrap_err(),
            SamplingError::NoCandidates
        );
        assert_eq!(
            greedy.sample(&logits, &[], &[], &[0, 1, 2]).unwrap_err(),
            SamplingError::NoCandidates
        );
    }

    #[test]
    fn logprobs_are_the_log_softmax_after_penalties_before_temperature() {
        let logits: Vec<f32> = (0..50).map(|i| ((i as f32) * 0.7).sin() * 3.0).collect();
        let prompt = [3, 4, 4];
        let generated = [4, 7, 7, 7];
        let params = seeded(SamplingParams {
            temperature: 0.7,
            top_k: 5,
            top_p: 0.9,
            presence_penalty: 0.3,
            frequency_penalty: 0.2,
            repetition_penalty: 1.3,
            logit_bias: HashMap::from([(10, 2.5), (11, -1.0)]),
            logprobs: Some(6),
            ..Default::default()
        });
        let mut processed: Vec<f64> = logits.iter().map(|&l| l as f64).collect();
        for id in [3, 4, 7] {
            let l = &mut processed[id];
            *l = if *l > 0.0 { *l / 1.3 } else { *l * 1.3 };
        }
        processed[4] -= 0.3 + 0.2;
        processed[7] -= 0.3 + 3.0 * 0.2;
        processed[10] += 2.5;
        processed[11] -= 1.0;
        processed[12] = f64::NEG_INFINITY; // banned
        let log_z = processed.iter().map(|l| l.exp()).sum::<f64>().ln();
        let log_softmax: Vec<f64> = processed.iter().map(|l| l - log_z).collect();

        let mut sampler = Sampler::new(params, logits.len()).unwrap();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let s = sampler.sample(&logits, &prompt, &generated, &[12]).unwrap();
            seen.insert(s.token);
            let lp = s.logprob.unwrap() as f64;
            assert!((lp - log_softmax[s.token as usize]).abs() < 1e-4);
            let want: Vec<usize> =
                ranked(&log_softmax.iter().map(|&l| l as f32).collect::<Vec<_>>())
                    .into_iter()
                    .take(6)
                    .collect();
            let got: Vec<usize> = s.top_logprobs.iter().map(|&(id, _)| id as usize).collect();
            assert_eq!(got, want);
            for &(id, lp) in &s.top_logprobs {
                assert!((lp as f64 - log_softmax[id as usize]).abs() < 1e-4);
            }
        }
        assert!(
            seen.len() > 1,
            "temperature sampling, yet logprobs did not change"
        );

        let mut only_chosen = Sampler::new(
            SamplingParams {
                logprobs: Some(0),
                ..Default::default()
            },
            logits.len(),
        )
        .unwrap();
        let s = only_chosen.sample(&logits, &[], &[], &[]).unwrap();
        assert!(s.logprob.is_some() && s.top_logprobs.is_empty());
    }

    #[test]
    fn top_logprobs_skip_impossible_tokens() {
        let mut s = Sampler::new(
            SamplingParams {
                logprobs: Some(5),
                ..Default::default()
            },
            3,
        )
        .unwrap();
        let out = s.sample(&[0.0, 0.0, 1.0], &[], &[], &[1]).unwrap();
        assert_eq!(out.token, 2);
        let ids: Vec<u32> = out.top_logprobs.iter().map(|&(id, _)| id).collect();
        assert_eq!(ids, [2, 0]);
        let total: f32 = out.top_logprobs.iter().map(|&(_, lp)| lp.exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
    }

    #[test]
    fn a_seed_fixes_the_tokens_whatever_else_is_sampled() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let params = |seed| SamplingParams {
            temperature: 1.0,
            top_p: 0.95,
            seed: Some(seed),
            ..Default::default()
        };
        let alone = {
            let mut s = Sampler::new(params(7), 50).unwrap();
            (0..64)
                .map(|_| s.sample(&logits, &[], &[], &[]).unwrap().token)
                .collect::<Vec<_>>()
        };
        // The same request batched with others, sampled in between them.
        let mut s = Sampler::new(params(7), 50).unwrap();
        let mut others: Vec<Sampler> = (0..3)
            .map(|i| Sampler::new(params(100 + i), 50).unwrap())
            .collect();
        let mut batched = Vec::new();
        for step in 0..64 {
            for other in others.iter_mut().take(step % 4) {
                other.sample(&logits, &[], &[], &[]).unwrap();
            }
            batched.push(s.sample(&logits, &[], &[], &[]).unwrap().token);
        }
        assert_eq!(alone, batched);
        let mut other_seed = Sampler::new(params(8), 50).unwrap();
        let different: Vec<u32> = (0..64)
            .map(|_| other_seed.sample(&logits, &[], &[], &[]).unwrap().token)
            .collect();
        assert_ne!(alone, different);
    }

    #[test]
    fn nan_logits_are_never_drawn() {
        let logits = [f32::NAN, 0.0, f32::NAN, 0.0];
        let freq = frequencies(with_temperature(1.0), &logits, &[]);
        assert_eq!(freq[0] + freq[2], 0.0);
    }

    #[test]
    fn rejects_bad_settings() {
        let check = |params: SamplingParams, error: SamplingError| {
            assert_eq!(Sampler::new(params, 10).unwrap_err(), error);
        };
        let p = SamplingParams::default;
        check(
            SamplingParams {
                temperature: -1.0,
                ..p()
            },
            SamplingError::Temperature(-1.0),
        );
        check(
            SamplingParams {
                temperature: f32::INFINITY,
                ..p()
            },
            SamplingError::Temperature(f32::INFINITY),
        );
        check(
            SamplingParams { top_p: 0.0, ..p() },
            SamplingError::TopP(0.0),
        );
        check(
            SamplingParams { top_p: 1.5, ..p() },
            SamplingError::TopP(1.5),
        );
        check(
            SamplingParams { min_p: -0.1, ..p() },
            SamplingError::MinP(-0.1),
        );
        check(
            SamplingParams { min_p: 1.1, ..p() },
            SamplingError::MinP(1.1),
        );
        check(
            SamplingParams {
                presence_penalty: 2.5,
                ..p()
            },
            SamplingError::PresencePenalty(2.5),
        );
        check(
            SamplingParams {
                frequency_penalty: -2.5,
                ..p()
            },
            SamplingError::FrequencyPenalty(-2.5),
        );
        check(
            SamplingParams {
                temperature: 2.5,
                ..p()
            },
            SamplingError::Temperature(2.5),
        );
        check(
            SamplingParams {
                repetition_penalty: 0.0,
                ..p()
            },
            SamplingError::RepetitionPenalty(0.0),
        );
        check(
            SamplingParams {
                repetition_penalty: 2.5,
                ..p()
            },
            SamplingError::RepetitionPenalty(2.5),
        );
        check(
            SamplingParams {
                repetition_penalty: f32::INFINITY,
                ..p()
            },
            SamplingError::RepetitionPenalty(f32::INFINITY),
        );
        check(
            SamplingParams {
                logit_bias: HashMap::from([(3, 100.5)]),
                ..p()
            },
            SamplingError::LogitBias {
                token: 3,
                bias: 100.5,
            },
        );
        check(
            SamplingParams {
                logit_bias: HashMap::from([(12, 1.0), (10, 1.0)]),
                ..p()
            },
            SamplingError::LogitBiasToken {
                token: 10,
                vocab_size: 10,
            },
        );
        check(
            SamplingParams {
                logprobs: Some(21),
                ..p()
            },
            SamplingError::TopLogprobs(21),
        );
        assert_eq!(Sampler::new(p(), 0).unwrap_err(), SamplingError::EmptyVocab);
        assert_eq!(
            SamplingError::LogitBiasToken {
                token: 10,
                vocab_size: 10
            }
            .to_string(),
            "logit_bias names token 10, but the vocabulary has 10 tokens"
        );

        let mut s = Sampler::new(
            SamplingParams {
                frequency_penalty: 1.0,
                ..p()
            },
            3,
        )
        .unwrap();
        assert_eq!(
            s.sample(&[0.0; 4], &[], &[], &[]).unwrap_err(),
            SamplingError::LogitsLen {
                expected: 3,
                got: 4
            }
        );
        assert_eq!(
            s.sample(&[0.0; 3], &[], &[5], &[]).unwrap_err(),
            SamplingError::TokenOutOfRange {
                token: 5,
                vocab_size: 3
            }
        );
        assert_eq!(
            s.sample(&[0.0; 3], &[], &[], &[3]).unwrap_err(),
            SamplingError::TokenOutOfRange {
                token: 3,
                vocab_size: 3
            }
        );
    }
}
