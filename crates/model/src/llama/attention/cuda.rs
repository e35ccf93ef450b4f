//! The CUDA arm of LLaMA's attention: one paged-kernel launch for every short run of a batch,
//! flash attention over the gathered context for each long one.
//!
//! Which kernels a layer may use is fixed at build ([`CudaKernels`], from the dtype and head
//! size); whether the paged kernel takes a batch also depends on its longest context, so that
//! is decided per batch, when [`CudaPlan`] is made.

use super::{Attention, BatchPlan, IN_PLACE_MAX_QUERIES};
use crate::cuda_kernels::{
    flash_attention_into, flash_supported, paged_attention_into, paged_context_fits,
    paged_supported, DevicePagedQueries,
};
use crate::kv_cache::SequenceSlice;
use crate::paged_plan::PagedQueries;
use candle_core::{DType, Device, Result, Tensor};

/// The kernels that take the model's dtype and head size.
#[derive(Debug, Clone, Copy)]
pub(in crate::llama) struct CudaKernels {
    paged: bool,
    flash: bool,
}

impl CudaKernels {
    pub(in crate::llama) fn new(dtype: DType, head_dim: usize) -> Self {
        Self {
            paged: paged_supported(dtype, head_dim),
            flash: flash_supported(dtype, head_dim),
        }
    }
}

/// What the CUDA kernels need of one batch, uploaded once for all layers.
pub(in crate::llama) struct CudaPlan {
    /// Short runs for the paged kernel; `None` where it cannot take this batch.
    paged: Option<DevicePagedQueries>,
    /// Per sequence, the slots of its context where it is gathered (the runs the paged
    /// kernel does not take).
    gather_slots: Vec<Option<Tensor>>,
    flash: bool,
    block_size: usize,
}

impl CudaPlan {
    pub(in crate::llama) fn new(
        kernels: CudaKernels,
        slices: &[SequenceSlice],
        read_slots: &[Vec<u32>],
        block_size: usize,
        device: &Device,
    ) -> Result<Self> {
        let queries = PagedQueries::new(slices, IN_PLACE_MAX_QUERIES);
        let paged =
            (kernels.paged && !queries.is_empty() && paged_context_fits(queries.max_context))
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
            flash: kernels.flash,
            block_size,
        })
    }
}

impl Attention {
    /// CUDA attention of the packed `q` [t, heads, hd]: one paged-kernel launch for every short
    /// run, flash attention over the gathered context for each long one (matmuls where the
    /// flash kernel does not apply, e.g. f32). Returns [t, heads, hd].
    pub(super) fn attend_cuda(
        &self,
        q: &Tensor,
        plan: &BatchPlan,
        cuda: &CudaPlan,
        cache: (&Tensor, &Tensor),
    ) -> Result<Tensor> {
        let hd = self.head_dim;
        let out = Tensor::zeros(q.shape(), q.dtype(), q.device())?;
        if let Some(paged) = &cuda.paged {
            let scale = (hd as f32).powf(-0.5);
            paged_attention_into(&out, q, cache.0, cache.1, paged, cuda.block_size, scale)?;
        }
        let mut offset = 0;
        for (slice, slots) in plan.slices.iter().zip(&cuda.gather_slots) {
            let rows = offset;
            offset += slice.len;
            let Some(slots) = slots else { continue };
            let q = q.narrow(0, rows, slice.len)?;
            if cuda.flash {
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
