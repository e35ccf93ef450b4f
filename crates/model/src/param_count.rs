//! How many parameters the model a config describes has, by part, computed from its
//! dimensions: what sizes a deployment (the published 19 B model's count is checked against
//! it), known without building or allocating the model.

use crate::config::{InternVlConfig, VisionNorm};
use std::fmt;

/// Parameters of a model, by part.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParamCount {
    pub vision: u64,
    pub projector: u64,
    pub language_model: u64,
}

impl ParamCount {
    pub fn total(&self) -> u64 {
        self.vision + self.projector + self.language_model
    }

    /// Adds a tensor of `count` elements named as in the checkpoint to its part.
    pub(crate) fn add(&mut self, name: &str, count: u64) {
        let part = if name.starts_with("vision_model.") {
            &mut self.vision
        } else if name.starts_with("mlp1.") {
            &mut self.projector
        } else {
            &mut self.language_model
        };
        *part += count;
    }
}

/// The parameters of the model `config` describes: only the ViT layers up to `select_layer`
/// are counted, since only those are built.
pub fn count_parameters(config: &InternVlConfig) -> ParamCount {
    let v = &config.vision;
    let (c, i) = (v.hidden_size as u64, v.intermediate_size as u64);
    let norm = match v.norm_type {
        VisionNorm::RmsNorm => c,
        VisionNorm::LayerNorm => 2 * c,
    };
    let qkv = 3 * c * c + if v.qkv_bias { 3 * c } else { 0 };
    let qk_norms = if v.qk_normalization { 2 * norm } else { 0 };
    let vision_layer = 2 * norm + qkv + qk_norms + (c * c + c) + 2 * c + (c * i + i) + (i * c + c);
    let patch = v.patch_size as u64;
    let grid = (config.image_size / v.patch_size) as u64;
    let embeddings = c + (c * 3 * patch * patch + c) + (grid * grid + 1) * c;

    let factor = config.shuffle_factor() as u64;
    let l = &config.llm;
    let (h, inter, vocab) = (
        l.hidden_size as u64,
        l.intermediate_size as u64,
        l.vocab_size as u64,
    );
    let shuffled = c * factor * factor;
    let projector = 2 * shuffled + (shuffled * h + h) + (h * h + h);

    let (q, kv) = (
        (l.num_attention_heads * l.head_dim()) as u64,
        (l.num_key_value_heads * l.head_dim()) as u64,
    );
    let llm_layer = 2 * h + h * (q + 2 * kv) + q * h + 3 * h * inter;
    ParamCount {
        vision: embeddings + config.vision_layers_used() as u64 * vision_layer,
        projector,
        language_model: 2 * vocab * h + h + l.num_hidden_layers as u64 * llm_layer,
    }
}

impl fmt::Display for ParamCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let short = |n: u64| {
            let n = n as f64;
            if n >= 1e9 {
                format!("{:.2} B", n / 1e9)
            } else {
                format!("{:.2} M", n / 1e6)
            }
        };
        write!(
            f,
            "{} parameters ({}: vision {}, projector {}, language model {})",
            self.total(),
            short(self.total()),
            short(self.vision),
            short(self.projector),
            short(self.language_model)
        )
    }
}
