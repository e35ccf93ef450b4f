//! InternVL-Chat V1.1 on candle.
//!
//! Everything needed to turn a conversation with images into logits, faithful to the upstream
//! release: checkpoint loading, tokenizer, image preprocessing, prompt template and forward.
//! Knows nothing of HTTP or scheduling.

mod attention_backend;
mod backends;
pub mod config;
mod config_file;
mod cpu_math;
mod cpu_ops;
#[cfg(feature = "cuda")]
mod cuda_kernels;
mod dense_attention;
#[cfg(feature = "cuda")]
pub mod kernel_check;
#[cfg(feature = "cuda")]
pub mod kernel_timing;
pub mod kv_cache;
mod linear;
mod llama;
pub mod loader;
pub mod model;
mod paged_attention;
pub mod paged_plan;
mod param_count;
pub mod preprocess;
mod projector;
pub mod prompt;
pub mod quant;
mod quantize;
mod random_weights;
#[cfg(test)]
mod test_util;
pub mod tokenizer;
mod vision;
mod vnni_weight;
pub mod weights;

pub use attention_backend::{AttentionBackend, AttentionChoice, UnknownAttention};
pub use backends::{BackendError, Backends};
pub use config::InternVlConfig;
pub use kv_cache::{PagedKvCache, SequenceSlice};
pub use linear::{DenseLayout, LinearKind};
pub use loader::{EncodedPrompt, LoadError, LoadedModel};
pub use model::InternVlChat;
pub use param_count::{count_parameters, ParamCount};
pub use weights::Checkpoint;
