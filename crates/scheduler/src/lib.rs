//! The engine that drives the model. Today: per-request sampling. Continuous batching over a
//! paged KV cache builds on it.

pub mod sampling;

pub use sampling::{argmax, Sampler, SamplingError, SamplingParams};
