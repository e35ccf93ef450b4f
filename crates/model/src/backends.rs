//! Where and how the model computes, decided once before it is built.
//!
//! [`Backends::resolve`] takes what the binary's settings name (device, optional dtype,
//! [`AttentionChoice`]) and fixes the compute dtype, the attention backend, the linear-layer
//! kind and the bodies of the elementwise ops. Every model constructor takes the result, so
//! no layer probes its device or dtype per call, and an impossible combination fails here,
//! before any weight is read.

use crate::attention_backend::{AttentionBackend, AttentionChoice};
use crate::cpu_ops::Elementwise;
use crate::linear::{DenseLayout, LinearKind, QuantKernels};
use crate::quant::{Quantization, WeightQuant};
use candle_core::{DType, Device};

/// Why a device, dtype and attention choice do not go together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    #[error("bf16 compute is not supported on the CPU (candle's CPU matmul lacks it): use f32, the default")]
    Bf16OnCpu,
    #[error("attention `kernels` needs a CUDA device; {0}")]
    NoKernels(&'static str),
    #[error("a {kv:?} KV cache needs {why}")]
    KvDtype { kv: DType, why: &'static str },
}

/// The resolved choices every layer of the model is built with.
#[derive(Debug, Clone)]
pub struct Backends {
    device: Device,
    dtype: DType,
    attention: AttentionBackend,
    layout: DenseLayout,
    quant_kernels: QuantKernels,
    quantization: Quantization,
    /// The KV cache's element type: the compute dtype unless `with_kv_dtype` says otherwise.
    kv_dtype: DType,
    elementwise: Elementwise,
}

impl Backends {
    /// The backends for `device`, computing in `dtype` (default: f32 on the CPU, where candle
    /// widens bf16 on every matmul, and bf16 elsewhere, the checkpoint's own precision).
    pub fn resolve(
        device: &Device,
        dtype: Option<DType>,
        attention: AttentionChoice,
    ) -> Result<Self, BackendError> {
        let cpu = device.is_cpu();
        let dtype = dtype.unwrap_or(if cpu { DType::F32 } else { DType::BF16 });
        if cpu && dtype == DType::BF16 {
            return Err(BackendError::Bf16OnCpu);
        }
        let attention = match (attention, cpu) {
            (AttentionChoice::Matmul, _) => AttentionBackend::Matmul,
            (AttentionChoice::Kernels, true) => {
                return Err(BackendError::NoKernels(
                    "the kernels are CUDA's, this is the CPU",
                ))
            }
            (_, true) if dtype == DType::F32 => AttentionBackend::CpuF32,
            (AttentionChoice::Auto, true) => AttentionBackend::Matmul,
            (_, false) => gpu_attention(attention)?,
        };
        Ok(Self {
            device: device.clone(),
            dtype,
            attention,
            layout: if cpu {
                DenseLayout::InOut
            } else {
                DenseLayout::AsLoaded
            },
            quant_kernels: if cpu && crate::vnni_weight::available() {
                QuantKernels::VnniTiles
            } else {
                QuantKernels::Candle
            },
            quantization: Quantization::default(),
            kv_dtype: dtype,
            elementwise: Elementwise::new(cpu, dtype),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn attention(&self) -> AttentionBackend {
        self.attention
    }

    /// These backends with the language model's linear layers and the vision encoder's
    /// quantized as `quantization` says. Embeddings, norms and the projector stay dense:
    /// together under 2 % of the weights, and the projector is the bridge every visual token
    /// crosses.
    pub fn with_quantization(mut self, quantization: Quantization) -> Self {
        self.quantization = quantization;
        self
    }

    pub fn quantization(&self) -> Quantization {
        self.quantization
    }

    /// These backends with the KV cache in `kv` (`None`: the compute dtype). On the CPU in
    /// f32, f16 and bf16 caches halve the bytes decode attention reads; its in-place attention
    /// widens each slot's row as it reads it, and the long-prefill path its gathered context.
    /// Elsewhere the attention reads the cache in the compute dtype, so only that is taken.
    pub fn with_kv_dtype(mut self, kv: Option<DType>) -> Result<Self, BackendError> {
        let kv = kv.unwrap_or(self.dtype);
        let cpu_f32 = self.device.is_cpu() && self.dtype == DType::F32;
        let ok = kv == self.dtype || cpu_f32 && matches!(kv, DType::F16 | DType::BF16);
        if !ok {
            return Err(BackendError::KvDtype {
                kv,
                why: if cpu_f32 {
                    "f32, f16 or bf16 on the CPU"
                } else {
                    "the compute dtype here (a 16-bit KV cache with f32 compute is the CPU's)"
                },
            });
        }
        self.kv_dtype = kv;
        Ok(self)
    }

    pub fn kv_dtype(&self) -> DType {
        self.kv_dtype
    }

    /// A layer that stays dense (the projector).
    pub fn dense_linear(&self) -> LinearKind {
        LinearKind::dense(self.layout)
    }

    /// The language model's decoder layers.
    pub fn llm_linear(&self) -> LinearKind {
        self.quantized_linear(self.quantization.llm)
    }

    /// The LM head: at least q6k when the decoder layers are quantized
    /// ([`WeightQuant::for_lm_head`]).
    pub fn lm_head_linear(&self) -> LinearKind {
        self.quantized_linear(self.quantization.llm.map(WeightQuant::for_lm_head))
    }

    /// The vision encoder's layers.
    pub fn vision_linear(&self) -> LinearKind {
        self.quantized_linear(self.quantization.vision)
    }

    fn quantized_linear(&self, quant: Option<WeightQuant>) -> LinearKind {
        LinearKind {
            layout: self.layout,
            quant,
            kernels: self.quant_kernels,
        }
    }

    pub(crate) fn elementwise(&self) -> Elementwise {
        self.elementwise
    }
}

/// `auto` or `kernels` on a GPU: the kernels where the build has them.
#[cfg(feature = "cuda")]
fn gpu_attention(_: AttentionChoice) -> Result<AttentionBackend, BackendError> {
    Ok(AttentionBackend::CudaKernels)
}

/// `auto` or `kernels` on a GPU in a build without the kernels: `auto` takes the matmul path.
#[cfg(not(feature = "cuda"))]
fn gpu_attention(choice: AttentionChoice) -> Result<AttentionBackend, BackendError> {
    match choice {
        AttentionChoice::Kernels => Err(BackendError::NoKernels(
            "this build has no kernels (build with the `cuda` feature)",
        )),
        _ => Ok(AttentionBackend::Matmul),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu(dtype: Option<DType>, choice: AttentionChoice) -> Result<Backends, BackendError> {
        Backends::resolve(&Device::Cpu, dtype, choice)
    }

    #[test]
    fn sixteen_bit_kv_caches_are_the_cpus_in_f32() {
        let f32_cpu = cpu(None, AttentionChoice::Auto).unwrap();
        for kv in [DType::F16, DType::BF16, DType::F32] {
            let b = f32_cpu.clone().with_kv_dtype(Some(kv)).unwrap();
            assert_eq!(b.kv_dtype(), kv);
        }
        assert_eq!(
            f32_cpu.clone().with_kv_dtype(None).unwrap().kv_dtype(),
            DType::F32
        );
        assert!(f32_cpu.with_kv_dtype(Some(DType::F64)).is_err());
        let f16_cpu = cpu(Some(DType::F16), AttentionChoice::Auto).unwrap();
        let err = f16_cpu.with_kv_dtype(Some(DType::BF16)).unwrap_err();
        assert!(err.to_string().contains("compute dtype"), "{err}");
    }

    #[test]
    fn the_cpu_defaults_to_f32_and_its_own_attention() {
        let backends = cpu(None, AttentionChoice::Auto).unwrap();
        assert_eq!(backends.dtype(), DType::F32);
        assert_eq!(backends.attention(), AttentionBackend::CpuF32);
        assert_eq!(
            backends.dense_linear(),
            LinearKind::dense(DenseLayout::InOut)
        );
        assert_eq!(backends.llm_linear().quant, None);
        // Quantized layers go to the VNNI tiles exactly where this CPU has the instructions.
        let tiles = crate::vnni_weight::available();
        for kind in [
            backends.llm_linear(),
            backends.lm_head_linear(),
            backends.vision_linear(),
        ] {
            assert_eq!(kind.kernels == QuantKernels::VnniTiles, tiles);
        }
        assert_eq!(backends.kv_dtype(), DType::F32);
        assert_eq!(backends.elementwise(), Elementwise::CpuF32);
    }

    /// The in-place CPU attention is f32 only: other dtypes take candle's matmuls.
    #[test]
    fn other_cpu_dtypes_use_matmuls() {
        let backends = cpu(Some(DType::F16), AttentionChoice::Auto).unwrap();
        assert_eq!(backends.attention(), AttentionBackend::Matmul);
        assert_eq!(backends.elementwise(), Elementwise::CpuSoftmax);
        let matmul = cpu(None, AttentionChoice::Matmul).unwrap();
        assert_eq!(matmul.attention(), AttentionBackend::Matmul);
    }

    #[test]
    fn impossible_combinations_are_refused() {
        assert_eq!(
            cpu(Some(DType::BF16), AttentionChoice::Auto).unwrap_err(),
            BackendError::Bf16OnCpu
        );
        let error = cpu(None, AttentionChoice::Kernels).unwrap_err();
        assert!(matches!(error, BackendError::NoKernels(_)), "{error}");
    }
}
