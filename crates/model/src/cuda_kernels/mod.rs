//! The project's CUDA kernels (kernels/*.cu, compiled to PTX by build.rs) as in-place candle
//! ops: paged attention over the KV cache for short query runs ([`paged`]), and flash
//! attention for long ones (vision encoder, LLM prefill; [`flash`]). They write into an output
//! tensor the caller provides, so a check can poison it first and see what the kernel left
//! unwritten. This module holds what both launchers share.

mod flash;
mod paged;

pub use flash::{flash_attention, flash_attention_into, flash_supported};
pub use paged::{paged_attention_into, paged_context_fits, paged_supported, DevicePagedQueries};

use candle_core::cuda_backend::cudarc::driver::CudaView;
use candle_core::cuda_backend::CudaDType;
use candle_core::{bail, CudaStorage, Layout, Result, Storage};

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
