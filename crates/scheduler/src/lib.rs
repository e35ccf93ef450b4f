//! The engine that keeps the model busy: continuous batching over a paged KV cache, with
//! image-aware prefix and encoder caching, per-request sampling, and cancellation.
//!
//! Model-agnostic: it drives the model through [`ModelRunner`].
//!
//! The step, as vLLM v1's core: `policy` decides which sequences run and how many tokens each
//! (a typed plan), asking `kv_cache_manager` for blocks (it owns the `block_pool` and the
//! prefix cache of `prefix_hash`); `image_encoding` fills the plan's images from the
//! `encoder_cache` or the vision encoder; the runner's forward gives logits, which
//! `output_processor` turns into tokens (`sampling`), stops (`stop`), text (`detokenizer`) and
//! events (`output`); `scheduler` ties one step together and [`Engine`] runs steps on their
//! own thread. A request is checked once, by `validation`, before it is queued.

mod block_pool;
pub mod config;
pub mod content_hash;
pub mod detokenizer;
mod encoder_cache;
pub mod engine;
pub mod grammar;
mod image_encoding;
mod kv_cache_manager;
pub mod output;
mod output_processor;
mod policy;
mod prefix_hash;
pub mod request;
pub mod runner;
pub mod sampling;
pub mod scheduler;
mod seq_image;
mod sequence;
pub mod stats;
pub mod stop;
mod validation;

pub use config::EngineConfig;
pub use content_hash::ContentHash;
pub use detokenizer::{Detokenizer, TokenDecoder};
pub use engine::Engine;
pub use grammar::{Grammar, GrammarCompiler, GrammarError, GrammarLimits, GrammarSpec, VocabToken};
pub use output::{EventSender, RequestStream};
pub use request::{ErrorCause, Event, ImageInput, Request, RequestTimings, Usage};
pub use runner::{ForwardSeq, ModelRunner, RunnerError};
pub use sampling::{Sampled, Sampler, SamplingError, SamplingParams, MAX_TOP_LOGPROBS};
pub use scheduler::Scheduler;
pub use stats::EngineStats;
pub use stop::{FinishReason, StopChecker, StopError, StopParams, StopReason, StopStep};
pub use validation::{validate, SubmitError};
