//! The project's CUDA kernels (kernels/*.cu, compiled to PTX by build.rs) as in-place candle
//! ops: paged attention over the KV cache for short query runs, and flash attention for long
//! ones (vision encoder, LLM prefill). They write into an output tensor the caller provides,
//! so a check can poison it first and see what the kernel left unwritten.

use crate::paged_plan::PagedQueries;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{
    bail, CpuStorage, CudaStorage, DType, Device, InplaceOp1, Layout, Result, Storage, Tensor,
};
use half::bf16;

const PAGED_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/paged_attention.ptx"));
const FLASH_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/flash_attention.ptx"));

/// Launch shapes and limits, as fixed in the kernels' sources.
const PAGED_THREADS: u32 = 128;
const PAGED_MAX_HEAD_DIM: usize = 256;
const FLASH_THREADS: u32 = 128;
const FLASH_QUERIES: usize = 32;
const FLASH_MAX_HEAD_DIM: usize = 128;
/// The paged kernel keeps one f32 score per context position in dynamic shared memory, next
/// to its 5 KiB of static shared memory (ptxas: 5136 bytes), within the 48 KiB a launch gets
/// without opting in.
const PAGED_MAX_CONTEXT: usize = (42 * 1024) / 4;

/// Whether the paged kernel handles this dtype and head size (otherwise: gather + matmul).
pub fn paged_supported(dtype: DType, head_dim: usize) -> bool {
    matches!(dtype, DType::F32 | DType::BF16) && head_dim <= PAGED_MAX_HEAD_DIM
}

/// Whether the paged kernel's shared memory holds a batch whose longest context is
/// `max_context` (otherwise: gather + matmul or flash, for that batch).
pub fn paged_context_fits(max_context: usize) -> bool {
    max_context <= PAGED_MAX_CONTEXT
}

/// Whether the flash kernel handles this shape (it is bf16-only: tensor cores).
pub fn flash_supported(dtype: DType, head_dim: usize) -> bool {
    dtype == DType::BF16 && head_dim <= FLASH_MAX_HEAD_DIM
}

/// A [`PagedQueries`] copied to the device once per forward, read by every layer.
pub struct DevicePagedQueries {
    block_tables: Tensor,
    query_rows: Tensor,
    context_lens: Tensor,
    table_starts: Tensor,
    queries: usize,
    max_context: usize,
}

impl DevicePagedQueries {
    pub fn new(plan: &PagedQueries, device: &Device) -> Result<Self> {
        let upload = |xs: &[u32]| Tensor::new(xs, device);
        Ok(Self {
            // An empty table still needs a valid pointer.
            block_tables: upload(if plan.block_tables.is_empty() {
                &[0]
            } else {
                &plan.block_tables
            })?,
            query_rows: upload(&plan.query_rows)?,
            context_lens: upload(&plan.context_lens)?,
            table_starts: upload(&plan.table_starts)?,
            queries: plan.query_rows.len(),
            max_context: plan.max_context,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.queries == 0
    }
}

fn cuda_storage(storage: &Storage) -> Result<&CudaStorage> {
    match storage {
        Storage::Cuda(s) => Ok(s),
        _ => bail!("the CUDA kernels need every input on the GPU"),
    }
}

/// The elements of a CUDA tensor from its layout's start on.
fn view<'a, T: CudaDType>(storage: &'a Storage, layout: &Layout) -> Result<CudaView<'a, T>> {
    Ok(cuda_storage(storage)?
        .as_cuda_slice::<T>()?
        .slice(layout.start_offset()..))
}

fn no_cpu(name: &str) -> Result<()> {
    bail!("{name} is a CUDA kernel; the CPU has its own attention path")
}

