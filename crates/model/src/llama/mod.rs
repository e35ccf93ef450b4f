//! LLaMA over a batch of sequences of different lengths sharing one paged KV cache.
//!
//! All new tokens of the batch are packed into one [tokens, hidden] matrix so the projections
//! and MLPs run as single matmuls; only attention is done per sequence, reading each
//! sequence's keys and values from the cache through its block table.

use crate::config::LlmConfig;
use crate::kv_cache::{PagedKvCache, SequenceSlice};
use crate::linear::{linear_no_bias, Linear};
use crate::paged_attention::{paged_attention_cpu, PagedRun};
use crate::random_weights::is_stand_in;
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{embedding, rms_norm, Embedding, RmsNorm, VarBuilder};

/// Query runs up to this long (decode steps, short chunks) attend in place in the cache; longer
/// prefills gather the context and use matmuls, which win when many queries share it.
const IN_PLACE_MAX_QUERIES: usize = 16;

/// Precomputed rotary cos/sin for every position the model supports.
#[derive(Debug, Clone)]
struct Rotary {
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    fn new(cfg: &LlmConfig, dtype: DType, device: &Device) -> Result<Self> {
        let dim = cfg.head_dim();
        let inv_freq: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| 1.0 / cfg.rope_theta.powf(i as f64 / dim as f64) as f32)
            .collect();
        let n = inv_freq.len();
        let inv_freq = Tensor::from_vec(inv_freq, (1, n), device)?;
        let positions = Tensor::arange(0u32, cfg.max_position_embeddings as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((cfg.max_position_embeddings, 1))?;
        let freqs = positions.matmul(&inv_freq)?;
        Ok(Self {
            cos: freqs.cos()?.to_dtype(dtype)?,
            sin: freqs.sin()?.to_dtype(dtype)?,
        })
    }

    /// cos and sin [tokens, head_dim / 2] at each token's position.
    fn at(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            self.cos.index_select(positions, 0)?,
            self.sin.index_select(positions, 0)?,
        ))
    }
}

/// `parts` (each [rows_i, cols]) stacked into one [Σ rows_i, cols] weight, so projections that
/// read the same input run as one matmul: fewer, larger GEMMs (on the GPU, fewer launches).
/// Stand-ins ([`is_stand_in`]) stay views.
fn stack_rows(parts: &[Tensor]) -> Result<Tensor> {
    if parts.iter().all(is_stand_in) {
        let rows = parts.iter().map(|p| p.dim(0)).sum::<Result<usize>>()?;
        let cols = parts[0].dim(1)?;
        return Tensor::zeros((), parts[0].dtype(), parts[0].device())?.broadcast_as((rows, cols));
    }
    Tensor::cat(parts, 0)
}

#[derive(Debug, Clone)]
struct Attention {
    /// q_proj, k_proj and v_proj stacked: one matmul gives [tokens, (heads + 2 kv_heads) hd].
    qkv_proj: Linear,
    o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

/// Positions, cache slots and layout of one batch, shared by every layer.
struct BatchPlan<'a> {
    slices: &'a [SequenceSlice],
    /// Rotary cos and sin at every packed token's position.
    rope: (Tensor, Tensor),
    /// Cache slot every packed token is written to, broadcast to [tokens, kv_heads, head_dim]
    /// as `scatter_set` wants it.
    write_index: Tensor,
    /// Per sequence: cache slots of positions `0..start + len`, read by attention.
    read_slots: Vec<Vec<u32>>,
    #[cfg(feature = "cuda")]
    block_size: usize,
    /// What the CUDA kernels need, uploaded once for all layers; `None` off CUDA.
    #[cfg(feature = "cuda")]
    cuda: Option<CudaPlan>,
}

/// The device-side part of a [`BatchPlan`] on CUDA.
#[cfg(feature = "cuda")]
struct CudaPlan {
    /// Short runs for the paged kernel; `None` where it cannot take this batch.
    paged: Option<crate::cuda_kernels::DevicePagedQueries>,
    /// Per sequence, the slots of its context where it is gathered (the runs the paged
    /// kernel does not take).
    gather_slots: Vec<Option<Tensor>>,
}

#[cfg(feature = "cuda")]
impl CudaPlan {
    fn new(
        slices: &[SequenceSlice],
        read_slots: &[Vec<u32>],
        dtype: DType,
        head_dim: usize,
        device: &Device,
    ) -> Result<Self> {
        use crate::cuda_kernels::{paged_supported, DevicePagedQueries};
        let queries = crate::paged_plan::PagedQueries::new(slices, IN_PLACE_MAX_QUERIES);
        let paged = (!queries.is_empty() && paged_supported(dtype, head_dim, queries.max_context))
            .then(|| DevicePagedQueries::new(&queries, device))
            .transpose()?;
        let gather_slots = slices
            .iter()
            .zip(read_slots)
            .map(|(slice, slots)| {
                let in_paged = paged.is_some() && slice.len <= IN_PLACE_MAX_QUERIES;
                (!in_paged)
                    .then(|| Tensor::new(slots.as_slice(), device))
                    .transpose()
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            paged,
            gather_slots,
        })
    }
}

