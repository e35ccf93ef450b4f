//! Engine-wide counters and gauges the server exports.

use std::time::Duration;

/// A snapshot of the engine, updated after every step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineStats {
    pub running: usize,
    pub waiting: usize,
    pub blocks_used: usize,
    pub blocks_total: usize,
    pub preemptions: u64,
    /// Prompt tokens looked up in the prefix cache at admission, and those found.
    pub prefix_queries: u64,
    pub prefix_hits: u64,
    /// Encoder-cache lookups and hits.
    pub image_cache_queries: u64,
    pub image_cache_hits: u64,
    pub images_encoded: u64,
    /// Time spent in the vision encoder.
    pub encode_time: Duration,
    /// Time spent in LLM forwards.
    pub forward_time: Duration,
    /// Time spent sampling, detokenizing and checking stops.
    pub sample_time: Duration,
    pub steps: u64,
    pub tokens_last_step: usize,
    pub finished: u64,
    /// Completions cancelled: the reader went away or left too much output unread.
    pub aborted: u64,
    /// Completions ended by an error of their own (the model or the sampler failed on them).
    pub failed: u64,
    /// Requests cancelled because their reader left more than `max_buffered_output_bytes`
    /// of output unread (their completions also count in `aborted`).
    pub output_overflows: u64,
}
