//! Choosing each request's next token: its settings and their validation (`params`), the
//! processors that reshape its logits first (`logits_processors`), the truncations of a
//! random step (`truncation`), and the sampler that ties them together (`sampler`).

mod logits_processors;
mod params;
mod sampler;
mod truncation;

pub use params::{
    SamplingError, SamplingParams, MAX_REPETITION_PENALTY, MAX_TEMPERATURE, MAX_TOP_LOGPROBS,
};
pub use sampler::{Sampled, Sampler};