/// Writes attention outputs of the queries `plan` lists into their rows of `out`
/// [rows, heads, head_dim]; `q` is [rows, heads, head_dim], the caches
/// [slots, kv_heads, head_dim], all contiguous and of one dtype (f32 or bf16).
pub fn paged_attention_into(
    out: &Tensor,
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    plan: &DevicePagedQueries,
    block_size: usize,
    scale: f32,
) -> Result<()> {
    let (rows, heads, head_dim) = q.dims3()?;
    let (_, kv_heads, kv_dim) = k_cache.dims3()?;
    if out.dims3()? != (rows, heads, head_dim)
        || v_cache.dims() != k_cache.dims()
        || kv_dim != head_dim
        || kv_heads == 0
        || heads % kv_heads != 0
    {
        bail!("paged attention: inconsistent shapes");
    }
    for t in [out, q, k_cache, v_cache] {
        if !t.is_contiguous() || t.dtype() != q.dtype() {
            bail!("paged attention: inputs must be contiguous and of one dtype");
        }
    }
    if !paged_supported(q.dtype(), head_dim) || !paged_context_fits(plan.max_context) {
        bail!(
            "paged attention: {:?} with head_dim {head_dim} and context {} is not supported",
            q.dtype(),
            plan.max_context
        );
    }
    if plan.is_empty() {
        return Ok(());
    }
    out.inplace_op1(&PagedAttention {
        q,
        k_cache,
        v_cache,
        plan,
        heads,
        kv_heads,
        head_dim,
        block_size,
        scale,
    })
}

struct PagedAttention<'a> {
    q: &'a Tensor,
    k_cache: &'a Tensor,
    v_cache: &'a Tensor,
    plan: &'a DevicePagedQueries,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
    scale: f32,
}

impl PagedAttention<'_> {
    fn launch<T: CudaDType + DeviceRepr>(
        &self,
        out: &mut CudaStorage,
        out_layout: &Layout,
        kernel: &str,
    ) -> Result<()> {
        let (q, q_l) = self.q.storage_and_layout();
        let (k, k_l) = self.k_cache.storage_and_layout();
        let (v, v_l) = self.v_cache.storage_and_layout();
        let (tables, tables_l) = self.plan.block_tables.storage_and_layout();
        let (rows, rows_l) = self.plan.query_rows.storage_and_layout();
        let (lens, lens_l) = self.plan.context_lens.storage_and_layout();
        let (starts, starts_l) = self.plan.table_starts.storage_and_layout();
        let q = view::<T>(&q, q_l)?;
        let k = view::<T>(&k, k_l)?;
        let v = view::<T>(&v, v_l)?;
        let tables = view::<u32>(&tables, tables_l)?;
        let rows = view::<u32>(&rows, rows_l)?;
        let lens = view::<u32>(&lens, lens_l)?;
        let starts = view::<u32>(&starts, starts_l)?;
        let device = out.device().clone();
        let mut out = out
            .as_cuda_slice_mut::<T>()?
            .slice_mut(out_layout.start_offset()..);
        let func = device.get_or_load_custom_func(kernel, "internvl_paged_attention", PAGED_PTX)?;
        let (heads, kv_heads, head_dim, block_size) = (
            self.heads as i32,
            self.kv_heads as i32,
            self.head_dim as i32,
            self.block_size as i32,
        );
        let mut builder = func.builder();
        builder.arg(&mut out);
        builder.arg(&q);
        builder.arg(&k);
        builder.arg(&v);
        builder.arg(&tables);
        builder.arg(&rows);
        builder.arg(&lens);
        builder.arg(&starts);
        builder.arg(&heads);
        builder.arg(&kv_heads);
        builder.arg(&head_dim);
        builder.arg(&block_size);
        builder.arg(&self.scale);
        let config = LaunchConfig {
            grid_dim: (self.heads as u32, self.plan.queries as u32, 1),
            block_dim: (PAGED_THREADS, 1, 1),
            shared_mem_bytes: (self.plan.max_context * 4) as u32,
        };
        // SAFETY: the argument list matches the kernel's signature; shapes were checked by
        // `paged_attention_into` and every slot the block tables name lies in the caches
        // (checked when the batch was planned).
        unsafe { builder.launch(config) }.w()?;
        Ok(())
    }
}

impl InplaceOp1 for PagedAttention<'_> {
    fn name(&self) -> &'static str {
        "paged-attention"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> Result<()> {
        no_cpu(self.name())
    }

    fn cuda_fwd(&self, out: &mut CudaStorage, layout: &Layout) -> Result<()> {
        match self.q.dtype() {
            DType::F32 => self.launch::<f32>(out, layout, "paged_attention_f32"),
            DType::BF16 => self.launch::<bf16>(out, layout, "paged_attention_bf16"),
            dtype => bail!("paged attention: no kernel for {dtype:?}"),
        }
    }
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
