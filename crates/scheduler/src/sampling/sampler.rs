//! Choosing a request's next token from its logits, with OpenAI's and vLLM's settings.
//!
//! One step, in order:
//! 1. the logits are processed: repetition penalty, presence and frequency penalties (kept
//!    incrementally), logit bias, then the banned tokens (min_tokens) set to -inf: the
//!    request's list of processors, see `logits_processors.rs`; under a grammar, every token it
//!    does not allow is -inf too;
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

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::logits_processors::LogitsProcessors;
use super::params::{SamplingError, SamplingParams};
use super::truncation::{by_rank, rank_cutoff};
use crate::grammar::TokenMask;

/// Temperatures below this are greedy, as in vLLM: dividing by them overflows the scaled
/// logits to infinities and NaN.
const GREEDY_BELOW: f32 = 1e-5;

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

/// A request's sampler: its settings, its logits processors and its own random stream.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    vocab_size: usize,
    processors: LogitsProcessors,
    rng: StdRng,
}

impl Sampler {
    /// A sampler for logits of `vocab_size` entries (the model's vocabulary, which may be
    /// larger than the tokenizer's). Fails on settings out of range, see
    /// [`SamplingParams::validate`].
    pub fn new(params: SamplingParams, vocab_size: usize) -> Result<Self, SamplingError> {
        params.validate(vocab_size)?;
        let processors = LogitsProcessors::new(&params, vocab_size);
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Ok(Self {
            params,
            vocab_size,
            processors,
            rng,
        })
    }

    /// Picks the next token from one position's `logits`.
    ///
    /// `prompt` and `generated` are the request's prompt and output tokens so far, for the
    /// penalties; across calls they must only grow by appending (the counts are updated
    /// incrementally). `banned` tokens cannot be chosen: pass
    /// [`crate::StopChecker::banned_tokens`] for min_tokens. Under a grammar, `allowed` is its
    /// mask: the only tokens that may be chosen, and the logprobs are those of the
    /// distribution it leaves.
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
        allowed: Option<&TokenMask>,
    ) -> Result<Sampled, SamplingError> {
        if logits.len() != self.vocab_size {
            return Err(SamplingError::LogitsLen {
                expected: self.vocab_size,
                got: logits.len(),
            });
        }
        let logits = self
            .processors
            .process(logits, prompt, generated, banned, allowed)?;
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
fn argmax(logits: &[f32]) -> u32 {
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
#[path = "sampler_tests.rs"]
mod tests;
