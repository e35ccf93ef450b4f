//! What a caller hands the engine, and what it gets back.

use crate::content_hash::ContentHash;
use crate::grammar::Grammar;
use crate::sampling::SamplingParams;
use crate::stop::{FinishReason, StopParams, StopReason};
use std::sync::Arc;
use std::time::Duration;

/// An image of a prompt: where its placeholder tokens are, and its input to the encoder.
pub struct ImageInput<P> {
    /// Index in the prompt of the image's first placeholder token.
    pub offset: usize,
    /// Placeholder tokens the image's embeddings replace.
    pub num_tokens: usize,
    /// Digest of the image's content: equal images share encoder outputs and cached blocks,
    /// so it must name the content (the encoded file) and nothing else.
    pub content_hash: ContentHash,
    pub pixels: Arc<P>,
}

impl<P> Clone for ImageInput<P> {
    fn clone(&self) -> Self {
        ImageInput {
            offset: self.offset,
            num_tokens: self.num_tokens,
            content_hash: self.content_hash,
            pixels: self.pixels.clone(),
        }
    }
}

/// A request for one or more completions of a prompt.
pub struct Request<P> {
    pub prompt: Vec<u32>,
    pub images: Vec<ImageInput<P>>,
    pub sampling: SamplingParams,
    pub stop: StopParams,
    /// Whether special tokens are left out of the text (upstream: yes).
    pub skip_special_tokens: bool,
    /// Independent completions of the prompt; they share its KV blocks.
    pub n: usize,
    /// The grammar the output must follow, compiled for this model's vocabulary; each
    /// completion gets its own copy.
    pub grammar: Option<Grammar>,
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_tokens: usize,
}

/// Timings of a finished request, for the server's histograms.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestTimings {
    /// Arrival to first scheduling.
    pub queue: Duration,
    /// Arrival to first token.
    pub time_to_first_token: Duration,
    /// Gaps between consecutive tokens.
    pub inter_token: Vec<Duration>,
    /// First scheduling to first token.
    pub prefill: Duration,
    /// First token to last token.
    pub decode: Duration,
    /// Arrival to finish.
    pub end_to_end: Duration,
    pub preemptions: usize,
}

/// What the engine reports about a request, in order for each completion. Every completion
/// ends with `Finished`, unless an `Error` ends the whole request.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A generated token, with the text it completes (often empty: the rest of a character,
    /// or text that may still become a stop string, comes later). Stop tokens (EOS, stop token
    /// ids) are reported only when the request asked for logprobs, with no text.
    Token {
        /// Which of the request's `n` completions.
        index: usize,
        id: u32,
        text: String,
        logprob: Option<f32>,
        top_logprobs: Vec<(u32, f32)>,
    },
    /// The request is over, with the last text held back until now; nothing follows.
    Finished {
        index: usize,
        text: String,
        reason: FinishReason,
        stop_reason: Option<StopReason>,
        usage: Usage,
        timings: RequestTimings,
    },
    /// The request failed; nothing follows.
    Error { message: String, cause: ErrorCause },
}

/// Whose failure a failed request is: the engine's (the model or the runtime failed: a
/// server error), or its grammar's (llguidance would not go on: one of its limits, met by the
/// client's own schema, regex or grammar: a client error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCause {
    Engine,
    Grammar,
}
