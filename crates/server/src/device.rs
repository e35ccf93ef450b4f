//! Where the model runs and in which precision, as named on the command line.

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use std::path::PathBuf;

/// `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(name: &str) -> anyhow::Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(0).context("cannot open CUDA device 0"),
        _ => match name.strip_prefix("cuda:") {
            Some(n) => {
                let ordinal: usize = n.parse().with_context(|| format!("bad device `{name}`"))?;
                Device::new_cuda(ordinal)
                    .with_context(|| format!("cannot open CUDA device {ordinal}"))
            }
            None => bail!("unknown device `{name}` (expected cpu, cuda or cuda:N)"),
        },
    }
}

/// `f32`, `bf16` or `f16`; `auto` leaves the choice to the device.
pub fn parse_dtype(name: &str) -> anyhow::Result<Option<DType>> {
    match name {
        "auto" => Ok(None),
        "f32" | "float32" => Ok(Some(DType::F32)),
        "bf16" | "bfloat16" => Ok(Some(DType::BF16)),
        "f16" | "float16" => Ok(Some(DType::F16)),
        _ => bail!("unknown dtype `{name}` (expected auto, f32, bf16 or f16)"),
    }
}

/// The demo checkpoint shipped in the repository: random weights in the published layout.
pub fn demo_model_dir() -> PathBuf {
    match std::env::var_os("INTERNVL_DEMO_MODEL") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../models/demo-internvl"
        )),
    }
}

/// (free, total) bytes of the device's memory; `None` on the CPU.
pub fn memory_info(device: &Device) -> Option<(usize, usize)> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        return cuda.cuda_stream().context().mem_get_info().ok();
    }
    let _ = device;
    None
}
