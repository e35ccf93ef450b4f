//! Attention that reads keys and values in place from the paged KV cache, on the CPU in f32;
//! the cache itself may be f32, f16 or bf16 (`--kv-cache-dtype`), each slot's row widened to
//! f32 in a scratch row as it is read, never the cache as a whole.
//!
//! Gathering a sequence's context out of the cache into a contiguous tensor costs a copy of
//! its whole KV per layer per step, which dominated decode time with many sequences. Reading
//! each cached slot where it lies keeps decode memory-bound on the reads it needs anyway. Used
//! for short query runs (decode steps, small chunks), all of a batch's in one call, so one
//! parallel section per layer serves every sequence; long prefills keep the matmul path.

use crate::cpu_math::{axpy_generic, dot_generic, multiversion, prefetch, softmax_rows_generic};
use candle_core::{CpuStorage, DType, Device, Result, Storage, Tensor};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;
use std::cell::RefCell;
use std::ops::Range;

/// How many slots ahead the attention prefetches. A slot's row (2 KiB for the bench
/// checkpoint, 20 KiB for LLaMA2-13B in f32) soon crosses into another 4 KiB page, where the
/// hardware prefetcher stops; prefetching took a third off the attention's time at 16 chats.
const AHEAD: usize = 4;

thread_local! {
    static SCRATCH: RefCell<Scratch> = const {
        RefCell::new(Scratch {
            scores: Vec::new(),
            wide: Vec::new(),
        })
    };
}

/// A task's scratch, kept per thread across calls.
struct Scratch {
    /// Scores of the task's heads over the context: [heads, context].
    scores: Vec<f32>,
    /// One slot's row widened from a 16-bit cache.
    wide: Vec<f32>,
}

/// One sequence's short run of new tokens: rows `rows` of the batch's queries, at positions
/// `start..start + rows.len()`, attending causally over the positions whose cache slots are
/// `slots` (`start + rows.len()` of them).
pub struct PagedRun<'a> {
    pub rows: Range<usize>,
    pub start: usize,
    pub slots: &'a [u32],
}

/// Attention of every run in `runs` at once: `q` [tokens, heads, head_dim] holds the new
/// tokens of the whole batch; each run's rows of `out` (the same layout, flat) receive its
/// result, the other rows are left as they are. CPU only, f32 queries, contiguous caches of
/// f32, f16 or bf16: the backends send other devices and dtypes to the matmul attention.
pub fn paged_attention_cpu(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    runs: &[PagedRun],
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    let cache_dtype = k_cache.dtype();
    if !matches!(q.device(), Device::Cpu)
        || q.dtype() != DType::F32
        || !matches!(cache_dtype, DType::F32 | DType::F16 | DType::BF16)
        || v_cache.dtype() != cache_dtype
    {
        candle_core::bail!("paged attention: CPU, f32 queries, an f32, f16 or bf16 cache only");
    }
    let (tokens, heads, head_dim) = q.dims3()?;
    let (_, kv_heads, kv_dim) = k_cache.dims3()?;
    if kv_dim != head_dim || heads % kv_heads != 0 || out.len() != tokens * heads * head_dim {
        candle_core::bail!("paged attention: inconsistent shapes");
    }
    let mut row_query = vec![None; tokens];
    for (r, run) in runs.iter().enumerate() {
        if run.rows.end > tokens || run.slots.len() != run.start + run.rows.len() {
            candle_core::bail!("paged attention: run {r} does not fit its rows or slots");
        }
        for (i, row) in run.rows.clone().enumerate() {
            row_query[row] = Some((r, i));
        }
    }
    let q = q.contiguous()?;
    let (q_storage, q_layout) = q.storage_and_layout();
    let (k_storage, k_layout) = k_cache.storage_and_layout();
    let (v_storage, v_layout) = v_cache.storage_and_layout();
    let (Storage::Cpu(q_cpu), Storage::Cpu(k_cpu), Storage::Cpu(v_cpu)) =
        (&*q_storage, &*k_storage, &*v_storage)
    else {
        candle_core::bail!("paged attention: not on the CPU");
    };
    if !k_layout.is_contiguous() || !v_layout.is_contiguous() {
        candle_core::bail!("paged attention: the caches are not contiguous");
    }
    let queries = &q_cpu.as_slice::<f32>()?[q_layout.start_offset()..];
    let cache = Cache {
        keys: Rows::of(k_cpu, k_layout.start_offset())?,
        values: Rows::of(v_cpu, v_layout.start_offset())?,
        row: kv_heads * head_dim,
        head_dim,
        groups: heads / kv_heads,
    };
    // A task per row, or per block of a row's heads when there are too few rows to keep every
    // thread busy. Heads are independent, so how they are split never changes a result.
    let listed = row_query.iter().flatten().count().max(1);
    let blocks = (2 * rayon::current_num_threads()).div_ceil(listed);
    let heads_per_task = heads.div_ceil(blocks.clamp(1, heads));
    let row_width = heads * head_dim;
    out.par_chunks_mut(row_width)
        .zip(queries.par_chunks(row_width))
        .zip(&row_query)
        .for_each(|((out, query), at)| {
            let Some((r, i)) = *at else { return };
            let run = &runs[r];
            let context = &run.slots[..run.start + i + 1];
            out.par_chunks_mut(heads_per_task * head_dim)
                .enumerate()
                .for_each(|(block, out)| {
                    let first = block * heads_per_task;
                    let heads = first..first + out.len() / head_dim;
                    SCRATCH.with_borrow_mut(|scratch| {
                        out.fill(0.0);
                        attend(&cache, query, heads, context, scale, scratch, out);
                    });
                });
        });
    Ok(())
}

