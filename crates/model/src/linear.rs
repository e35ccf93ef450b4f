//! Linear layers whose weights are stored the way the device's matmul reads them fastest.
//!
//! A checkpoint holds each weight as [out, in], and candle multiplies by its transposed view.
//! On the CPU the `gemm` crate then repacks that view element by element on every call — a
//! third of a decode step at 16 sequences went there — because it streams weights as
//! [in, out] rows. So on the CPU each weight is transposed once, at load; elsewhere (cuBLAS
//! reads either layout at full speed) it stays as loaded. [`LinearKind`], chosen with the model's
//! backends, says which; another way of keeping weights is one more kind here.

use candle_core::{Result, Tensor, D};
use candle_nn::VarBuilder;

/// How a linear layer keeps its weight, chosen with the model's backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinearKind {
    /// Transposed once at load to [in, out], the rows the CPU's `gemm` streams.
    InOut,
    /// [out, in] as in the checkpoint, multiplied through its transposed view (cuBLAS reads
    /// either layout at full speed).
    AsLoaded,
}

/// A weight in the layout its [`LinearKind`] keeps.
#[derive(Debug, Clone)]
enum Weight {
    /// [in, out].
    InOut(Tensor),
    /// [out, in].
    AsLoaded(Tensor),
}

#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

impl Linear {
    /// `weight` [out, in] as in the checkpoint; `bias` [out].
    pub fn new(weight: Tensor, bias: Option<Tensor>, kind: LinearKind) -> Result<Self> {
        let weight = match kind {
            LinearKind::InOut => Weight::InOut(weight.t()?.contiguous()?),
            LinearKind::AsLoaded => Weight::AsLoaded(weight),
        };
        Ok(Self { weight, bias })
    }

    /// `x` [..., in] → [..., out]: one matmul over all leading dimensions.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut dims = x.dims().to_vec();
        let in_dim = x.dim(D::Minus1)?;
        let rows = x.elem_count() / in_dim.max(1);
        let x = x.reshape((rows, in_dim))?;
        let y = match &self.weight {
            Weight::InOut(w) => x.matmul(w)?,
            Weight::AsLoaded(w) => x.matmul(&w.t()?)?,
        };
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
pub fn linear_b(
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    kind: LinearKind,
    vb: VarBuilder,
) -> Result<Linear> {
    let weight = vb.get((out_dim, in_dim), "weight")?;
    let bias = bias.then(|| vb.get(out_dim, "bias")).transpose()?;
    Linear::new(weight, bias, kind)
}

pub fn linear(in_dim: usize, out_dim: usize, kind: LinearKind, vb: VarBuilder) -> Result<Linear> {
    linear_b(in_dim, out_dim, true, kind, vb)
}

pub fn linear_no_bias(
    in_dim: usize,
    out_dim: usize,
    kind: LinearKind,
    vb: VarBuilder,
) -> Result<Linear> {
    linear_b(in_dim, out_dim, false, kind, vb)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Equals x·Wᵀ + b over leading dimensions, whatever the stored layout.
    #[test]
    fn matches_the_checkpoint_layout_product() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (7, 5), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 7, &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 3, 5), &dev).unwrap();
        let expected = x
            .reshape((6, 5))
            .unwrap()
            .matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap()
            .reshape((2, 3, 7))
            .unwrap();
        for kind in [LinearKind::InOut, LinearKind::AsLoaded] {
            let ours = Linear::new(w.clone(), Some(b.clone()), kind)
                .unwrap()
                .forward(&x)
                .unwrap();
            assert_eq!(ours.dims(), &[2, 3, 7]);
            let diff: f32 = crate::test_util::max_difference(&ours, &expected);
            assert!(diff < 1e-5, "{kind:?}: max difference {diff}");
        }
    }
}
