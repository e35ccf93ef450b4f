//! Quantizing a weight at load, its rows spread over the host's threads.
//!
//! candle's `QTensor::quantize` runs ggml's block quantizers on one thread (on CUDA too: it
//! copies the weight back to the host for them), and the k-quants' scale search is slow: for
//! the 13 B language model that was most of a `--quantize q4k` load. Every block covers part
//! of one row, so rows quantized apart give the same bytes as the whole weight at once; here
//! they are quantized in parallel, into one buffer of blocks that becomes the weight's only
//! copy on the host, or is uploaded to the device and dropped.

use crate::quant::WeightQuant;
use candle_core::quantized::k_quants::{
    BlockQ4K, BlockQ4_0, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K, BlockQ8_0, GgmlType,
};
use candle_core::quantized::{QStorage, QTensor};
use candle_core::{DType, Device, Result, Storage, Tensor};
use rayon::prelude::*;
use std::borrow::Cow;

/// Values quantized by one task: enough that the split costs nothing beside the work.
const VALUES_PER_TASK: usize = 1 << 16;

/// `weight` [out, in], whose rows are whole blocks of `quant` (see [`WeightQuant::for_width`]),
/// quantized on the host's threads into a [`QTensor`] on the weight's device. The bytes are
/// those of `QTensor::quantize`.
pub fn quantize(weight: &Tensor, quant: WeightQuant) -> Result<QTensor> {
    let (_, in_dim) = weight.dims2()?;
    let block = quant.ggml().block_size();
    if in_dim == 0 || !in_dim.is_multiple_of(block) {
        candle_core::bail!("rows of {in_dim} are not whole blocks of {quant} ({block})");
    }
    // To the host before widening: a bf16 weight on a GPU crosses the bus at half the bytes
    // and never has an f32 copy in device memory.
    let host = weight
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .contiguous()?;
    let (storage, layout) = host.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("a host tensor outside host memory");
    };
    let values = &cpu.as_slice::<f32>()?[layout.start_offset()..][..host.elem_count()];
    let device = weight.device();
    let storage = match quant {
        WeightQuant::Q8_0 => blocks::<BlockQ8_0>(values, in_dim, device)?,
        WeightQuant::Q6K => blocks::<BlockQ6K>(values, in_dim, device)?,
        WeightQuant::Q5K => blocks::<BlockQ5K>(values, in_dim, device)?,
        WeightQuant::Q5_1 => blocks::<BlockQ5_1>(values, in_dim, device)?,
        WeightQuant::Q5_0 => blocks::<BlockQ5_0>(values, in_dim, device)?,
        WeightQuant::Q4K => blocks::<BlockQ4K>(values, in_dim, device)?,
        WeightQuant::Q4_0 => blocks::<BlockQ4_0>(values, in_dim, device)?,
    };
    QTensor::new(storage, weight.shape())
}

/// `values`, rows of `in_dim`, as blocks of `B` on `device`.
fn blocks<B: GgmlType + 'static>(
    values: &[f32],
    in_dim: usize,
    device: &Device,
) -> Result<QStorage> {
    let per_row = in_dim / B::BLCK_SIZE;
    let rows_per_task = (VALUES_PER_TASK / in_dim).max(1);
    let mut out = vec![B::zeros(); values.len() / B::BLCK_SIZE];
    out.par_chunks_mut(per_row * rows_per_task)
        .zip(values.par_chunks(in_dim * rows_per_task))
        .for_each(|(ys, xs)| B::from_float(xs, ys));
    if device.is_cpu() {
        return Ok(QStorage::Cpu(Box::new(out)));
    }
    // SAFETY: ggml's blocks are `repr(C)` plain data (candle itself uploads them as bytes);
    // the slice covers exactly `out`'s elements and lives as long as `out`.
    let bytes = unsafe {
        std::slice::from_raw_parts(out.as_ptr().cast::<u8>(), std::mem::size_of_val(&out[..]))
    };
    QStorage::from_data(Cow::Borrowed(bytes), device, B::DTYPE)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A weight whose rows differ in scale, with outliers, so every block's scales differ.
    fn weight(out_dim: usize, in_dim: usize) -> Tensor {
        let values = (0..out_dim * in_dim)
            .map(|i| {
                let (r, c) = (i / in_dim, i % in_dim);
                let v = ((i as f32 * 0.618).sin() + (c as f32 * 0.13).cos()) * (1.0 + r as f32);
                if i % 97 == 0 {
                    v * 9.0
                } else {
                    v
                }
            })
            .collect::<Vec<f32>>();
        Tensor::from_vec(values, (out_dim, in_dim), &Device::Cpu).unwrap()
    }

    #[test]
    fn gives_candles_bytes_for_every_type() {
        // 300 rows of 512 (tasks of 128 rows) and 80 of 1792, 7 blocks of 256 (tasks of 36):
        // three tasks each, the last one short.
        for (out_dim, in_dim) in [(300, 512), (80, 1792)] {
            let w = weight(out_dim, in_dim);
            for quant in WeightQuant::ALL {
                let Some(quant) = quant.for_width(in_dim).filter(|q| *q == quant) else {
                    continue;
                };
                let ours = quantize(&w, quant).unwrap();
                let candles = QTensor::quantize(&w, quant.ggml()).unwrap();
                assert_eq!(ours.dtype(), candles.dtype(), "{quant}");
                assert_eq!(ours.shape(), candles.shape(), "{quant}");
                assert!(
                    ours.data().unwrap() == candles.data().unwrap(),
                    "{quant} {out_dim}x{in_dim}: bytes differ from candle's"
                );
            }
        }
    }

    #[test]
    fn bf16_weights_are_widened_first() {
        let w = weight(16, 256).to_dtype(DType::BF16).unwrap();
        let ours = quantize(&w, WeightQuant::Q4K).unwrap();
        let candles = QTensor::quantize(&w, WeightQuant::Q4K.ggml()).unwrap();
        assert!(ours.data().unwrap() == candles.data().unwrap());
    }

    #[test]
    fn refuses_rows_that_are_not_whole_blocks() {
        let w = weight(4, 96);
        let error = quantize(&w, WeightQuant::Q4K).unwrap_err().to_string();
        assert!(
            error.contains("rows of 96") && error.contains("q4k"),
            "{error}"
        );
        assert!(quantize(&w, WeightQuant::Q8_0).is_ok());
    }
}