/// A layer's cache as flat rows, one per slot: kv_heads × head_dim elements.
struct Cache<'a> {
    keys: Rows<'a>,
    values: Rows<'a>,
    row: usize,
    head_dim: usize,
    groups: usize,
}

/// A cache's elements in the dtype it holds.
#[derive(Clone, Copy)]
enum Rows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Bf16(&'a [bf16]),
}

impl<'a> Rows<'a> {
    fn of(storage: &'a CpuStorage, offset: usize) -> Result<Self> {
        Ok(match storage {
            CpuStorage::F32(v) => Rows::F32(&v[offset..]),
            CpuStorage::F16(v) => Rows::F16(&v[offset..]),
            CpuStorage::BF16(v) => Rows::Bf16(&v[offset..]),
            _ => candle_core::bail!("paged attention: an f32, f16 or bf16 cache only"),
        })
    }

    /// Elements `range` of the cache as f32: in place for an f32 cache, widened into `wide`
    /// otherwise.
    #[inline(always)]
    fn get<'s>(&'s self, range: Range<usize>, wide: &'s mut [f32]) -> &'s [f32] {
        let wide = &mut wide[..range.len()];
        match self {
            Rows::F32(v) => &v[range],
            Rows::F16(v) => {
                v[range].convert_to_f32_slice(wide);
                wide
            }
            Rows::Bf16(v) => {
                // A bf16 is the top half of an f32's bits: widening is a shift, which
                // vectorizes at every vector width. (half's conversion also quiets a
                // signalling NaN, a compare on 16-bit lanes that AVX-512F without BW left
                // scalar; a NaN stays a NaN here too.)
                for (w, x) in wide.iter_mut().zip(&v[range]) {
                    *w = f32::from_bits(u32::from(x.to_bits()) << 16);
                }
                wide
            }
        }
    }

    /// Asks the CPU to start loading elements `range`.
    #[inline(always)]
    fn prefetch(&self, range: Range<usize>) {
        match self {
            Rows::F32(v) => prefetch(&v[range]),
            Rows::F16(v) => prefetch(&v[range]),
            Rows::Bf16(v) => prefetch(&v[range]),
        }
    }
}

