//! The paged-attention kernel (kernels/paged_attention.cu): every short query run of a batch
//! in one launch, reading keys and values in place from the paged KV cache through the
//! sequences' block tables.

use super::{no_cpu, view};
use crate::paged_plan::PagedQueries;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{
    bail, CpuStorage, CudaStorage, DType, Device, InplaceOp1, Layout, Result, Tensor,
};
use half::bf16;

const PAGED_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/paged_attention.ptx"));

/// Launch shape and limits, as fixed in the kernel's source.
const PAGED_THREADS: u32 = 128;
const PAGED_MAX_HEAD_DIM: usize = 256;
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
