//! What a caller hands the engine, and what it gets back.

use crate::sampling::SamplingParams;
use std::sync::Arc;
use std::time::Duration;

/// Identifies a request inside the engine.
pub type RequestId = u64;

/// An image of a prompt: where its placeholder tokens are, and its input to the encoder.
pub struct ImageInput<P> {
    /// Index in the prompt of the image's first placeholder token.
    pub offset: usize,
    /// Placeholder tokens the image's embeddings replace.
    pub num_tokens: usize,
    /// Hash of the image's content: equal images share encoder outputs and cached blocks.
    pub content_hash: u64,
    pub pixels: Arc<P>,
}

/// When to stop generating.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopParams {
    pub max_tokens: usize,
    /// The end-of-sequence token: ends the request unless `ignore_eos`.
    pub eos_token_id: Option<u32>,
    pub ignore_eos: bool,
}

/// A request for one completion.
pub struct Request<P> {
    pub prompt: Vec<u32>,
    pub images: Vec<ImageInput<P>>,
    pub sampling: SamplingParams,
    pub stop: StopParams,
}

/// Why a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced the end-of-sequence token.
    Stop,
    /// `max_tokens` were generated.
    Length,
    /// The caller went away.
    Abort,
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

/// What the engine reports about a request, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A generated token (the end-of-sequence token is not reported).
    Token { id: u32 },
    /// The request is over; nothing follows.
    Finished {
        reason: FinishReason,
        usage: Usage,
        timings: RequestTimings,
    },
    /// The request failed; nothing follows.
    Error { message: String },
}
