//! What reshapes one request's logits before a token is drawn: an ordered list of
//! processors (the penalties, then the logit bias), then the grammar's mask of allowed tokens,
//! then the step's banned tokens.
//!
//! Each processor is one variant of [`LogitsProcessor`], kept up to date with the request's
//! tokens and applied in list order. The grammar's mask is computed apart (for all of a step's
//! constrained sequences in parallel, while the forward runs: see `scheduler.rs`) and handed
//! in with the step. A request with no processor, no mask and no ban samples from the model's
//! logits as they are, without a copy.
//!
//! The penalties need how often each token occurred. Recounting the whole prompt and output at
//! every step would cost O(sequence length) per step for every running request, so the counts
//! are kept here and only the tokens appended since the previous step are counted; applying the
//! penalties then touches only the distinct tokens seen, never the whole vocabulary.

use std::borrow::Cow;

use super::params::{SamplingError, SamplingParams};
use crate::grammar::TokenMask;

/// A request's logits processors, in the order they apply.
#[derive(Debug, Clone)]
pub(crate) struct LogitsProcessors {
    list: Vec<LogitsProcessor>,
}

impl LogitsProcessors {
    /// The processors `params` ask for (validated settings): none for a plain request.
    pub(crate) fn new(params: &SamplingParams, vocab_size: usize) -> Self {
        let mut list = Vec::new();
        if let Some(penalties) = Penalties::new(
            params.presence_penalty,
            params.frequency_penalty,
            params.repetition_penalty,
            vocab_size,
        ) {
            list.push(LogitsProcessor::Penalties(penalties));
        }
        // By id: applied in a fixed order, without hashing.
        let mut bias: Vec<(u32, f32)> = params.logit_bias.iter().map(|(&t, &b)| (t, b)).collect();
        bias.sort_by_key(|&(token, _)| token);
        if !bias.is_empty() {
            list.push(LogitsProcessor::LogitBias(bias));
        }
        Self { list }
    }

    /// `logits` as the processors, then the grammar's `allowed` tokens, then `banned` leave
    /// them. `prompt` and `generated` are the request's tokens so far (see
    /// [`Penalties::update`]); every processor is brought up to date before any applies, so an
    /// error leaves the logits untouched.
    pub(crate) fn process<'a>(
        &mut self,
        logits: &'a [f32],
        prompt: &[u32],
        generated: &[u32],
        banned: &[u32],
        allowed: Option<&TokenMask>,
    ) -> Result<Cow<'a, [f32]>, SamplingError> {
        for processor in &mut self.list {
            processor.update(prompt, generated)?;
        }
        if self.list.is_empty() && banned.is_empty() && allowed.is_none() {
            return Ok(Cow::Borrowed(logits));
        }
        let mut owned = logits.to_vec();
        for processor in &self.list {
            processor.apply(&mut owned);
        }
        if let Some(mask) = allowed {
            mask.apply(&mut owned);
        }
        ban(&mut owned, banned)?;
        Ok(Cow::Owned(owned))
    }
}

/// One way a request steers its logits.
#[derive(Debug, Clone)]
enum LogitsProcessor {
    Penalties(Penalties),
    /// `(token, bias)` pairs by id, added to those tokens' logits. The ids were checked
    /// against the vocabulary when the sampler was built.
    LogitBias(Vec<(u32, f32)>),
}

impl LogitsProcessor {
    fn update(&mut self, prompt: &[u32], generated: &[u32]) -> Result<(), SamplingError> {
        match self {
            Self::Penalties(penalties) => penalties.update(prompt, generated),
            Self::LogitBias(_) => Ok(()),
        }
    }

    fn apply(&self, logits: &mut [f32]) {
        match self {
            Self::Penalties(penalties) => penalties.apply(logits),
            Self::LogitBias(bias) => {
                for &(id, b) in bias {
                    logits[id as usize] += b;
                }
            }
        }
    }
}

/// OpenAI's presence and frequency penalties and HF/vLLM's repetition penalty, with the
/// occurrence counts they need.
#[derive(Debug, Clone)]
struct Penalties {
    presence: f32,
    frequency: f32,
    repetition: f32,
    /// How often each token was generated; non-zero exactly for the ids in `generated_ids`.
    counts: Vec<u32>,
    /// The distinct generated ids, in order of first occurrence.
    generated_ids: Vec<u32>,
    /// Whether each token is in the prompt; only kept for the repetition penalty.
    in_prompt: Vec<bool>,
    /// The distinct prompt ids.
    prompt_ids: Vec<u32>,
    /// How much of the prompt and of the output the counts cover.
    counted_prompt: usize,
    counted_generated: usize,
}

impl Penalties {
    /// `None` when every penalty is neutral, so that plain requests pay nothing.
    fn new(presence: f32, frequency: f32, repetition: f32, vocab_size: usize) -> Option<Self> {
        if presence == 0.0 && frequency == 0.0 && repetition == 1.0 {
            return None;
        }
        let prompt_len = if repetition == 1.0 { 0 } else { vocab_size };
        Some(Self {
            presence,
            frequency,
            repetition,
            counts: vec![0; vocab_size],
            generated_ids: Vec::new(),
            in_prompt: vec![false; prompt_len],
            prompt_ids: Vec::new(),
            counted_prompt: 0,
            counted_generated: 0,
        })
    }

