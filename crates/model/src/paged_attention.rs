//! Attention that reads keys and values in place from the paged KV cache, on the CPU in f32.
//!
//! Gathering a sequence's context out of the cache into a contiguous tensor costs a copy of
//! its whole KV per layer per step, which dominated decode time with many sequences. Reading
//! each cached slot where it lies keeps decode memory-bound on the reads it needs anyway. Used
//! for short query runs (decode steps, small chunks); long prefills keep the matmul path.

use candle_core::{DType, Device, Result, Storage, Tensor};
use rayon::prelude::*;

/// `q` [heads, len, head_dim]: `len` new tokens at positions `start..start + len`, attending
/// causally over the positions `0..start + len` whose cache slots are `slots`. Returns
/// [heads, len, head_dim], or `None` where this path does not apply (not CPU, not f32).
pub fn paged_attention_cpu(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    slots: &[u32],
    start: usize,
    scale: f32,
) -> Result<Option<Tensor>> {
    if !matches!(q.device(), Device::Cpu)
        || q.dtype() != DType::F32
        || k_cache.dtype() != DType::F32
    {
        return Ok(None);
    }
    let (heads, len, head_dim) = q.dims3()?;
    let (_, kv_heads, kv_dim) = k_cache.dims3()?;
    if kv_dim != head_dim || heads % kv_heads != 0 || slots.len() != start + len {
        candle_core::bail!("paged attention: inconsistent shapes or slots");
    }
    let groups = heads / kv_heads;
    let q: Vec<f32> = q.flatten_all()?.to_vec1()?;
    let (k_storage, k_layout) = k_cache.storage_and_layout();
    let (v_storage, v_layout) = v_cache.storage_and_layout();
    let (Storage::Cpu(k_cpu), Storage::Cpu(v_cpu)) = (&*k_storage, &*v_storage) else {
        return Ok(None);
    };
    if !k_layout.is_contiguous() || !v_layout.is_contiguous() {
        return Ok(None);
    }
    let cache = Cache {
        keys: &k_cpu.as_slice::<f32>()?[k_layout.start_offset()..],
        values: &v_cpu.as_slice::<f32>()?[v_layout.start_offset()..],
        row: kv_heads * head_dim,
        head_dim,
        groups,
        slots,
    };
    let mut out = vec![0f32; heads * len * head_dim];
    // Heads split evenly over the threads; each thread walks the context once per query, slot
    // by slot, reading its heads' keys and values where a slot's row holds them side by side.
    let threads = rayon::current_num_threads().clamp(1, heads);
    let heads_per_task = heads.div_ceil(threads);
    out.par_chunks_mut(heads_per_task * len * head_dim)
        .enumerate()
        .for_each(|(task, out)| {
            let first = task * heads_per_task;
            let count = out.len() / (len * head_dim);
            for i in 0..len {
                cache.attend(&q, first..first + count, len, i, start + i + 1, scale, out);
            }
        });
    Tensor::from_vec(out, (heads, len, head_dim), &Device::Cpu).map(Some)
}

/// A layer's cache as flat f32 rows (one per slot: kv_heads × head_dim) and one sequence's
/// slots in it.
struct Cache<'a> {
    keys: &'a [f32],
    values: &'a [f32],
    row: usize,
    head_dim: usize,
    groups: usize,
    slots: &'a [u32],
}