multiversion!(
    /// One query (`query`: [all heads, head_dim]) through `heads` over the cache slots of
    /// `context`, into `out` ([those heads, head_dim], zeroed), using `scratch`.
    /// Slot-major: each slot's row, holding its heads side by side, is read once.
    ///
    /// The scratch comes in as an argument, not from the thread-local in here: a closure
    /// given to `LocalKey::with` is compiled apart from this function's CPU features, and
    /// the loops in it ran as baseline SSE code (30 % of a 16-chat bf16-cache run).
    fn attend(
        cache: &Cache,
        query: &[f32],
        heads: Range<usize>,
        context: &[u32],
        scale: f32,
        scratch: &mut Scratch,
        out: &mut [f32],
    ) {
        let hd = cache.head_dim;
        let n = context.len();
        let kv_offset = |h: usize| (h / cache.groups) * hd;
        // The part of a slot's row these heads read, and that part of the row AHEAD slots on.
        let part = kv_offset(heads.start)..kv_offset(heads.end - 1) + hd;
        let at = |slot: u32| {
            let base = slot as usize * cache.row;
            base + part.start..base + part.end
        };
        let ahead = |rows: &Rows, j: usize| {
            if let Some(&slot) = context.get(j + AHEAD) {
                rows.prefetch(at(slot));
            }
        };
        let Scratch { scores, wide } = scratch;
        scores.resize(heads.len() * n, 0.0);
        wide.resize(part.len(), 0.0);
        for (j, &slot) in context.iter().enumerate() {
            ahead(&cache.keys, j);
            let keys = cache.keys.get(at(slot), wide);
            for (k, h) in heads.clone().enumerate() {
                let q = &query[h * hd..][..hd];
                let key = &keys[kv_offset(h) - part.start..][..hd];
                scores[k * n + j] = dot_generic(q, key) * scale;
            }
        }
        softmax_rows_generic(scores, n);
        for (j, &slot) in context.iter().enumerate() {
            ahead(&cache.values, j);
            let values = cache.values.get(at(slot), wide);
            for (k, h) in heads.clone().enumerate() {
                let output = &mut out[k * hd..][..hd];
                let value = &values[kv_offset(h) - part.start..][..hd];
                axpy_generic(scores[k * n + j], value, output);
            }
        }
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    /// softmax(q·kᵀ)·v over the gathered context of positions `..start + len`, causal:
    /// q [len, heads, hd] → [len, heads, hd].
    fn gathered(
        q: &Tensor,
        k_cache: &Tensor,
        v_cache: &Tensor,
        slots: &[u32],
        start: usize,
        scale: f64,
    ) -> Tensor {
        let dev = q.device();
        let (len, heads, hd) = q.dims3().unwrap();
        let kv_heads = k_cache.dim(1).unwrap();
        let index = Tensor::new(slots, dev).unwrap();
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
        let (k, v) = (gather(k_cache), gather(v_cache));
        let q = q.transpose(0, 1).unwrap().contiguous().unwrap();
        let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
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
        let mask = Tensor::from_vec(mask, (1, len, start + len), dev).unwrap();
        let probs =
            candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask).unwrap()).unwrap();
        probs
            .matmul(&v.contiguous().unwrap())
            .unwrap()
            .transpose(0, 1)
            .unwrap()
    }

    /// Two runs (a chunk of 3 and a decode token) on scattered slots with GQA, around a row
    /// that belongs to neither and must stay as it was.
    #[test]
    fn matches_gathered_attention_and_leaves_other_rows() {
        let dev = Device::Cpu;
        let (heads, kv_heads, hd) = (4, 2, 16);
        let k_cache = Tensor::randn(0f32, 1.0, (60, kv_heads, hd), &dev).unwrap();
        let v_cache = Tensor::randn(0f32, 1.0, (60, kv_heads, hd), &dev).unwrap();
        let q = Tensor::randn(0f32, 1.0, (5, heads, hd), &dev).unwrap();
        let first: Vec<u32> = (0..24).map(|p| (p * 7) % 40).collect();
        let second: Vec<u32> = (0..10).map(|p| 40 + p * 2 % 20).collect();
        let runs = [
            PagedRun {
                rows: 0..3,
                start: 21,
                slots: &first,
            },
            PagedRun {
                rows: 4..5,
                start: 9,
                slots: &second,
            },
        ];
        let scale = 0.25;
        let mut out = vec![7f32; 5 * heads * hd];
        paged_attention_cpu(&q, &k_cache, &v_cache, &runs, scale, &mut out).unwrap();
        let out = Tensor::from_vec(out, (5, heads, hd), &dev).unwrap();
        for run in &runs {
            let rows = q.narrow(0, run.rows.start, run.rows.len()).unwrap();
            let expected = gathered(
                &rows,
                &k_cache,
                &v_cache,
                run.slots,
                run.start,
                scale as f64,
            );
            let ours = out.narrow(0, run.rows.start, run.rows.len()).unwrap();
            let diff: f32 = crate::test_util::max_difference(&ours, &expected);
            assert!(diff < 1e-5, "max difference {diff}");
        }
        let untouched: Vec<f32> = out
            .get(3)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(untouched.iter().all(|&x| x == 7.0));
    }

    /// A row gives the same bits whatever else is in the batch and however heads are split.
    #[test]
    fn a_row_is_the_same_alone_and_in_a_batch() {
        let dev = Device::Cpu;
        let (heads, hd) = (8, 32);
        let cache = Tensor::randn(0f32, 1.0, (50, heads, hd), &dev).unwrap();
        let q = Tensor::randn(0f32, 1.0, (12, heads, hd), &dev).unwrap();
        let slots: Vec<Vec<u32>> = (0..12u32)
            .map(|r| (0..20 + r).map(|p| (p * 3 + r) % 50).collect())
            .collect();
        let runs: Vec<PagedRun> = (0..12)
            .map(|r| PagedRun {
                rows: r..r + 1,
                start: slots[r].len() - 1,
                slots: &slots[r],
            })
            .collect();
        let mut all = vec![0f32; 12 * heads * hd];
        paged_attention_cpu(&q, &cache, &cache, &runs, 0.2, &mut all).unwrap();
        let one = q.narrow(0, 5, 1).unwrap();
        let alone_run = [PagedRun {
            rows: 0..1,
            start: runs[5].start,
            slots: runs[5].slots,
        }];
        let mut alone = vec![0f32; heads * hd];
        paged_attention_cpu(&one, &cache, &cache, &alone_run, 0.2, &mut alone).unwrap();
        assert_eq!(&all[5 * heads * hd..6 * heads * hd], alone.as_slice());
    }

    /// A 16-bit cache read in place gives what the gathered attention gives over the same
    /// cache widened to f32: the values are the same, only read differently.
    #[test]
    fn sixteen_bit_caches_match_their_widened_values() {
        let dev = Device::Cpu;
        let (heads, kv_heads, hd) = (4, 2, 16);
        let q = Tensor::randn(0f32, 1.0, (3, heads, hd), &dev).unwrap();
        let slots: Vec<u32> = (0..30).map(|p| (p * 7) % 50).collect();
        let runs = [PagedRun {
            rows: 0..3,
            start: 27,
            slots: &slots,
        }];
        for dtype in [DType::F16, DType::BF16] {
            let k = Tensor::randn(0f32, 1.0, (50, kv_heads, hd), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let v = Tensor::randn(0f32, 1.0, (50, kv_heads, hd), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let mut out = vec![0f32; 3 * heads * hd];
            paged_attention_cpu(&q, &k, &v, &runs, 0.25, &mut out).unwrap();
            let ours = Tensor::from_vec(out, (3, heads, hd), &dev).unwrap();
            let wide = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let expected = gathered(&q, &wide(&k), &wide(&v), &slots, 27, 0.25);
            let diff = crate::test_util::max_difference(&ours, &expected);
            assert!(diff < 1e-5, "{dtype:?}: max difference {diff}");
        }
    }

    /// Every bf16 widens to half's f32, bit for bit; a NaN to a NaN.
    #[test]
    fn bf16_rows_widen_as_half_does() {
        let all: Vec<bf16> = (0..=u16::MAX).map(bf16::from_bits).collect();
        let mut wide = vec![0f32; all.len()];
        let rows = Rows::Bf16(&all);
        let ours = rows.get(0..all.len(), &mut wide);
        for (x, &w) in all.iter().zip(ours) {
            if x.is_nan() {
                assert!(w.is_nan(), "{:#06x}", x.to_bits());
            } else {
                assert_eq!(w.to_bits(), x.to_f32().to_bits(), "{:#06x}", x.to_bits());
            }
        }
    }

    /// Other dtypes never reach this path: the backends send them to candle's matmuls
    /// (`backends::tests::other_cpu_dtypes_use_matmuls`); here they are refused, the output
    /// untouched: 16-bit queries, an f64 cache, and caches of two dtypes.
    #[test]
    fn other_dtypes_are_refused() {
        let dev = Device::Cpu;
        let cache = Tensor::zeros((4, 1, 8), DType::BF16, &dev).unwrap();
        let q = Tensor::zeros((1, 1, 8), DType::BF16, &dev).unwrap();
        let f32_q = Tensor::zeros((1, 1, 8), DType::F32, &dev).unwrap();
        let f64_cache = Tensor::zeros((4, 1, 8), DType::F64, &dev).unwrap();
        let f16_cache = Tensor::zeros((4, 1, 8), DType::F16, &dev).unwrap();
        let runs = [PagedRun {
            rows: 0..1,
            start: 0,
            slots: &[0],
        }];
        let mut out = vec![7f32; 8];
        assert!(paged_attention_cpu(&q, &cache, &cache, &runs, 1.0, &mut out).is_err());
        assert!(paged_attention_cpu(&f32_q, &f64_cache, &f64_cache, &runs, 1.0, &mut out).is_err());
        assert!(paged_attention_cpu(&f32_q, &cache, &f16_cache, &runs, 1.0, &mut out).is_err());
        assert!(out.iter().all(|&x| x == 7.0));
    }
}