    /// Brings the counts up to date with the request's sequences.
    ///
    /// Sequences only grow by appending during a request, so only the new tail is counted. A
    /// prompt of another length, or an output that got shorter, is recounted from scratch. Ids
    /// are checked before anything is counted, so an error leaves the counts as they were.
    fn update(&mut self, prompt: &[u32], generated: &[u32]) -> Result<(), SamplingError> {
        let vocab_size = self.counts.len();
        if self.repetition != 1.0 && prompt.len() != self.counted_prompt {
            check_range(prompt, vocab_size)?;
            for &id in &self.prompt_ids {
                self.in_prompt[id as usize] = false;
            }
            self.prompt_ids.clear();
            for &id in prompt {
                let seen = &mut self.in_prompt[id as usize];
                if !*seen {
                    *seen = true;
                    self.prompt_ids.push(id);
                }
            }
            self.counted_prompt = prompt.len();
        }
        if generated.len() < self.counted_generated {
            for &id in &self.generated_ids {
                self.counts[id as usize] = 0;
            }
            self.generated_ids.clear();
            self.counted_generated = 0;
        }
        let new = &generated[self.counted_generated..];
        check_range(new, vocab_size)?;
        for &id in new {
            let count = &mut self.counts[id as usize];
            if *count == 0 {
                self.generated_ids.push(id);
            }
            *count += 1;
        }
        self.counted_generated = generated.len();
        Ok(())
    }

    /// Applies the penalties: repetition first (as vLLM does), over every token of the prompt
    /// and the output, dividing a positive logit and multiplying a negative one so both become
    /// less likely; then `presence + frequency * count` subtracted for each generated token.
    fn apply(&self, logits: &mut [f32]) {
        if self.repetition != 1.0 {
            let output_only = self
                .generated_ids
                .iter()
                .filter(|&&id| !self.in_prompt[id as usize]);
            for &id in self.prompt_ids.iter().chain(output_only) {
                let logit = &mut logits[id as usize];
                *logit = if *logit > 0.0 {
                    *logit / self.repetition
                } else {
                    *logit * self.repetition
                };
            }
        }
        if self.presence != 0.0 || self.frequency != 0.0 {
            for &id in &self.generated_ids {
                let count = self.counts[id as usize] as f32;
                logits[id as usize] -= self.presence + self.frequency * count;
            }
        }
    }
}

/// The first id of `ids` outside the vocabulary, as an error.
fn check_range(ids: &[u32], vocab_size: usize) -> Result<(), SamplingError> {
    match ids.iter().find(|&&id| id as usize >= vocab_size) {
        Some(&token) => Err(SamplingError::TokenOutOfRange { token, vocab_size }),
        None => Ok(()),
    }
}

/// Makes tokens impossible (vLLM's min_tokens masking of EOS and the stop token ids).
fn ban(logits: &mut [f32], banned: &[u32]) -> Result<(), SamplingError> {
    check_range(banned, logits.len())?;
    for &id in banned {
        logits[id as usize] = f32::NEG_INFINITY;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neutral_penalties_cost_nothing() {
        assert!(Penalties::new(0.0, 0.0, 1.0, 10).is_none());
    }

    #[test]
    fn presence_and_frequency_follow_openai() {
        let mut p = Penalties::new(0.5, 0.25, 1.0, 4).unwrap();
        p.update(&[3, 3], &[1, 2, 1]).unwrap();
        let mut logits = [1.0f32; 4];
        p.apply(&mut logits);
        // Token 1 twice: 1 - (0.5 + 2 * 0.25); token 2 once; the prompt does not count.
        assert_eq!(logits, [1.0, 0.0, 0.25, 1.0]);
    }

    #[test]
    fn repetition_covers_prompt_and_output_once_each() {
        let mut p = Penalties::new(0.0, 0.0, 2.0, 5).unwrap();
        p.update(&[0, 1, 1], &[1, 2, 2]).unwrap();
        let mut logits = [4.0f32, -4.0, 4.0, 4.0, -4.0];
        p.apply(&mut logits);
        assert_eq!(logits, [2.0, -8.0, 2.0, 4.0, -4.0]);
    }

    #[test]
    fn counts_grow_incrementally_and_recount_when_shorter() {
        let mut p = Penalties::new(0.0, 1.0, 1.0, 3).unwrap();
        p.update(&[], &[0]).unwrap();
        p.update(&[], &[0, 0, 2]).unwrap();
        let mut logits = [0.0f32; 3];
        p.apply(&mut logits);
        assert_eq!(logits, [-2.0, 0.0, -1.0]);
        p.update(&[], &[1]).unwrap();
        let mut logits = [0.0f32; 3];
        p.apply(&mut logits);
        assert_eq!(logits, [0.0, -1.0, 0.0]);
    }

    #[test]
    fn out_of_range_ids_are_errors() {
        let mut p = Penalties::new(0.0, 0.0, 1.5, 3).unwrap();
        assert_eq!(
            p.update(&[3], &[]).unwrap_err(),
            SamplingError::TokenOutOfRange {
                token: 3,
                vocab_size: 3
            }
        );
        assert_eq!(
            ban(&mut [0.0; 3], &[7]).unwrap_err(),
            SamplingError::TokenOutOfRange {
                token: 7,
                vocab_size: 3
            }
        );
    }
}
