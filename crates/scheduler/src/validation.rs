//! The rules every request must pass before it is queued, in one place, and the error that
//! says which one it broke.

use crate::config::EngineConfig;
use crate::request::Request;
use crate::sampling::SamplingError;
use crate::stop::StopError;

/// Why a request was refused before it started.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SubmitError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("max_tokens must be at least 1")]
    NoTokens,
    #[error("prompt ({prompt} tokens) plus max_tokens ({max_tokens}) exceeds the maximum model length {max_model_len}")]
    TooLong {
        prompt: usize,
        max_tokens: usize,
        max_model_len: usize,
    },
    #[error("the request needs {needed} KV-cache blocks but the cache has {total}")]
    CacheTooSmall { needed: usize, total: usize },
    #[error("image {0} does not lie within the prompt, in order and without overlap")]
    BadImage(usize),
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    #[error(transparent)]
    Stop(#[from] StopError),
    #[error("n must be between 1 and {MAX_N}, got {0}")]
    BadN(usize),
    #[error("the grammar was compiled for {grammar} tokens, but the model has {vocab_size}")]
    GrammarVocab { grammar: usize, vocab_size: usize },
    #[error("the engine has stopped")]
    Stopped,
}

/// Most completions one request may ask for.
pub const MAX_N: usize = 128;

/// Checks that a request could ever complete, for a model whose logits have `vocab_size`
/// entries: every rule a request must pass, in one place. [`crate::Engine::submit`] runs it
/// before queueing, so every invalid request is refused at once, never after it started.
pub fn validate<P>(
    config: &EngineConfig,
    vocab_size: usize,
    request: &Request<P>,
) -> Result<(), SubmitError> {
    let prompt = request.prompt.len();
    if prompt == 0 {
        return Err(SubmitError::EmptyPrompt);
    }
    if request.n == 0 || request.n > MAX_N {
        return Err(SubmitError::BadN(request.n));
    }
    let max_tokens = request.stop.max_tokens;
    if max_tokens == 0 {
        return Err(SubmitError::NoTokens);
    }
    request.sampling.validate(vocab_size)?;
    if let Some(grammar) = &request.grammar {
        if grammar.vocab_size() != vocab_size {
            return Err(SubmitError::GrammarVocab {
                grammar: grammar.vocab_size(),
                vocab_size,
            });
        }
    }
    request.stop.validate(vocab_size)?;
    // Checked: `max_tokens` comes from the client and may be anything up to usize::MAX.
    let total = prompt
        .checked_add(max_tokens)
        .filter(|&total| total <= config.max_model_len)
        .ok_or(SubmitError::TooLong {
            prompt,
            max_tokens,
            max_model_len: config.max_model_len,
        })?;
    let needed = total.div_ceil(config.block_size);
    if needed > config.num_blocks {
        return Err(SubmitError::CacheTooSmall {
            needed,
            total: config.num_blocks,
        });
    }
    let mut end = 0;
    for (i, image) in request.images.iter().enumerate() {
        let image_end = image
            .offset
            .checked_add(image.num_tokens)
            .filter(|&e| image.offset >= end && image.num_tokens > 0 && e <= prompt)
            .ok_or(SubmitError::BadImage(i))?;
        end = image_end;
    }
    Ok(())
}
