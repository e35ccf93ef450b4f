//! InternVL-Chat V1.1 on candle.
//!
//! Everything needed to turn a conversation with images into logits, faithful to the upstream
//! release: checkpoint loading, tokenizer, image preprocessing, prompt template and forward.
//! Knows nothing of HTTP or scheduling.

pub mod config;
mod cpu_math;
mod cpu_ops;
#[cfg(feature = "cuda")]
pub mod cuda_kernels;
mod dense_attention;
#[cfg(feature = "cuda")]
pub mod kernel_check;
pub mod kv_cache;
mod linear;
pub mod llama;
pub mod loader;
pub mod model;
pub mod paged_attention;
pub mod paged_plan;
pub mod preprocess;
pub mod projector;
pub mod prompt;
pub mod random_weights;
#[cfg(test)]
mod test_util;
pub mod tokenizer;
pub mod vision;
pub mod weights;

pub use config::InternVlConfig;
pub use kv_cache::{PagedKvCache, SequenceSlice};
pub use loader::{EncodedPrompt, LoadError, LoadedModel};
pub use model::{default_dtype, InternVlChat};
pub use random_weights::{count_parameters, random_model, ParamCount};
pub use weights::Checkpoint;
