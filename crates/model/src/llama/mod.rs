//! LLaMA over a batch of sequences of different lengths sharing one paged KV cache.
//!
//! All new tokens of the batch are packed into one [tokens, hidden] matrix so the projections
//! and MLPs run as single matmuls; only attention is done per sequence, reading each
//! sequence's keys and values from the cache through its block table.

mod attention;
mod batch_plan;
mod rotary;

use crate::backends::Backends;
use crate::config::LlmConfig;
use crate::cpu_ops::Elementwise;
use crate::kv_cache::{PagedKvCache, SequenceSlice};
use crate::linear::{linear_no_bias, Linear};
use attention::{Attention, AttentionKind, AttentionPlan};
use batch_plan::{BatchPlan, PlanShape};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{embedding, rms_norm, Embedding, RmsNorm, VarBuilder};
use rotary::Rotary;

/// `parts` (each [rows_i, cols]) stacked into one [Σ rows_i, cols] weight, so projections that
/// read the same input run as one matmul: fewer, larger GEMMs (on the GPU, fewer launches).
fn stack_rows(parts: &[Tensor]) -> Result<Tensor> {
    Tensor::cat(parts, 0)
}

#[derive(Debug, Clone)]
struct Mlp {
    /// gate_proj and up_proj stacked: one matmul gives [tokens, 2 · intermediate].
    gate_up_proj: Linear,
    down_proj: Linear,
    elementwise: Elementwise,
}

impl Mlp {
    fn new(cfg: &LlmConfig, backends: &Backends, vb: VarBuilder) -> Result<Self> {
        let (h, i, kind) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            backends.llm_linear(),
        );
        let weight = |name: &str| vb.pp(name).get((i, h), "weight");
        let gate_up = stack_rows(&[weight("gate_proj")?, weight("up_proj")?])?;
        Ok(Self {
            gate_up_proj: Linear::new(
                gate_up,
                None,
                kind,
                &format!("{}.gate_up_proj", vb.prefix()),
            )?,
            down_proj: linear_no_bias(i, h, kind, vb.pp("down_proj"))?,
            elementwise: backends.elementwise(),
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let gate_up = self.gate_up_proj.forward(xs)?;
        self.down_proj
            .forward(&self.elementwise.silu_mul(&gate_up)?)
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    fn new(cfg: &LlmConfig, backends: &Backends, vb: VarBuilder) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Self {
            input_layernorm: rms_norm(h, eps, vb.pp("input_layernorm"))?,
            self_attn: Attention::new(cfg, backends, vb.pp("self_attn"))?,
            post_attention_layernorm: rms_norm(h, eps, vb.pp("post_attention_layernorm"))?,
            mlp: Mlp::new(cfg, backends, vb.pp("mlp"))?,
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        plan: &BatchPlan,
        attention: &AttentionPlan,
        cache: (&Tensor, &Tensor),
    ) -> Result<Tensor> {
        let attn =
            self.self_attn
                .forward(&self.input_layernorm.forward(xs)?, plan, attention, cache)?;
        let xs = (xs + attn)?;
        let mlp = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&xs)?)?;
        xs + mlp
    }
}

/// The language model: `LlamaForCausalLM` under the checkpoint prefix `language_model`.
#[derive(Debug, Clone)]
pub struct Llama {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rotary: Rotary,
    max_positions: usize,
    vocab_size: usize,
    num_kv_heads: usize,
    head_dim: usize,
    attention: AttentionKind,
}

impl Llama {
    pub fn new(cfg: &LlmConfig, backends: &Backends, vb: VarBuilder) -> Result<Self> {
        let model = vb.pp("model");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(cfg, backends, model.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let (h, vocab) = (cfg.hidden_size, cfg.vocab_size);
        Ok(Self {
            embed_tokens: embedding(vocab, h, model.pp("embed_tokens"))?,
            layers,
            norm: rms_norm(h, cfg.rms_norm_eps, model.pp("norm"))?,
            lm_head: linear_no_bias(h, vocab, backends.lm_head_linear(), vb.pp("lm_head"))?,
            rotary: Rotary::new(cfg, backends.dtype(), backends.device())?,
            max_positions: cfg.max_position_embeddings,
            vocab_size: vocab,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim(),
            attention: AttentionKind::new(backends, cfg.head_dim()),
        })
    }

    /// Token embeddings [tokens, hidden] of `ids` [tokens].
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        self.embed_tokens.forward(ids)
    }

    /// Runs the packed new tokens of `slices` (embeddings [tokens, hidden], in slice order),
    /// writes their keys and values into `cache`, and returns f32 logits [n, vocab] for the
    /// last token of each slice that wants them, in slice order.
    pub fn forward(
        &self,
        embeddings: &Tensor,
        slices: &[SequenceSlice],
        cache: &mut PagedKvCache,
    ) -> Result<Tensor> {
        let device = embeddings.device();
        let shape = PlanShape {
            rotary: &self.rotary,
            max_positions: self.max_positions,
            num_kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
        };
        let plan = BatchPlan::new(embeddings, slices, cache, &shape)?;
        let attention =
            self.attention
                .plan(slices, &plan.read_slots, cache.block_size(), device)?;
        let mut xs = embeddings.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            xs = layer.forward(&xs, &plan, &attention, cache.layer(i))?;
        }
        let mut last = Vec::new();
        let mut end = 0;
        for slice in slices {
            end += slice.len;
            if slice.wants_logits {
                last.push(end as u32 - 1);
            }
        }
        if last.is_empty() {
            return Tensor::zeros((0, self.vocab_size), DType::F32, device);
        }
        let last = Tensor::new(last, device)?;
        let xs = self.norm.forward(&xs.index_select(&last, 0)?)?;
        self.lm_head.forward(&xs)?.to_dtype(DType::F32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn stacked_rows_are_the_parts_in_order() {
        let dev = Device::Cpu;
        let a = Tensor::new(&[[1f32, 2.], [3., 4.]], &dev).unwrap();
        let b = Tensor::new(&[[5f32, 6.]], &dev).unwrap();
        let stacked = stack_rows(&[a, b]).unwrap();
        assert_eq!(
            stacked.to_vec2::<f32>().unwrap(),
            [[1., 2.], [3., 4.], [5., 6.]]
        );
    }
}
