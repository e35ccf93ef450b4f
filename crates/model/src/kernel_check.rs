//! `internvl check-kernels`: every CUDA kernel the model runs, on the GPU, against a CPU
//! reference in f32 from the same inputs, at the real model's shapes. Outputs are poisoned
//! with NaN before each run, so a row a kernel fails to write cannot pass. The timings that
//! follow the checks are in [`crate::kernel_timing`].

use crate::cuda_kernels::{flash_attention_into, paged_attention_into, DevicePagedQueries};
use crate::kv_cache::SequenceSlice;
use crate::paged_attention::{paged_attention_cpu, PagedRun};
use crate::paged_plan::PagedQueries;
use candle_core::{DType, Device, IndexOp, Result, Tensor};

/// The outcome of one kernel on one shape.
#[derive(Debug, Clone)]
pub struct KernelCheck {
    pub name: String,
    pub max_error: f32,
    pub tolerance: f32,
    /// NaN where the kernel must have written (a poisoned value left, or a computed NaN).
    pub nan: bool,
    /// Set where a check also demands that some output stays untouched and it did not.
    pub wrote_outside: bool,
}

impl KernelCheck {
    pub fn passed(&self) -> bool {
        !self.nan && !self.wrote_outside && self.max_error <= self.tolerance
    }
}

/// Largest bf16 rounding error we accept on outputs of magnitude ~1 (bf16 keeps 8 bits).
const BF16_TOLERANCE: f32 = 2e-2;
const F32_TOLERANCE: f32 = 1e-4;

fn tolerance(dtype: DType) -> f32 {
    if dtype == DType::BF16 {
        BF16_TOLERANCE
    } else {
        F32_TOLERANCE
    }
}

