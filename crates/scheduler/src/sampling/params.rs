//! A request's sampling settings, their ranges, and the error naming the field that is out
//! of range: the one definition both the engine and the server's request validation use.

use std::collections::HashMap;

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
    /// before it is scheduled. [`Sampler::new`](super::Sampler::new) runs it too.
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
