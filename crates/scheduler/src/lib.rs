//! The engine that keeps the model busy: continuous batching over a paged KV cache, with
//! image-aware prefix and encoder caching, per-request sampling, and cancellation.
//!
//! Model-agnostic: it drives the model through [`ModelRunner`].

pub mod block_pool;
pub mod config;
pub mod encoder_cache;
pub mod engine;
pub mod prefix_hash;
pub mod request;
pub mod runner;
pub mod sampling;
pub mod scheduler;
mod sequence;
pub mod stats;

pub use config::EngineConfig;
pub use engine::{Engine, RequestStream};
pub use request::{Event, FinishReason, ImageInput, Request, RequestId, StopParams, Usage};
pub use runner::{ForwardSeq, ModelRunner, RunnerError};
pub use sampling::{argmax, Sampler, SamplingError, SamplingParams};
pub use scheduler::{validate, Scheduler, SubmitError};
pub use stats::EngineStats;
