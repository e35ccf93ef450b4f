//! The flash-attention kernel (kernels/flash_attention.cu): bf16 attention on tensor cores,
//! for the vision encoder and LLM prefills over a gathered context.

use super::{no_cpu, view};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, CpuStorage, CudaStorage, DType, InplaceOp1, Layout, Result, Tensor};
use half::bf16;

const FLASH_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/flash_attention.ptx"));

/// Launch shape and limit, as fixed in the kernel's source.
const FLASH_THREADS: u32 = 128;
const FLASH_QUERIES: usize = 32;
const FLASH_MAX_HEAD_DIM: usize = 128;

/// Whether the flash kernel handles this shape (it is bf16-only: tensor cores).
pub fn flash_supported(dtype: DType, head_dim: usize) -> bool {
    dtype == DType::BF16 && head_dim <= FLASH_MAX_HEAD_DIM
}

/// Flash attention of `q` [batch, queries, heads, head_dim] over `k`, `v`
/// [batch, keys, kv_heads, head_dim] into a new [batch, queries, heads, head_dim] tensor.
/// The inputs may be strided views (the head dimension contiguous); `causal` makes the
/// queries the last `queries` positions of the keys' sequence.
pub fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor, causal: bool) -> Result<Tensor> {
    let out = Tensor::zeros(q.shape(), q.dtype(), q.device())?;
    flash_attention_into(&out, q, k, v, causal)?;
    Ok(out)
}

/// [`flash_attention`] into `out`, which must be contiguous and shaped like `q`.
pub fn flash_attention_into(
    out: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal: bool,
) -> Result<()> {
    let (batch, queries, heads, head_dim) = q.dims4()?;
    let (k_batch, keys, kv_heads, k_dim) = k.dims4()?;
    if out.dims() != q.dims()
        || !out.is_contiguous()
        || v.dims() != k.dims()
        || k_batch != batch
        || k_dim != head_dim
        || kv_heads == 0
        || heads % kv_heads != 0
        || (causal && keys < queries)
    {
        bail!("flash attention: inconsistent shapes");
    }
    for t in [out, q, k, v] {
        if t.dtype() != q.dtype() || t.stride()[3] != 1 {
            bail!("flash attention: inputs must be of one dtype with a contiguous head dimension");
        }
    }
    if !flash_supported(q.dtype(), head_dim) {
        bail!(
            "flash attention: {:?} with head_dim {head_dim} is not supported",
            q.dtype()
        );
    }
    if queries == 0 {
        return Ok(());
    }
    out.inplace_op1(&FlashAttention {
        q,
        k,
        v,
        causal,
        scale: (head_dim as f32).powf(-0.5),
    })
}

struct FlashAttention<'a> {
    q: &'a Tensor,
    k: &'a Tensor,
    v: &'a Tensor,
    causal: bool,
    scale: f32,
}

impl InplaceOp1 for FlashAttention<'_> {
    fn name(&self) -> &'static str {
        "flash-attention"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> Result<()> {
        no_cpu(self.name())
    }

    fn cuda_fwd(&self, out: &mut CudaStorage, out_layout: &Layout) -> Result<()> {
        let (batch, queries, heads, head_dim) = self.q.dims4()?;
        let (_, keys, kv_heads, _) = self.k.dims4()?;
        let (q, q_l) = self.q.storage_and_layout();
        let (k, k_l) = self.k.storage_and_layout();
        let (v, v_l) = self.v.storage_and_layout();
        let strides = |l: &Layout| -> [i64; 3] {
            let s = l.stride();
            [s[0] as i64, s[1] as i64, s[2] as i64]
        };
        let (qs, ks, vs) = (strides(q_l), strides(k_l), strides(v_l));
        let q = view::<bf16>(&q, q_l)?;
        let k = view::<bf16>(&k, k_l)?;
        let v = view::<bf16>(&v, v_l)?;
        let device = out.device().clone();
        let mut out = out
            .as_cuda_slice_mut::<bf16>()?
            .slice_mut(out_layout.start_offset()..);
        let func = device.get_or_load_custom_func(
            "flash_attention_bf16",
            "internvl_flash_attention",
            FLASH_PTX,
        )?;
        let (queries_i, keys_i, heads_i, kv_heads_i, head_dim_i, causal) = (
            queries as i32,
            keys as i32,
            heads as i32,
            kv_heads as i32,
            head_dim as i32,
            i32::from(self.causal),
        );
        let mut builder = func.builder();
        builder.arg(&mut out);
        builder.arg(&q);
        builder.arg(&k);
        builder.arg(&v);
        for s in qs.iter().chain(&ks).chain(&vs) {
            builder.arg(s);
        }
        builder.arg(&queries_i);
        builder.arg(&keys_i);
        builder.arg(&heads_i);
        builder.arg(&kv_heads_i);
        builder.arg(&head_dim_i);
        builder.arg(&self.scale);
        builder.arg(&causal);
        let config = LaunchConfig {
            grid_dim: (
                queries.div_ceil(FLASH_QUERIES) as u32,
                heads as u32,
                batch as u32,
            ),
            block_dim: (FLASH_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the argument list matches the kernel's signature and the shapes and
        // strides were checked by `flash_attention_into`.
        unsafe { builder.launch(config) }.w()?;
        Ok(())
    }
}
