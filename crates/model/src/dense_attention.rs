//! The vision encoder's attention on the CPU in f32, one block of queries at a time.
//!
//! With matmuls, a batch of images materialises batch × heads × 1025² scores (hundreds of MB
//! at batch 8), freshly allocated and page-faulted in every layer, and candle's softmax calls
//! scalar `expf` on each. Here each task takes one image's block of 64 queries through every
//! head: scores for the block (64 × 1025, in a per-thread buffer that stays in cache), a
//! vectorised softmax, then the weighted sum of values written straight into the output rows.
//! Every image is computed alone and the same way whatever else is in the batch.

use crate::cpu_math::softmax_rows;
use candle_core::{DType, Device, Result, Storage, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;
use std::cell::RefCell;

/// Queries per task: one microkernel's height on AVX-512.
const BLOCK: usize = 64;

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// softmax(q·kᵀ · scale)·v per head. `q`, `k`, `v`: [batch, tokens, heads · head_dim], rows
/// may be strided (views into a fused qkv projection), channels contiguous. Returns
/// [batch, tokens, heads · head_dim]. CPU f32 only: the backends send other devices and
/// dtypes to candle's matmuls.
pub fn dense_attention_cpu(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f32,
) -> Result<Tensor> {
    if !matches!(q.device(), Device::Cpu) || [q, k, v].iter().any(|t| t.dtype() != DType::F32) {
        candle_core::bail!("dense attention: CPU f32 only");
    }
    let (batch, tokens, width) = q.dims3()?;
    if k.dims3()? != (batch, tokens, width) || v.dims3()? != (batch, tokens, width) {
        candle_core::bail!("dense attention: q, k and v differ in shape");
    }
    if width % heads != 0 {
        candle_core::bail!("dense attention: width {width} is not a multiple of {heads} heads");
    }
    let (q, k, v) = (Rows::of(q)?, Rows::of(k)?, Rows::of(v)?);
    let guards = [&q, &k, &v].map(|rows| rows.tensor.storage_and_layout().0);
    let [qs, ks, vs] = [0, 1, 2].map(|i| match &*guards[i] {
        Storage::Cpu(cpu) => cpu.as_slice::<f32>(),
        _ => candle_core::bail!("dense attention: not on the CPU"),
    });
    let (qs, ks, vs) = (qs?, ks?, vs?);
    let shape = Shape {
        tokens,
        width,
        heads,
        head_dim: width / heads,
        scale,
    };
    let mut out = vec![0f32; batch * tokens * width];
    out.par_chunks_mut(tokens * width)
        .enumerate()
        .for_each(|(image, out)| {
            let inputs = (q.image(qs, image), k.image(ks, image), v.image(vs, image));
            out.par_chunks_mut(BLOCK * width)
                .enumerate()
                .for_each(|(block, out)| shape.block(inputs, block * BLOCK, out));
        });
    Tensor::from_vec(out, (batch, tokens, width), &Device::Cpu)
}

/// A [batch, tokens, width] f32 view: where its data starts and its batch and row strides.
struct Rows {
    tensor: Tensor,
    start: usize,
    batch_stride: usize,
    row_stride: usize,
}

/// One image of a view: its data from its first element, and its row stride.
type ImageRows<'a> = (&'a [f32], usize);

impl Rows {
    fn of(t: &Tensor) -> Result<Self> {
        let t = if t.stride()[2] == 1 {
            t.clone()
        } else {
            t.contiguous()?
        };
        let stride = t.stride();
        let (batch_stride, row_stride) = (stride[0], stride[1]);
        let start = t.layout().start_offset();
        Ok(Self {
            tensor: t,
            start,
            batch_stride,
            row_stride,
        })
    }

    fn image<'a>(&self, data: &'a [f32], image: usize) -> ImageRows<'a> {
        (
            &data[self.start + image * self.batch_stride..],
            self.row_stride,
        )
    }
}

#[derive(Clone, Copy)]
struct Shape {
    tokens: usize,
    width: usize,
    heads: usize,
    head_dim: usize,
    scale: f32,
}