impl Attention {
    fn new(cfg: &LlmConfig, vb: VarBuilder) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim());
        let kv = cfg.num_key_value_heads * hd;
        let weight = |name: &str, rows: usize| vb.pp(name).get((rows, h), "weight");
        let qkv = stack_rows(&[
            weight("q_proj", cfg.num_attention_heads * hd)?,
            weight("k_proj", kv)?,
            weight("v_proj", kv)?,
        ])?;
        Ok(Self {
            qkv_proj: Linear::new(qkv, None)?,
            o_proj: linear_no_bias(cfg.num_attention_heads * hd, h, vb.pp("o_proj"))?,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: hd,
        })
    }

    fn forward(&self, xs: &Tensor, plan: &BatchPlan, cache: (&Tensor, &Tensor)) -> Result<Tensor> {
        let t = xs.dim(0)?;
        let hd = self.head_dim;
        let (q_width, kv_width) = (self.num_heads * hd, self.num_kv_heads * hd);
        let qkv = self.qkv_proj.forward(xs)?;
        let q = qkv
            .narrow(1, 0, q_width)?
            .reshape((1, t, self.num_heads, hd))?;
        let k = qkv
            .narrow(1, q_width, kv_width)?
            .reshape((1, t, self.num_kv_heads, hd))?;
        let v = qkv
            .narrow(1, q_width + kv_width, kv_width)?
            .reshape((t, self.num_kv_heads, hd))?;
        let (cos, sin) = &plan.rope;
        let rotate = |x: &Tensor| candle_nn::rotary_emb::rope_thd(x, cos, sin)?.squeeze(0);
        let q = rotate(&q)?; // [t, heads, hd]
        let k = rotate(&k)?; // [t, kv_heads, hd]
        let (k_cache, v_cache) = cache;
        k_cache.scatter_set(&plan.write_index, &k, 0)?;
        v_cache.scatter_set(&plan.write_index, &v, 0)?;

        #[cfg(feature = "cuda")]
        if let Some(cuda) = &plan.cuda {
            let out = self.attend_cuda(&q, plan, cuda, cache)?;
            return self.o_proj.forward(&out.reshape((t, self.num_heads * hd))?);
        }
        let scale = (hd as f64).powf(-0.5);
        if let Some(out) = self.attend_cpu(&q, plan, cache, scale)? {
            return self.o_proj.forward(&out);
        }
        let q = q.transpose(0, 1)?; // [heads, t, hd]
        let mut outputs = Vec::with_capacity(plan.slices.len());
        let mut offset = 0;
        for (slice, slots) in plan.slices.iter().zip(&plan.read_slots) {
            let q = q.narrow(1, offset, slice.len)?;
            offset += slice.len;
            let slots = Tensor::new(slots.as_slice(), q.device())?;
            outputs.push(self.attend_gathered(&q, slice, &slots, cache)?);
        }
        let out = Tensor::cat(&outputs, 1)?
            .transpose(0, 1)?
            .reshape((t, self.num_heads * hd))?;
        self.o_proj.forward(&out)
    }

    /// CPU f32 attention of the packed `q` [t, heads, hd]: every short run of the batch read in
    /// place from the cache in one call, each long one through the gathered context. Returns
    /// [t, heads · hd], or `None` where the in-place path does not apply (other devices and
    /// dtypes).
    fn attend_cpu(
        &self,
        q: &Tensor,
        plan: &BatchPlan,
        cache: (&Tensor, &Tensor),
        scale: f64,
    ) -> Result<Option<Tensor>> {
        if !q.device().is_cpu() {
            return Ok(None);
        }
        let (t, width) = (q.dim(0)?, self.num_heads * self.head_dim);
        let mut short = Vec::new();
        let mut long = Vec::new();
        let mut offset = 0;
        for (slice, slots) in plan.slices.iter().zip(&plan.read_slots) {
            let rows = offset..offset + slice.len;
            offset += slice.len;
            if slice.len <= IN_PLACE_MAX_QUERIES {
                short.push(PagedRun {
                    rows,
                    start: slice.start,
                    slots,
                });
            } else {
                long.push((rows, slice, slots));
            }
        }
        let mut out = vec![0f32; t * width];
        if !paged_attention_cpu(q, cache.0, cache.1, &short, scale as f32, &mut out)? {
            return Ok(None);
        }
        for (rows, slice, slots) in long {
            let q = q.narrow(0, rows.start, rows.len())?.transpose(0, 1)?;
            let slots = Tensor::new(slots.as_slice(), q.device())?;
            let o = self.attend_gathered(&q, slice, &slots, cache)?; // [heads, len, hd]
            let o: Vec<f32> = o.transpose(0, 1)?.flatten_all()?.to_vec1()?;
            out[rows.start * width..rows.end * width].copy_from_slice(&o);
        }
        Tensor::from_vec(out, (t, width), q.device()).map(Some)
    }

    /// Attention of `q` [heads, len, hd] (the new tokens of `slice`) over its context gathered
    /// from the cache at `slots`, with matmuls; returns [heads, len, hd].
    fn attend_gathered(
        &self,
        q: &Tensor,
        slice: &SequenceSlice,
        slots: &Tensor,
        cache: (&Tensor, &Tensor),
    ) -> Result<Tensor> {
        let (ctx, hd) = (slice.start + slice.len, self.head_dim);
        let groups = self.num_heads / self.num_kv_heads;
        let gather = |cache: &Tensor| -> Result<Tensor> {
            let x = cache.index_select(slots, 0)?.transpose(0, 1)?; // [kv_heads, ctx, hd]
            let x = x
                .unsqueeze(1)?
                .broadcast_as((self.num_kv_heads, groups, ctx, hd))?
                .reshape((self.num_heads, ctx, hd))?;
            x.contiguous()
        };
        let (k, v) = (gather(cache.0)?, gather(cache.1)?);
        let scale = (hd as f64).powf(-0.5);
        let scores = (q.contiguous()?.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
        let scores = match causal_mask(slice, q.device())? {
            Some(mask) => scores.broadcast_add(&mask)?,
            None => scores,
        };
        let probs = crate::cpu_ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        probs.matmul(&v) // [heads, len, hd]
    }

    /// CUDA attention of the packed `q` [t, heads, hd]: one paged-kernel launch for every short
    /// run, flash attention over the gathered context for each long one (matmuls where the
    /// flash kernel does not apply, e.g. f32). Returns [t, heads, hd].
    #[cfg(feature = "cuda")]
    fn attend_cuda(
        &self,
        q: &Tensor,
        plan: &BatchPlan,
        cuda: &CudaPlan,
        cache: (&Tensor, &Tensor),
    ) -> Result<Tensor> {
        use crate::cuda_kernels::{flash_attention_into, flash_supported, paged_attention_into};
        let hd = self.head_dim;
        let out = Tensor::zeros(q.shape(), q.dtype(), q.device())?;
        if let Some(paged) = &cuda.paged {
            let block_size = plan.block_size;
            let scale = (hd as f32).powf(-0.5);
            paged_attention_into(&out, q, cache.0, cache.1, paged, block_size, scale)?;
        }
        let mut offset = 0;
        for (slice, slots) in plan.slices.iter().zip(&cuda.gather_slots) {
            let rows = offset;
            offset += slice.len;
            let Some(slots) = slots else { continue };
            let q = q.narrow(0, rows, slice.len)?;
            if flash_supported(q.dtype(), hd) {
                let k = cache.0.index_select(slots, 0)?.unsqueeze(0)?;
                let v = cache.1.index_select(slots, 0)?.unsqueeze(0)?;
                let target = out.narrow(0, rows, slice.len)?.unsqueeze(0)?;
                flash_attention_into(&target, &q.unsqueeze(0)?, &k, &v, true)?;
            } else {
                let o = self.attend_gathered(&q.transpose(0, 1)?, slice, slots, cache)?;
                out.slice_set(&o.transpose(0, 1)?.contiguous()?, 0, rows)?;
            }
        }
        Ok(out)
    }
}

