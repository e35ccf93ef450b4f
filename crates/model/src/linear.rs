//! Linear layers whose weights are stored the way the device's matmul reads them fastest, or
//! quantized at load.
//!
//! A checkpoint holds each weight as [out, in], and candle multiplies by its transposed view.
//! On the CPU the `gemm` crate then repacks that view element by element on every call — a
//! third of a decode step at 16 sequences went there — because it streams weights as
//! [in, out] rows. So on the CPU each dense weight is transposed once, at load; elsewhere
//! (cuBLAS reads either layout at full speed) it stays as loaded. A quantized weight is
//! quantized from the loaded tensor, which is then dropped: the model is never held whole
//! unquantized. With [`QuantKernels::VnniTiles`] (a CPU with AVX-512 VNNI) a q4k or q8_0 weight
//! is then packed into the tiles of [`VnniWeight`], its only copy, and multiplied there at any
//! count of rows; other types, and other devices, keep candle's quantized matmul.
//! [`LinearKind`], chosen with the model's backends, says which.

use crate::quant::WeightQuant;
use crate::quantize::quantize;
use crate::vnni_weight::VnniWeight;
use candle_core::quantized::QMatMul;
use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

/// How a dense weight is laid out, chosen with the model's device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenseLayout {
    /// Transposed once at load to [in, out], the rows the CPU's `gemm` streams.
    InOut,
    /// [out, in] as in the checkpoint, multiplied through its transposed view (cuBLAS reads
    /// either layout at full speed).
    AsLoaded,
}

/// Which kernels multiply a quantized weight, chosen with the model's device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantKernels {
    /// candle's quantized matmul, on ggml's blocks.
    Candle,
    /// q4k and q8_0 in [`VnniWeight`]'s tiles (a CPU with AVX-512 VNNI); other types candle's.
    VnniTiles,
}

/// How a linear layer keeps its weight: quantized to `quant` where its shape takes that type
/// (or its fallback, [`WeightQuant::for_width`]) and multiplied by `kernels`, dense in
/// `layout` otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearKind {
    pub layout: DenseLayout,
    pub quant: Option<WeightQuant>,
    pub kernels: QuantKernels,
}

impl LinearKind {
    pub fn dense(layout: DenseLayout) -> Self {
        Self {
            layout,
            quant: None,
            kernels: QuantKernels::Candle,
        }
    }
}

/// Rows from which a quantized layer on the CPU multiplies through its weight dequantized
/// rather than through ggml's integer dot products: a prefill chunk, not a decode batch
/// (measured there: the f32 GEMM wins at many rows). On CUDA candle's quantized matmul has
/// tiled kernels of its own for many rows, so it keeps them.
const CPU_DENSE_ROWS: usize = 64;

/// A weight in the form its [`LinearKind`] keeps.
#[derive(Debug, Clone)]
enum Weight {
    /// [in, out].
    InOut(Tensor),
    /// [out, in].
    AsLoaded(Tensor),
    /// [out, in] in ggml blocks along `in`; multiplies f32 activations, or, from
    /// `dense_rows` rows on, through the weight dequantized.
    Quantized { matmul: QMatMul, dense_rows: usize },
    /// q4k or q8_0 in VNNI tiles: multiplies every count of rows itself, since on this
    /// project's CPU its integer dot products outran the f32 GEMM at 1 to 256 rows
    /// (`docs/benchmarks.md`).
    Packed(VnniWeight),
}

#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