/// Random values already rounded to `dtype`, as an f32 CPU copy (the reference's input) and
/// a `dtype` copy on `device` (the kernel's).
pub(crate) fn random(shape: &[usize], dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
    let x = Tensor::randn(0f32, 1.0, shape, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_dtype(DType::F32)?;
    let on_device = x.to_dtype(dtype)?.to_device(device)?;
    Ok((x, on_device))
}

fn poisoned(shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
    Tensor::full(f32::NAN, shape, device)?.to_dtype(dtype)
}

/// (max |a − b|, whether `a` has a NaN), `a` from the device.
fn compare(got: &Tensor, want: &Tensor) -> Result<(f32, bool)> {
    let got = got.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let nan = got
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .any(|x| x.is_nan());
    let err = (got - want)?
        .abs()?
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .filter(|x| !x.is_nan())
        .fold(0f32, f32::max);
    Ok((err, nan))
}

/// Runs every check on `device` (a CUDA device).
pub fn check_kernels(device: &Device) -> Result<Vec<KernelCheck>> {
    let mut checks = Vec::new();
    for dtype in [DType::F32, DType::BF16] {
        // LLaMA2-13B decode: 40 heads of 128; contexts up to all 4096 positions in scattered
        // 16-token blocks, plus a 3-token chunk and GQA.
        checks.push(check_paged(
            device,
            dtype,
            40,
            40,
            128,
            16,
            &[1, 17, 703, 4096],
        )?);
        checks.push(check_paged(device, dtype, 8, 2, 64, 16, &[33, 5])?);
    }
    // InternViT-6B: 1025 tokens, 25 heads of 128, q/k/v as views of one qkv tensor.
    checks.push(check_flash(device, 2, 1025, 1025, 25, 25, 128, false)?);
    // LLaMA2-13B prefill of an image chat after a cached prefix, and a GQA one.
    checks.push(check_flash(device, 1, 340, 400, 40, 40, 128, true)?);
    checks.push(check_flash(device, 1, 77, 77, 8, 2, 64, true)?);
    checks.push(check_rms_norm(device)?);
    checks.push(check_rope(device)?);
    Ok(checks)
}

/// Sequences with the given context lengths; the last one's final 3 tokens are a chunk, the
/// rest decode one token. Packed row 0 belongs to no query and must stay poisoned.
fn check_paged(
    device: &Device,
    dtype: DType,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
    contexts: &[usize],
) -> Result<KernelCheck> {
    let blocks: usize = contexts
        .iter()
        .map(|c| c.div_ceil(block_size))
        .sum::<usize>()
        + 2;
    // Blocks handed out back to front, so no sequence's blocks are in order.
    let mut free: Vec<u32> = (0..blocks as u32).rev().collect();
    let slices: Vec<SequenceSlice> = contexts
        .iter()
        .enumerate()
        .map(|(i, &context)| {
            let len = if i + 1 == contexts.len() { 3 } else { 1 };
            SequenceSlice {
                start: context - len,
                len,
                block_table: free.drain(..context.div_ceil(block_size)).collect(),
                wants_logits: true,
            }
        })
        .collect();
    let rows = 1 + slices.iter().map(|s| s.len).sum::<usize>();
    let cache_shape = [blocks * block_size, kv_heads, head_dim];
    let (k_ref, k) = random(&cache_shape, dtype, device)?;
    let (v_ref, v) = random(&cache_shape, dtype, device)?;
    let (q_ref, q) = random(&[rows, heads, head_dim], dtype, device)?;
    let scale = (head_dim as f32).powf(-0.5);

    // Packed row 0 is no query's: shift every query down by one.
    let mut plan = PagedQueries::new(&slices, 16);
    plan.query_rows.iter_mut().for_each(|r| *r += 1);
    let out = poisoned(&[rows, heads, head_dim], dtype, device)?;
    let on_device = DevicePagedQueries::new(&plan, device)?;
    paged_attention_into(&out, &q, &k, &v, &on_device, block_size, scale)?;

    let slots = slices
        .iter()
        .map(|slice| slice.slots(slice.start + slice.len, block_size))
        .collect::<Result<Vec<_>>>()?;
    let mut row = 1;
    let runs: Vec<PagedRun> = slices
        .iter()
        .zip(&slots)
        .map(|(slice, slots)| {
            row += slice.len;
            PagedRun {
                rows: row - slice.len..row,
                start: slice.start,
                slots,
            }
        })
        .collect();
    let mut want = vec![f32::NAN; rows * heads * head_dim];
    paged_attention_cpu(&q_ref, &k_ref, &v_ref, &runs, scale, &mut want)?;
    let want = Tensor::from_vec(want, (rows, heads, head_dim), &Device::Cpu)?;
    let out_cpu = out.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let untouched = out_cpu
        .i(0)?
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .all(|x| x.is_nan());
    let (max_error, nan) = compare(&out.narrow(0, 1, rows - 1)?, &want.narrow(0, 1, rows - 1)?)?;
    Ok(KernelCheck {
        name: format!(
            "paged attention {dtype:?} heads {heads}/{kv_heads} dim {head_dim} contexts {contexts:?}"
        ),
        max_error,
        tolerance: tolerance(dtype),
        nan,
        wrote_outside: !untouched,
    })
}

/// softmax(q·kᵀ/√d)·v in f32 on the CPU; q [b, n, h, d], k/v [b, m, kv_h, d].
fn reference_attention(q: &Tensor, k: &Tensor, v: &Tensor, causal: bool) -> Result<Tensor> {
    let (_, queries, heads, head_dim) = q.dims4()?;
    let (b, keys, kv_heads, _) = k.dims4()?;
    let groups = heads / kv_heads;
    let expand = |x: &Tensor| -> Result<Tensor> {
        x.transpose(1, 2)?
            .unsqueeze(2)?
            .broadcast_as((b, kv_heads, groups, keys, head_dim))?
            .reshape((b, heads, keys, head_dim))?
            .contiguous()
    };
    let q = q.transpose(1, 2)?.contiguous()?;
    let scores = (q.matmul(&expand(k)?.t()?)? * (head_dim as f64).powf(-0.5))?;
    let scores = if causal {
        let offset = keys - queries;
        let mask: Vec<f32> = (0..queries)
            .flat_map(|i| {
                (0..keys).map(move |j| {
                    if j > i + offset {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        scores.broadcast_add(&Tensor::from_vec(mask, (queries, keys), &Device::Cpu)?)?
    } else {
        scores
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    probs.matmul(&expand(v)?)?.transpose(1, 2)
}

#[allow(clippy::too_many_arguments)]
fn check_flash(
    device: &Device,
    batch: usize,
    queries: usize,
    keys: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    causal: bool,
) -> Result<KernelCheck> {
    let dtype = DType::BF16;
    // q, k and v are strided views: q of a [b, n, 2, h, d] tensor, k and v of a fused
    // [b, m, 2, kv_h, d] one, as the vision encoder's qkv projection gives them.
    let (q_ref, q_all) = random(&[batch, queries, 2, heads, head_dim], dtype, device)?;
    let (kv_ref, kv_all) = random(&[batch, keys, 2, kv_heads, head_dim], dtype, device)?;
    let part = |x: &Tensor, i: usize| x.narrow(2, i, 1)?.squeeze(2);
    let out = poisoned(&[batch, queries, heads, head_dim], dtype, device)?;
    flash_attention_into(
        &out,
        &part(&q_all, 1)?,
        &part(&kv_all, 0)?,
        &part(&kv_all, 1)?,
        causal,
    )?;
    let want = reference_attention(
        &part(&q_ref, 1)?,
        &part(&kv_ref, 0)?,
        &part(&kv_ref, 1)?,
        causal,
    )?;
    let (max_error, nan) = compare(&out, &want)?;
    Ok(KernelCheck {
        name: format!(
            "flash attention BF16 batch {batch} queries {queries} keys {keys} heads {heads}/{kv_heads} dim {head_dim}{}",
            if causal { " causal" } else { "" }
        ),
        max_error,
        tolerance: BF16_TOLERANCE,
        nan,
        wrote_outside: false,
    })
}

/// candle's fused RMSNorm, as the LLM and the vision encoder's q/k norms use it.
fn check_rms_norm(device: &Device) -> Result<KernelCheck> {
    let (x_ref, x) = random(&[64, 5120], DType::BF16, device)?;
    let (w_ref, w) = random(&[5120], DType::BF16, device)?;
    let got = candle_nn::ops::rms_norm(&x, &w, 1e-6)?;
    let want = candle_nn::ops::rms_norm_slow(&x_ref, &w_ref, 1e-6)?;
    // Outputs reach |x·w| ~ 10: the tolerance scales with them.
    let (max_error, nan) = compare(&got, &want)?;
    let scale = want.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
    Ok(KernelCheck {
        name: "rms norm BF16 [64, 5120] (candle, fused)".into(),
        max_error: max_error / scale,
        tolerance: BF16_TOLERANCE,
        nan,
        wrote_outside: false,
    })
}

/// candle's fused rotary embedding in the [batch, tokens, heads, dim] layout the LLM uses.
fn check_rope(device: &Device) -> Result<KernelCheck> {
    let (x_ref, x) = random(&[1, 300, 40, 128], DType::BF16, device)?;
    let angles = Tensor::arange(0u32, 300 * 64, &Device::Cpu)?
        .to_dtype(DType::F32)?
        .reshape((300, 64))?
        .affine(1e-3, 0.0)?;
    let (cos, sin) = (angles.cos()?, angles.sin()?);
    let on_device = |t: &Tensor| t.to_dtype(DType::BF16)?.to_device(device);
    let got = candle_nn::rotary_emb::rope_thd(&x, &on_device(&cos)?, &on_device(&sin)?)?;
    let round = |t: &Tensor| t.to_dtype(DType::BF16)?.to_dtype(DType::F32);
    let want = candle_nn::rotary_emb::rope_thd(&x_ref, &round(&cos)?, &round(&sin)?)?;
    let (max_error, nan) = compare(&got, &want)?;
    Ok(KernelCheck {
        name: "rotary embedding BF16 [1, 300, 40, 128] (candle, fused)".into(),
        max_error,
        tolerance: BF16_TOLERANCE,
        nan,
        wrote_outside: false,
    })
}
