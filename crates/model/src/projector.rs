//! Pixel shuffle and the `mlp1` projector: ViT patch features → LLM embeddings.

use crate::backends::Backends;
use crate::config::PixelShuffleVersion;
use crate::cpu_ops::Elementwise;
use crate::linear::{linear, Linear};
use candle_core::{Module, Result, Tensor};
use candle_nn::{layer_norm, LayerNorm, VarBuilder};

/// Folds each `factor`×`factor` neighbourhood of the patch grid into the channels.
///
/// `xs` is [B, N, C] with N a square grid (CLS already dropped); the result is
/// [B, N / factor², C · factor²]. With `V1` the reduced grid stays transposed, exactly as
/// upstream trained V1.1: visual token `t` covers column `2·(t / g)` and row `2·(t % g)`.
pub fn pixel_shuffle(xs: &Tensor, factor: usize, version: PixelShuffleVersion) -> Result<Tensor> {
    let (b, n, c) = xs.dims3()?;
    let side = (n as f64).sqrt().round() as usize;
    if side * side != n || !side.is_multiple_of(factor) {
        candle_core::bail!(
            "pixel shuffle needs a square grid divisible by {factor}, got {n} tokens"
        );
    }
    let reduced = side / factor;
    // Upstream names the first grid axis `w` and the second `h`.
    let xs = xs
        .reshape((b, side, reduced, c * factor))?
        .permute((0, 2, 1, 3))?
        .contiguous()?
        .reshape((b, reduced, reduced, c * factor * factor))?;
    let xs = match version {
        PixelShuffleVersion::V1 => xs,
        PixelShuffleVersion::V2 => xs.permute((0, 2, 1, 3))?.contiguous()?,
    };
    xs.reshape((b, reduced * reduced, c * factor * factor))
}

/// `mlp1`: LayerNorm → Linear → exact GELU → Linear.
#[derive(Debug, Clone)]
pub struct Projector {
    norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    elementwise: Elementwise,
}

impl Projector {
    pub fn new(in_dim: usize, out_dim: usize, backends: &Backends, vb: VarBuilder) -> Result<Self> {
        let kind = backends.dense_linear();
        Ok(Self {
            norm: layer_norm(in_dim, 1e-5, vb.pp("0"))?,
            fc1: linear(in_dim, out_dim, kind, vb.pp("1"))?,
            fc2: linear(out_dim, out_dim, kind, vb.pp("3"))?,
            elementwise: backends.elementwise(),
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = self.fc1.forward(&self.norm.forward(xs)?)?;
        let xs = self.elementwise.gelu_erf(&xs)?;
        self.fc2.forward(&xs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Channel vector of the patch at grid cell (`w`, `h`) in upstream's naming: [w, h, c].
    fn grid(side: usize, c: usize) -> Tensor {
        let data: Vec<f32> = (0..side * side * c).map(|i| i as f32).collect();
        Tensor::from_vec(data, (1, side * side, c), &Device::Cpu).unwrap()
    }

    #[test]
    fn v1_keeps_the_grid_transposed() {
        let (side, c) = (4, 1);
        let out = pixel_shuffle(&grid(side, c), 2, PixelShuffleVersion::V1).unwrap();
        assert_eq!(out.dims(), &[1, 4, 4]);
        let out: Vec<Vec<f32>> = out.squeeze(0).unwrap().to_vec2().unwrap();
        // Token 1 of v1 is reduced cell (h'=0, w'=1): source rows w=2,3 at h=0,1.
        assert_eq!(out[1], vec![8.0, 9.0, 12.0, 13.0]);
        assert_eq!(out[2], vec![2.0, 3.0, 6.0, 7.0]);
    }

    #[test]
    fn v2_restores_row_major_order() {
        let out = pixel_shuffle(&grid(4, 1), 2, PixelShuffleVersion::V2).unwrap();
        let out: Vec<Vec<f32>> = out.squeeze(0).unwrap().to_vec2().unwrap();
        assert_eq!(out[1], vec![2.0, 3.0, 6.0, 7.0]);
        assert_eq!(out[2], vec![8.0, 9.0, 12.0, 13.0]);
    }

    #[test]
    fn rejects_non_square_grids() {
        let xs = Tensor::zeros((1, 12, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(pixel_shuffle(&xs, 2, PixelShuffleVersion::V1).is_err());
    }
}
