//! candle ops given vectorised CPU bodies ([`crate::cpu_math`]) for f32: the exact GELU of the
//! vision encoder's MLP and projector, the softmax of the matmul attention (long prefills) and
//! LLaMA's silu(gate) · up. candle's CPU versions call libm's scalar `erff` / `expf` per element
//! (GELU alone was 9 % of the vision encoder's time), and silu · up took two extra passes.
//! [`Elementwise`], chosen with the model's backends, says which ops take these bodies; other
//! devices and dtypes keep candle's ops.

use crate::cpu_math;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Elements per parallel task: large enough to amortise a task, small enough to spread.
const CHUNK: usize = 1 << 14;

/// Which bodies the elementwise ops run, fixed when the model is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elementwise {
    /// candle's ops: every device but the CPU.
    Candle,
    /// The CPU computing in another dtype than f32: the activations stay candle's, while the
    /// softmax of the matmul attention, whose scores are always f32, is vectorised.
    CpuSoftmax,
    /// The CPU in f32: every op vectorised.
    CpuF32,
}

impl Elementwise {
    pub fn new(cpu: bool, dtype: DType) -> Self {
        match (cpu, dtype) {
            (false, _) => Self::Candle,
            (true, DType::F32) => Self::CpuF32,
            (true, _) => Self::CpuSoftmax,
        }
    }

    /// `x · Φ(x)`, elementwise.
    pub fn gelu_erf(self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::CpuF32 => xs.contiguous()?.apply_op1_no_bwd(&GeluErf),
            Self::Candle | Self::CpuSoftmax => xs.gelu_erf(),
        }
    }

    /// Softmax over the last dimension of f32 `xs` (attention scores).
    pub fn softmax_last_dim(self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::CpuF32 | Self::CpuSoftmax => xs.contiguous()?.apply_op1_no_bwd(&SoftmaxLastDim),
            Self::Candle => candle_nn::ops::softmax_last_dim(xs),
        }
    }

    /// `gate_up` [rows, 2 · width] (gate and up projections side by side) → silu(gate) · up
    /// [rows, width].
    pub fn silu_mul(self, gate_up: &Tensor) -> Result<Tensor> {
        match self {
            Self::CpuF32 => gate_up.contiguous()?.apply_op1_no_bwd(&SiluMul),
            Self::Candle | Self::CpuSoftmax => {
                let width = gate_up.dim(1)? / 2;
                let gate = candle_nn::ops::silu(&gate_up.narrow(1, 0, width)?)?;
                gate * gate_up.narrow(1, width, width)?
            }
        }
    }
}

struct SiluMul;

impl CustomOp1 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul-vectorised"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let data = input_f32(self.name(), storage, layout)?;
        let (rows, double) = layout.shape().dims2()?;
        if double % 2 != 0 {
            candle_core::bail!("silu-mul-vectorised: odd width {double}");
        }
        let width = double / 2;
        let mut out = vec![0f32; rows * width];
        out.par_chunks_mut(width)
            .zip(data.par_chunks(double))
            .for_each(|(out, row)| cpu_math::silu_mul(&row[..width], &row[width..], out));
        Ok((CpuStorage::F32(out), Shape::from((rows, width))))
    }
}

/// The input's elements, in order: the ops above only take contiguous f32.
fn input_f32<'a>(op: &str, storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: f32 only");
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: the input is not contiguous"),
    }
}

struct SoftmaxLastDim;

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "softmax-last-dim-vectorised"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut out = input_f32(self.name(), storage, layout)?.to_vec();
        let width = layout.shape().dims().last().copied().unwrap_or(1).max(1);
        let rows_per_task = CHUNK.div_ceil(width).max(1);
        out.par_chunks_mut(rows_per_task * width)
            .for_each(|rows| cpu_math::softmax_rows(rows, width));
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "gelu-erf-vectorised"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut out = input_f32(self.name(), storage, layout)?.to_vec();
        out.par_chunks_mut(CHUNK).for_each(cpu_math::gelu_erf);
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::max_difference;
    use candle_core::Device;

    /// Within f32 rounding of candle's libm GELU, on a strided input too.
    #[test]
    fn matches_candles_gelu() {
        let x = Tensor::randn(0f32, 3.0, (64, 300), &Device::Cpu).unwrap();
        let x = x.t().unwrap();
        let diff = max_difference(
            &Elementwise::CpuF32.gelu_erf(&x).unwrap(),
            &x.gelu_erf().unwrap(),
        );
        assert!(diff < 5e-6, "max difference {diff}");
    }

    /// Within f32 rounding of candle's silu · up, on a strided input.
    #[test]
    fn matches_candles_silu_mul() {
        let gate_up = Tensor::randn(0f32, 3.0, (10, 6), &Device::Cpu).unwrap();
        let gate_up = gate_up.t().unwrap();
        let ours = Elementwise::CpuF32.silu_mul(&gate_up).unwrap();
        assert_eq!(ours.dims(), &[6, 5]);
        let gate = candle_nn::ops::silu(&gate_up.narrow(1, 0, 5).unwrap()).unwrap();
        let expected = (gate * gate_up.narrow(1, 5, 5).unwrap()).unwrap();
        let diff = max_difference(&ours, &expected);
        assert!(diff < 5e-6, "max difference {diff}");
    }

    /// Within f32 rounding of candle's softmax, masked (−∞) entries included, on a strided
    /// input and on rows narrower than a vector.
    #[test]
    fn matches_candles_softmax() {
        for (rows, width) in [(40, 311), (7, 3)] {
            let x = Tensor::randn(0f32, 4.0, (width, rows), &Device::Cpu).unwrap();
            let x = x.t().unwrap();
            let mask: Vec<f32> = (0..rows * width)
                .map(|i| if i % 5 == 4 { f32::NEG_INFINITY } else { 0.0 })
                .collect();
            let mask = Tensor::from_vec(mask, (rows, width), &Device::Cpu).unwrap();
            let x = x.broadcast_add(&mask).unwrap();
            let ours = Elementwise::CpuF32.softmax_last_dim(&x).unwrap();
            let diff = max_difference(&ours, &candle_nn::ops::softmax_last_dim(&x).unwrap());
            assert!(diff < 1e-6, "max difference {diff}");
        }
    }
}