impl Cache<'_> {
    /// Query `i` of `heads` (q: [all heads, len, head_dim]) over the first `context` slots,
    /// into `out` ([heads, len, head_dim] for these heads only).
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        q: &[f32],
        heads: std::ops::Range<usize>,
        len: usize,
        i: usize,
        context: usize,
        scale: f32,
        out: &mut [f32],
    ) {
        let hd = self.head_dim;
        let count = heads.len();
        let kv_offset = |h: usize| (h / self.groups) * hd;
        let mut scores = vec![0f32; count * context];
        for (j, &slot) in self.slots[..context].iter().enumerate() {
            let keys = &self.keys[slot as usize * self.row..][..self.row];
            for (k, h) in heads.clone().enumerate() {
                let query = &q[(h * len + i) * hd..][..hd];
                scores[k * context + j] = dot(query, &keys[kv_offset(h)..][..hd]) * scale;
            }
        }
        for weights in scores.chunks_exact_mut(context) {
            let max = weights.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
            let mut total = 0f32;
            for s in weights.iter_mut() {
                *s = (*s - max).exp();
                total += *s;
            }
            for s in weights.iter_mut() {
                *s /= total;
            }
        }
        for (j, &slot) in self.slots[..context].iter().enumerate() {
            let values = &self.values[slot as usize * self.row..][..self.row];
            for (k, h) in heads.clone().enumerate() {
                let weight = scores[k * context + j];
                let output = &mut out[(k * len + i) * hd..][..hd];
                for (o, v) in output.iter_mut().zip(&values[kv_offset(h)..][..hd]) {
                    *o += weight * v;
                }
            }
        }
    }
}

/// Dot product with eight independent sums, so the compiler can vectorise it.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut sums = [0f32; 8];
    let (a_chunks, a_rest) = a.split_at(a.len() / 8 * 8);
    let (b_chunks, b_rest) = b.split_at(a_chunks.len());
    for (x, y) in a_chunks.chunks_exact(8).zip(b_chunks.chunks_exact(8)) {
        for k in 0..8 {
            sums[k] += x[k] * y[k];
        }
    }
    let tail: f32 = a_rest.iter().zip(b_rest).map(|(x, y)| x * y).sum();
    sums.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The in-place path equals gather + softmax(q·kᵀ)·v on scattered slots, with GQA.
    #[test]
    fn matches_gathered_attention() {
        let dev = Device::Cpu;
        let (heads, kv_heads, hd, start, len) = (4, 2, 16, 21, 3);
        let slots: Vec<u32> = (0..(start + len) as u32).map(|p| (p * 7) % 40).collect();
        let k_cache = Tensor::randn(0f32, 1.0, (40, kv_heads, hd), &dev).unwrap();
        let v_cache = Tensor::randn(0f32, 1.0, (40, kv_heads, hd), &dev).unwrap();
        let q = Tensor::randn(0f32, 1.0, (heads, len, hd), &dev).unwrap();
        let scale = 0.25;
        let ours = paged_attention_cpu(&q, &k_cache, &v_cache, &slots, start, scale)
            .unwrap()
            .unwrap();
        let index = Tensor::new(slots.as_slice(), &dev).unwrap();
        let gather = |c: &Tensor| {
            c.index_select(&index, 0)
                .unwrap()
                .transpose(0, 1)
                .unwrap()
                .unsqueeze(1)
                .unwrap()
                .broadcast_as((kv_heads, heads / kv_heads, start + len, hd))
                .unwrap()
                .reshape((heads, start + len, hd))
                .unwrap()
        };
        let (k, v) = (gather(&k_cache), gather(&v_cache));
        let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale as f64).unwrap();
        let mask: Vec<f32> = (0..len)
            .flat_map(|i| {
                (0..start + len).map(move |j| {
                    if j > start + i {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (1, len, start + len), &dev).unwrap();
        let probs =
            candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask).unwrap()).unwrap();
        let expected = probs.matmul(&v.contiguous().unwrap()).unwrap();
        let diff: f32 = (ours - expected)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(diff < 1e-5, "max difference {diff}");
    }

    #[test]
    fn other_dtypes_fall_back() {
        let dev = Device::Cpu;
        let cache = Tensor::zeros((4, 1, 8), DType::BF16, &dev).unwrap();
        let q = Tensor::zeros((1, 1, 8), DType::BF16, &dev).unwrap();
        assert!(paged_attention_cpu(&q, &cache, &cache, &[0], 0, 1.0)
            .unwrap()
            .is_none());
    }
}
