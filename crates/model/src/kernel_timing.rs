//! The timings `internvl check-kernels` prints after its checks: each CUDA kernel against the
//! candle path it replaces, at the real model's shapes, for the record.

use crate::cuda_kernels::{flash_attention, paged_attention_into, DevicePagedQueries};
use crate::kernel_check::random;
use crate::kv_cache::SequenceSlice;
use crate::paged_plan::PagedQueries;
use candle_core::{DType, Device, Result, Tensor, D};
use std::time::Instant;

/// Milliseconds per call of `f`, averaged over `runs` after one warm-up, synchronised.
fn time_ms(device: &Device, runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    device.synchronize()?;
    let start = Instant::now();
    for _ in 0..runs {
        f()?;
    }
    device.synchronize()?;
    Ok(start.elapsed().as_secs_f64() * 1e3 / runs as f64)
}

/// The matmul attention the kernels replace: bf16 scores, f32 softmax, as the model's
/// fallback path computes it; q/k/v [b, h, n, d] contiguous.
fn matmul_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let scale = (q.dim(D::Minus1)? as f64).powf(-0.5);
    let scores = (q * scale)?.matmul(&k.t()?)?.to_dtype(DType::F32)?;
    candle_nn::ops::softmax_last_dim(&scores)?
        .to_dtype(v.dtype())?
        .matmul(v)
}

/// (what, milliseconds) for each kernel and the path it replaces, at the model's shapes.
pub fn time_kernels(device: &Device) -> Result<Vec<(String, f64)>> {
    let mut rows = Vec::new();
    let bf16 = DType::BF16;
    for (batch, n, heads, causal) in [(8, 1025, 25, false), (1, 340, 40, true)] {
        let (_, q) = random(&[batch, n, heads, 128], bf16, device)?;
        let (_, k) = random(&[batch, n, heads, 128], bf16, device)?;
        let (_, v) = random(&[batch, n, heads, 128], bf16, device)?;
        let what = format!("attention batch {batch} × {n} tokens × {heads} heads");
        let flash = time_ms(device, 10, || flash_attention(&q, &k, &v, causal).map(drop))?;
        let heads_first = |x: &Tensor| x.transpose(1, 2)?.contiguous();
        let (qt, kt, vt) = (heads_first(&q)?, heads_first(&k)?, heads_first(&v)?);
        let matmul = time_ms(device, 10, || matmul_attention(&qt, &kt, &vt).map(drop))?;
        rows.push((format!("{what}: flash kernel"), flash));
        rows.push((format!("{what}: matmul + softmax"), matmul));
    }
    // Decode: 64 sequences at ~600 positions, 40 heads of 128 (one LLM layer).
    let (seqs, context, block_size) = (64usize, 600usize, 16usize);
    let per_seq = context.div_ceil(block_size);
    let cache_shape = [seqs * per_seq * block_size, 40, 128];
    let (_, k) = random(&cache_shape, bf16, device)?;
    let (_, v) = random(&cache_shape, bf16, device)?;
    let (_, q) = random(&[seqs, 40, 128], bf16, device)?;
    let slices: Vec<SequenceSlice> = (0..seqs)
        .map(|s| SequenceSlice {
            start: context - 1,
            len: 1,
            block_table: (0..per_seq).map(|b| (s * per_seq + b) as u32).collect(),
            wants_logits: true,
        })
        .collect();
    let plan = DevicePagedQueries::new(&PagedQueries::new(&slices, 16), device)?;
    let out = Tensor::zeros(q.shape(), bf16, device)?;
    let scale = 128f32.powf(-0.5);
    let paged = time_ms(device, 20, || {
        paged_attention_into(&out, &q, &k, &v, &plan, block_size, scale)
    })?;
    let kv_bytes = 2.0 * (seqs * context * 40 * 128 * 2) as f64;
    rows.push((
        format!(
            "decode attention 64 × {context} positions (one layer): paged kernel ({:.0} GB/s of KV)",
            kv_bytes / (paged * 1e-3) / 1e9
        ),
        paged,
    ));
    let gathered = time_ms(device, 5, || {
        for (s, slice) in slices.iter().enumerate() {
            let slots = Tensor::new(slice.slots(context, block_size)?.as_slice(), device)?;
            let gather = |c: &Tensor| c.index_select(&slots, 0)?.transpose(0, 1)?.contiguous();
            let q = q.narrow(0, s, 1)?.transpose(0, 1)?.contiguous()?;
            matmul_attention(&q, &gather(&k)?, &gather(&v)?)?;
        }
        Ok(())
    })?;
    rows.push((
        format!("decode attention 64 × {context} positions (one layer): gather + matmul"),
        gathered,
    ));
    Ok(rows)
}