impl Shape {
    /// Queries `first..` (as many as `out` has rows) of one image, every head.
    fn block(&self, (q, k, v): (ImageRows, ImageRows, ImageRows), first: usize, out: &mut [f32]) {
        let rows = out.len() / self.width;
        let (n, hd) = (self.tokens, self.head_dim);
        SCORES.with(|scores| {
            let mut scores = scores.borrow_mut();
            scores.resize(BLOCK * n, 0.0);
            let scores = &mut scores[..rows * n];
            for h in 0..self.heads {
                let channel = h * hd;
                let query = &q.0[first * q.1 + channel..];
                let key = &k.0[channel..];
                let value = &v.0[channel..];
                // Bounds the raw reads below: the last row's head slice lies in each input.
                assert!(query.len() >= (rows - 1) * q.1 + hd);
                assert!(key.len() >= (n - 1) * k.1 + hd && value.len() >= (n - 1) * v.1 + hd);
                // SAFETY: scores is rows × n; query rows × hd at row stride q.1, keys read as
                // hd × n (kᵀ) at column stride k.1, all in bounds (asserted above).
                unsafe {
                    gemm::gemm(
                        rows,
                        n,
                        hd,
                        scores.as_mut_ptr(),
                        1,
                        n as isize,
                        false,
                        query.as_ptr(),
                        1,
                        q.1 as isize,
                        key.as_ptr(),
                        k.1 as isize,
                        1,
                        0.0,
                        self.scale,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
                softmax_rows(scores, n);
                let target = &mut out[channel..];
                assert!(target.len() >= (rows - 1) * self.width + hd);
                // SAFETY: target is rows × hd at row stride width (asserted), probabilities
                // rows × n, values n × hd at row stride v.1 (asserted above).
                unsafe {
                    gemm::gemm(
                        rows,
                        hd,
                        n,
                        target.as_mut_ptr(),
                        1,
                        self.width as isize,
                        false,
                        scores.as_ptr(),
                        1,
                        n as isize,
                        value.as_ptr(),
                        1,
                        v.1 as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::max_difference;
    use candle_core::D;

    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Tensor {
        let (b, n, c) = q.dims3().unwrap();
        let split = |t: &Tensor| {
            t.reshape((b, n, heads, c / heads))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let (q, k, v) = (split(q), split(k), split(v));
        let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap();
        probs
            .matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, n, c))
            .unwrap()
    }

    /// Strided views out of one fused projection, a partial last block, several images.
    #[test]
    fn matches_matmul_attention_on_strided_views() {
        let dev = Device::Cpu;
        let (b, n, heads, hd) = (3, 150, 4, 20);
        let c = heads * hd;
        let qkv = Tensor::randn(0f32, 1.0, (b, n, 3 * c), &dev).unwrap();
        let q = qkv.narrow(D::Minus1, 0, c).unwrap();
        let k = qkv.narrow(D::Minus1, c, c).unwrap();
        let v = qkv.narrow(D::Minus1, 2 * c, c).unwrap();
        let scale = (hd as f64).powf(-0.5);
        let ours = dense_attention_cpu(&q, &k, &v, heads, scale as f32).unwrap();
        let expected = reference(&q, &k, &v, heads, scale);
        let diff = max_difference(&ours, &expected);
        assert!(diff < 2e-5, "max difference {diff}");
    }

    /// Each image's result is bitwise the same alone as in a batch.
    #[test]
    fn an_image_gives_the_same_bits_in_any_batch() {
        let dev = Device::Cpu;
        let (n, c, heads) = (70, 32, 2);
        let x = Tensor::randn(0f32, 1.0, (4, n, c), &dev).unwrap();
        let batch = dense_attention_cpu(&x, &x, &x, heads, 0.3).unwrap();
        let single = x.narrow(0, 2, 1).unwrap();
        let alone = dense_attention_cpu(&single, &single, &single, heads, 0.3).unwrap();
        let from_batch: Vec<f32> = batch
            .get(2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let alone: Vec<f32> = alone.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(from_batch, alone);
    }

    /// Other dtypes never reach this path: the backends send them to candle's matmuls
    /// (`backends::tests::other_cpu_dtypes_use_matmuls`), and here they are refused.
    #[test]
    fn other_dtypes_are_refused() {
        let x = Tensor::zeros((1, 4, 8), DType::BF16, &Device::Cpu).unwrap();
        assert!(dense_attention_cpu(&x, &x, &x, 2, 1.0).is_err());
    }
}