/// Additive mask letting new token `i` (at position `start + i`) see positions `..= start + i`.
fn causal_mask(slice: &SequenceSlice, device: &Device) -> Result<Option<Tensor>> {
    if slice.len == 1 {
        return Ok(None);
    }
    let ctx = slice.start + slice.len;
    let mask: Vec<f32> = (0..slice.len)
        .flat_map(|i| {
            (0..ctx).map(move |j| {
                if j > slice.start + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (1, slice.len, ctx), device).map(Some)
}

#[derive(Debug, Clone)]
struct Mlp {
    /// gate_proj and up_proj stacked: one matmul gives [tokens, 2 · intermediate].
    gate_up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn new(cfg: &LlmConfig, vb: VarBuilder) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let weight = |name: &str| vb.pp(name).get((i, h), "weight");
        Ok(Self {
            gate_up_proj: Linear::new(
                stack_rows(&[weight("gate_proj")?, weight("up_proj")?])?,
                None,
            )?,
            down_proj: linear_no_bias(i, h, vb.pp("down_proj"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let gate_up = self.gate_up_proj.forward(xs)?;
        self.down_proj.forward(&crate::cpu_ops::silu_mul(&gate_up)?)
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
    fn new(cfg: &LlmConfig, vb: VarBuilder) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Self {
            input_layernorm: rms_norm(h, eps, vb.pp("input_layernorm"))?,
            self_attn: Attention::new(cfg, vb.pp("self_attn"))?,
            post_attention_layernorm: rms_norm(h, eps, vb.pp("post_attention_layernorm"))?,
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
        })
    }

    fn forward(&self, xs: &Tensor, plan: &BatchPlan, cache: (&Tensor, &Tensor)) -> Result<Tensor> {
        let attn = self
            .self_attn
            .forward(&self.input_layernorm.forward(xs)?, plan, cache)?;
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
}

impl Llama {
    pub fn new(cfg: &LlmConfig, vb: VarBuilder) -> Result<Self> {
        let model = vb.pp("model");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(cfg, model.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embed_tokens: embedding(cfg.vocab_size, cfg.hidden_size, model.pp("embed_tokens"))?,
            layers,
            norm: rms_norm(cfg.hidden_size, cfg.rms_norm_eps, model.pp("norm"))?,
            lm_head: linear_no_bias(cfg.hidden_size, cfg.vocab_size, vb.pp("lm_head"))?,
            rotary: Rotary::new(cfg, vb.dtype(), vb.device())?,
            max_positions: cfg.max_position_embeddings,
            vocab_size: cfg.vocab_size,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim(),
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
        let plan = self.plan(embeddings, slices, cache)?;
        let mut xs = embeddings.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            xs = layer.forward(&xs, &plan, cache.layer(i))?;
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

    fn plan<'a>(
        &self,
        embeddings: &Tensor,
        slices: &'a [SequenceSlice],
        cache: &PagedKvCache,
    ) -> Result<BatchPlan<'a>> {
        let (tokens, device) = (embeddings.dim(0)?, embeddings.device());
        let packed: usize = slices.iter().map(|s| s.len).sum();
        if packed != tokens || slices.iter().any(|s| s.len == 0) {
            candle_core::bail!("batch slices cover {packed} tokens, embeddings have {tokens}");
        }
        let total_slots = (cache.num_blocks() * cache.block_size()) as u32;
        let mut positions = Vec::with_capacity(tokens);
        let mut write_slots = Vec::with_capacity(tokens);
        let mut read_slots = Vec::with_capacity(slices.len());
        for slice in slices {
            let end = slice.start + slice.len;
            if end > self.max_positions {
                candle_core::bail!(
                    "position {end} exceeds max_position_embeddings {}",
                    self.max_positions
                );
            }
            let slots = slice.slots(end, cache.block_size())?;
            if slots.iter().any(|&s| s >= total_slots) {
                candle_core::bail!(
                    "block table refers to a block past the cache's {}",
                    cache.num_blocks()
                );
            }
            positions.extend(slice.start as u32..end as u32);
            write_slots.extend_from_slice(&slots[slice.start..]);
            read_slots.push(slots);
        }
        Ok(BatchPlan {
            slices,
            rope: self.rotary.at(&Tensor::new(positions, device)?)?,
            write_index: Tensor::new(write_slots, device)?
                .reshape((tokens, 1, 1))?
                .broadcast_as((tokens, self.num_kv_heads, self.head_dim))?
                .contiguous()?,
            #[cfg(feature = "cuda")]
            cuda: (device.is_cuda() && crate::cuda_kernels::kernels_enabled())
                .then(|| {
                    let dtype = embeddings.dtype();
                    CudaPlan::new(slices, &read_slots, dtype, self.head_dim, device)
                })
                .transpose()?,
            read_slots,
            #[cfg(feature = "cuda")]
            block_size: cache.block_size(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stacked_rows_are_the_parts_in_order_and_stand_ins_stay_views() {
        let dev = Device::Cpu;
        let a = Tensor::new(&[[1f32, 2.], [3., 4.]], &dev).unwrap();
        let b = Tensor::new(&[[5f32, 6.]], &dev).unwrap();
        let stacked = stack_rows(&[a, b]).unwrap();
        assert_eq!(
            stacked.to_vec2::<f32>().unwrap(),
            [[1., 2.], [3., 4.], [5., 6.]]
        );
        let stand_in = |rows: usize| {
            Tensor::zeros((), DType::F32, &dev)
                .unwrap()
                .broadcast_as((rows, 4096))
                .unwrap()
        };
        let stacked = stack_rows(&[stand_in(4096), stand_in(1024)]).unwrap();
        assert_eq!(stacked.dims(), [5120, 4096]);
        assert!(is_stand_in(&stacked));
    }
}