impl Linear {
    /// `weight` [out, in] as in the checkpoint; `bias` [out]. `name` is the layer's, for the
    /// log line of a quantization that falls back.
    pub fn new(weight: Tensor, bias: Option<Tensor>, kind: LinearKind, name: &str) -> Result<Self> {
        let weight = match kind.quant {
            Some(wanted) => {
                let (out_dim, in_dim) = weight.dims2()?;
                match wanted.for_width(in_dim) {
                    Some(quant) => {
                        if quant != wanted {
                            tracing::info!(
                                layer = name, out_dim, in_dim, wanted = %wanted, used = %quant,
                                "a row of {in_dim} does not take {wanted}'s blocks: {quant}"
                            );
                        }
                        let q = quantize(&weight, quant)?;
                        drop(weight);
                        let packed = match kind.kernels {
                            QuantKernels::VnniTiles => VnniWeight::pack(&q)?,
                            QuantKernels::Candle => None,
                        };
                        match packed {
                            Some(packed) => Weight::Packed(packed),
                            None => Weight::Quantized {
                                matmul: QMatMul::from_qtensor(q)?,
                                dense_rows: match kind.layout {
                                    DenseLayout::InOut => CPU_DENSE_ROWS,
                                    DenseLayout::AsLoaded => usize::MAX,
                                },
                            },
                        }
                    }
                    None => {
                        tracing::info!(
                            layer = name, out_dim, in_dim, wanted = %wanted,
                            "a row of {in_dim} takes no quantized type: kept dense"
                        );
                        dense(weight, kind.layout)?
                    }
                }
            }
            None => dense(weight, kind.layout)?,
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
            Weight::Quantized {
                matmul: w,
                dense_rows,
            } if rows >= *dense_rows => {
                // A prefill's rows: the weight dequantized for one dense matmul, which the
                // device runs far faster than the integer dot products when there are many
                // rows (the weight's bytes are read once either way).
                let w = match w {
                    QMatMul::QTensor(q) => q.dequantize(&q.device())?,
                    QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.clone(),
                };
                x.matmul(&w.to_dtype(x.dtype())?.t()?)?
            }
            Weight::Packed(w) => {
                if in_dim != w.in_dim() {
                    candle_core::bail!("input of {in_dim} for a weight of {}", w.in_dim());
                }
                let dtype = x.dtype();
                let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let y = w.matmul(&xs, rows);
                Tensor::from_vec(y, (rows, w.out_dim()), x.device())?.to_dtype(dtype)?
            }
            Weight::Quantized { matmul: w, .. } => {
                // ggml's kernels take f32 activations; bf16 ones are widened and the result
                // narrowed back.
                let dtype = x.dtype();
                let y = w.forward(&x.to_dtype(DType::F32)?.contiguous()?)?;
                y.to_dtype(dtype)?
            }
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

fn dense(weight: Tensor, layout: DenseLayout) -> Result<Weight> {
    Ok(match layout {
        DenseLayout::InOut => Weight::InOut(weight.t()?.contiguous()?),
        DenseLayout::AsLoaded => Weight::AsLoaded(weight),
    })
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
    Linear::new(weight, bias, kind, &vb.prefix())
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
    use crate::vnni_weight;
    use candle_core::Device;

    fn product(w: &Tensor, b: &Tensor, x: &Tensor) -> Tensor {
        let (rows, in_dim) = (
            x.elem_count() / x.dim(D::Minus1).unwrap(),
            x.dim(D::Minus1).unwrap(),
        );
        let out = w.dim(0).unwrap();
        let mut dims = x.dims().to_vec();
        *dims.last_mut().unwrap() = out;
        x.reshape((rows, in_dim))
            .unwrap()
            .matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(b)
            .unwrap()
            .reshape(dims)
            .unwrap()
    }

    /// Equals x·Wᵀ + b over leading dimensions, whatever the stored layout.
    #[test]
    fn matches_the_checkpoint_layout_product() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (7, 5), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 7, &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 3, 5), &dev).unwrap();
        let expected = product(&w, &b, &x);
        for layout in [DenseLayout::InOut, DenseLayout::AsLoaded] {
            let ours = Linear::new(w.clone(), Some(b.clone()), LinearKind::dense(layout), "t")
                .unwrap()
                .forward(&x)
                .unwrap();
            assert_eq!(ours.dims(), &[2, 3, 7]);
            let diff: f32 = crate::test_util::max_difference(&ours, &expected);
            assert!(diff < 1e-5, "{layout:?}: max difference {diff}");
        }
    }

    /// Quantized, the product is within the type's rounding of the dense one (relative to the
    /// output's scale), tighter the more bits; a width no type takes stays exact.
    #[test]
    fn quantized_products_are_within_their_types_rounding() {
        let dev = Device::Cpu;
        let (out_dim, in_dim) = (48, 512);
        let w = Tensor::randn(0f32, 1.0, (out_dim, in_dim), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, out_dim, &dev).unwrap();
        let scale = (in_dim as f32).sqrt();
        // 3 rows (a decode batch) and 100 (a prefill chunk): candle's q6k multiplies the
        // latter through its weight dequantized.
        for rows in [3, 100] {
            let x = Tensor::randn(0f32, 1.0, (rows, in_dim), &dev).unwrap();
            let expected = product(&w, &b, &x);
            // The largest error over the outputs, per √in (the outputs' scale): twice what was
            // measured here (q8_0 0.027, q6k 0.059, q4k 0.31 at 3 rows; the activations are
            // quantized too there).
            // candle's kernels everywhere, and the VNNI tiles where this CPU has them.
            let mut kernels = vec![QuantKernels::Candle];
            if vnni_weight::available() {
                kernels.push(QuantKernels::VnniTiles);
            }
            for kernels in kernels {
                let mut last = 0f32;
                for (quant, bound) in [
                    (WeightQuant::Q8_0, 0.06f32),
                    (WeightQuant::Q6K, 0.12),
                    (WeightQuant::Q4K, 0.6),
                ] {
                    let kind = LinearKind {
                        layout: DenseLayout::InOut,
                        quant: Some(quant),
                        kernels,
                    };
                    let linear = Linear::new(w.clone(), Some(b.clone()), kind, "t").unwrap();
                    // The tiles take q4k and q8_0; q6k stays candle's.
                    assert_eq!(
                        matches!(linear.weight, Weight::Packed(_)),
                        kernels == QuantKernels::VnniTiles && quant != WeightQuant::Q6K,
                        "{quant}, {kernels:?}"
                    );
                    let ours = linear.forward(&x).unwrap();
                    let error = crate::test_util::max_difference(&ours, &expected) / scale;
                    assert!(error < bound, "{quant}, {kernels:?}, {rows} rows: {error}");
                    assert!(
                        error > last,
                        "{quant} is coarser than the type before: {error} vs {last}"
                    );
                    last = error;
                }
            }
        }
        // 100 takes no 32-element blocks: dense, exact.
        let w = Tensor::randn(0f32, 1.0, (4, 100), &dev).unwrap();
        let b = Tensor::zeros(4, DType::F32, &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 100), &dev).unwrap();
        let kind = LinearKind {
            layout: DenseLayout::InOut,
            quant: Some(WeightQuant::Q4K),
            kernels: QuantKernels::VnniTiles,
        };
        let ours = Linear::new(w.clone(), Some(b.clone()), kind, "t").unwrap();
        assert!(matches!(ours.weight, Weight::InOut(_)));
        let diff =
            crate::test_util::max_difference(&ours.forward(&x).unwrap(), &product(&w, &b, &x));
        assert!(diff < 1e-5);
    }
}
