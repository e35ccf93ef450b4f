//! LLaMA's self-attention over the paged KV cache, for a packed batch of sequences.
//!
//! [`AttentionKind`] is the layer's share of the model's [`AttentionBackend`], fixed at
//! build from the head size and dtype; [`AttentionPlan`] is what one batch needs of it,
//! prepared once for all layers.

#[cfg(feature = "cuda")]
mod cuda;

use super::batch_plan::BatchPlan;
use super::stack_rows;
use crate::attention_backend::AttentionBackend;
use crate::backends::Backends;
use crate::config::LlmConfig;
use crate::cpu_ops::Elementwise;
use crate::kv_cache::SequenceSlice;
use crate::linear::{linear_no_bias, Linear};
use crate::paged_attention::{paged_attention_cpu, PagedRun};
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

/// Query runs up to this long (decode steps, short chunks) attend in place in the cache; longer
/// prefills gather the context and use matmuls, which win when many queries share it.
const IN_PLACE_MAX_QUERIES: usize = 16;

/// How the layers attend, fixed when the model is built.
#[derive(Debug, Clone, Copy)]
pub(super) enum AttentionKind {
    /// CPU f32: short runs read the cache in place, long ones through the gathered context.
    CpuInPlace,
    /// Every sequence through its gathered context, with candle's matmuls.
    Matmul,
    /// The CUDA kernels the dtype and head size allow.
    #[cfg(feature = "cuda")]
    Cuda(cuda::CudaKernels),
}

impl AttentionKind {
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub(super) fn new(backends: &Backends, head_dim: usize) -> Self {
        match backends.attention() {
            AttentionBackend::CpuF32 => Self::CpuInPlace,
            AttentionBackend::Matmul => Self::Matmul,
            #[cfg(feature = "cuda")]
            AttentionBackend::CudaKernels => {
                Self::Cuda(cuda::CudaKernels::new(backends.dtype(), head_dim))
            }
        }
    }

    /// What one batch needs of this kind; `read_slots` are its sequences' context slots.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub(super) fn plan(
        self,
        slices: &[SequenceSlice],
        read_slots: &[Vec<u32>],
        block_size: usize,
        device: &Device,
    ) -> Result<AttentionPlan> {
        Ok(match self {
            Self::CpuInPlace => AttentionPlan::CpuInPlace,
            Self::Matmul => AttentionPlan::Matmul,
            #[cfg(feature = "cuda")]
            Self::Cuda(kernels) => AttentionPlan::Cuda(cuda::CudaPlan::new(
                kernels, slices, read_slots, block_size, device,
            )?),
        })
    }
}

/// One batch's attention path, shared by every layer.
pub(super) enum AttentionPlan {
    CpuInPlace,
    Matmul,
    /// Device-side tables, uploaded once for all layers.
    #[cfg(feature = "cuda")]
    Cuda(cuda::CudaPlan),
}

#[derive(Debug, Clone)]
pub(super) struct Attention {
    /// q_proj, k_proj and v_proj stacked: one matmul gives [tokens, (heads + 2 kv_heads) hd].
    qkv_proj: Linear,
    o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    elementwise: Elementwise,
}

impl Attention {
    pub(super) fn new(cfg: &LlmConfig, backends: &Backends, vb: VarBuilder) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim());
        let kv = cfg.num_key_value_heads * hd;
        let weight = |name: &str, rows: usize| vb.pp(name).get((rows, h), "weight");
        let qkv = stack_rows(&[
            weight("q_proj", cfg.num_attention_heads * hd)?,
            weight("k_proj", kv)?,
            weight("v_proj", kv)?,
        ])?;
        let kind = backends.llm_linear();
        Ok(Self {
            qkv_proj: Linear::new(qkv, None, kind, &format!("{}.qkv_proj", vb.prefix()))?,
            o_proj: linear_no_bias(cfg.num_attention_heads * hd, h, kind, vb.pp("o_proj"))?,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: hd,
            elementwise: backends.elementwise(),
        })
    }

    pub(super) fn forward(
        &self,
        xs: &Tensor,
        plan: &BatchPlan,
        attention: &AttentionPlan,
        cache: (&Tensor, &Tensor),
    ) -> Result<Tensor> {
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
        // Narrowed to the cache's dtype where it is a 16-bit one (a no-op otherwise).
        k_cache.scatter_set(&plan.write_index, &k.to_dtype(k_cache.dtype())?, 0)?;
        v_cache.scatter_set(&plan.write_index, &v.to_dtype(v_cache.dtype())?, 0)?;

        let out = match attention {
            AttentionPlan::CpuInPlace => self.attend_cpu(&q, plan, cache)?,
            AttentionPlan::Matmul => self.attend_matmul(&q, plan, cache)?,
            #[cfg(feature = "cuda")]
            AttentionPlan::Cuda(cuda) => self
                .attend_cuda(&q, plan, cuda, cache)?
                .reshape((t, self.num_heads * hd))?,
        };
        self.o_proj.forward(&out)
    }

    /// Every sequence of the packed `q` [t, heads, hd] through its gathered context; returns
    /// [t, heads · hd].
    fn attend_matmul(
        &self,
        q: &Tensor,
        plan: &BatchPlan,
        cache: (&Tensor, &Tensor),
    ) -> Result<Tensor> {
        let t = q.dim(0)?;
        let q = q.transpose(0, 1)?; // [heads, t, hd]
        let mut outputs = Vec::with_capacity(plan.slices.len());
        let mut offset = 0;
        for (slice, slots) in plan.slices.iter().zip(&plan.read_slots) {
            let q = q.narrow(1, offset, slice.len)?;
            offset += slice.len;
            let slots = Tensor::new(slots.as_slice(), q.device())?;
            outputs.push(self.attend_gathered(&q, slice, &slots, cache)?);
        }
        Tensor::cat(&outputs, 1)?
            .transpose(0, 1)?
            .reshape((t, self.num_heads * self.head_dim))
    }

    /// CPU f32 attention of the packed `q` [t, heads, hd]: every short run of the batch read in
    /// place from the cache in one call, each long one through the gathered context. Returns
    /// [t, heads · hd].
    fn attend_cpu(
        &self,
        q: &Tensor,
        plan: &BatchPlan,
        cache: (&Tensor, &Tensor),
    ) -> Result<Tensor> {
        let (t, width) = (q.dim(0)?, self.num_heads * self.head_dim);
        let scale = (self.head_dim as f64).powf(-0.5);
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
        paged_attention_cpu(q, cache.0, cache.1, &short, scale as f32, &mut out)?;
        for (rows, slice, slots) in long {
            let q = q.narrow(0, rows.start, rows.len())?.transpose(0, 1)?;
            let slots = Tensor::new(slots.as_slice(), q.device())?;
            let o = self.attend_gathered(&q, slice, &slots, cache)?; // [heads, len, hd]
            let o: Vec<f32> = o.transpose(0, 1)?.flatten_all()?.to_vec1()?;
            out[rows.start * width..rows.end * width].copy_from_slice(&o);
        }
        Tensor::from_vec(out, (t, width), q.device())
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
            // [kv_heads, ctx, hd], widened to the compute dtype where the cache is narrower.
            let x = cache
                .index_select(slots, 0)?
                .to_dtype(q.dtype())?
                .transpose(0, 1)?;
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
        let probs = self
            .elementwise
            .softmax_last_dim(&scores)?
            .to_dtype(v.dtype())?;
        probs.matmul(&v) // [heads, len, hd]
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
