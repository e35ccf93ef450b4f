//! Linear layers whose weights are stored the way the device's matmul reads them fastest.
//!
//! A checkpoint holds each weight as [out, in], and candle multiplies by its transposed view.
//! On the CPU the `gemm` crate then repacks that view element by element on every call — a
//! third of a decode step at 16 sequences went there — because it streams weights as
//! [in, out] rows. So on the CPU each weight is transposed once, at load; elsewhere (cuBLAS
//! reads either layout at full speed) it stays as loaded.

use crate::random_weights::is_stand_in;
use candle_core::{Result, Tensor, D};
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
pub struct Linear {
    /// [in, out] when `in_out`, else [out, in].
    weight: Tensor,
    bias: Option<Tensor>,
    in_out: bool,
}

impl Linear {
    /// `weight` [out, in] as in the checkpoint; `bias` [out].
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let stand_in = is_stand_in(&weight);
        let in_out = weight.device().is_cpu();
        let weight = match (in_out, stand_in) {
            (true, false) => weight.t()?.contiguous()?,
            (true, true) => weight.t()?,
            (false, _) => weight,
        };
        Ok(Self {
            weight,
            bias,
            in_out,
        })
    }

    /// `x` [..., in] → [..., out]: one matmul over all leading dimensions.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut dims = x.dims().to_vec();
        let in_dim = x.dim(D::Minus1)?;
        let rows = x.elem_count() / in_dim.max(1);
        let weight = if self.in_out {
            self.weight.clone()
        } else {
            self.weight.t()?
        };
        let y = x.reshape((rows, in_dim))?.matmul(&weight)?;
        let y = match &self.bias {
            Some(bias) => y.broadcast_add(bias)?,
            None => y,
        };
        if let Some(last) = dims.last_mut() {
            *last = y.dim(1)?;
        }
        y.reshape(dims)
    }
}

/// `vb.pp(name)`'s `weight` [out, in] and, if `bias`, its `bias` [out].
pub fn linear_b(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let weight = vb.get((out_dim, in_dim), "weight")?;
    let bias = bias.then(|| vb.get(out_dim, "bias")).transpose()?;
    Linear::new(weight, bias)
}

pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    linear_b(in_dim, out_dim, true, vb)
}

pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    linear_b(in_dim, out_dim, false, vb)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Equals x·Wᵀ + b over leading dimensions, whatever the stored layout.
    #[test]
    fn matches_the_checkpoint_layout_product() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (7, 5), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 7, &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 3, 5), &dev).unwrap();
        let ours = Linear::new(w.clone(), Some(b.clone()))
            .unwrap()
            .forward(&x)
            .unwrap();
        assert_eq!(ours.dims(), &[2, 3, 7]);
        let expected = x
            .reshape((6, 5))
            .unwrap()
            .matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap()
            .reshape((2, 3, 7))
            .unwrap();
        let diff: f32 = crate::test_util::max_difference(&ours, &expected);
        assert!(diff < 1e-5, "max difference {diff}");
    }

    #[test]
    fn stand_ins_stay_views() {
        let dev = Device::Cpu;
        let stand_in = Tensor::zeros((), DType::F32, &dev)
            .unwrap()
            .broadcast_as((4096, 1024))
            .unwrap();
        let layer = Linear::new(stand_in, None).unwrap();
        assert!(is_stand_in(&layer.weight));
        assert_eq!(layer.weight.dims(), &[1024, 4096]);
    }
}
