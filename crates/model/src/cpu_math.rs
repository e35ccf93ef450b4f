//! Vectorised f32 slice kernels for the CPU paths: softmax, exact GELU, dot product, axpy.
//!
//! candle's CPU ops call libm's scalar `expf`/`erff` per element, which made the softmax and
//! GELU of the vision encoder a quarter of its time. These are written as plain loops that
//! the compiler vectorises, compiled three times (AVX-512, AVX2, baseline) and chosen at run
//! time. Every lane does the same IEEE operations in the same order and nothing is fused into
//! FMAs, so all three give bit-identical results: which CPU runs a request never changes its
//! tokens, and batch invariance holds across machines.

/// Defines `fn $name` with the given body compiled three times (AVX-512, AVX2, baseline) and
/// the widest the CPU supports chosen at each call. What the body calls `#[inline(always)]` is
/// compiled into each copy too.
macro_rules! multiversion {
    (
        $(#[$doc:meta])*
        $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block
    ) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn generic($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? { generic($($arg),*) }
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? { generic($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has the features this copy was compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            generic($($arg),*)
        }
    };
}

multiversion!(
    /// Replaces each row of `rows` (consecutive runs of `width`) by its softmax.
    pub fn softmax_rows(rows: &mut [f32], width: usize) {
        softmax_rows_generic(rows, width)
    }
);
multiversion!(
    /// `x ↦ x · Φ(x)` in place: the exact (erf) GELU, within 1e-7 + 2.5e-7·|x| of it.
    pub fn gelu_erf(xs: &mut [f32]) {
        for x in xs.iter_mut() {
            *x = gelu(*x);
        }
    }
);
multiversion!(
    /// `out = silu(gate) · up`, silu(x) = x / (1 + e^−x): LLaMA's gated MLP activation.
    pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = g / (1.0 + exp(-g)) * u;
        }
    }
);
pub(crate) use multiversion;

const LANES: usize = 16;

/// Each row (consecutive runs of `width`) replaced by its softmax.
#[inline(always)]
pub(crate) fn softmax_rows_generic(rows: &mut [f32], width: usize) {
    for row in rows.chunks_exact_mut(width) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let mut sums = [0f32; LANES];
        let mut chunks = row.chunks_exact_mut(LANES);
        for chunk in &mut chunks {
            for (s, x) in sums.iter_mut().zip(chunk.iter_mut()) {
                *x = exp(*x - max);
                *s += *x;
            }
        }
        let mut total = 0f32;
        for x in chunks.into_remainder() {
            *x = exp(*x - max);
            total += *x;
        }
        let total = sums.iter().fold(total, |t, s| t + s);
        let inverse = 1.0 / total;
        for x in row.iter_mut() {
            *x *= inverse;
        }
    }
}

/// Σ a·b with 16 running sums (one AVX-512 register), then summed in lane order.
#[inline(always)]
pub(crate) fn dot_generic(a: &[f32], b: &[f32]) -> f32 {
    let mut sums = [0f32; LANES];
    let (a_chunks, a_rest) = a.split_at(a.len() / LANES * LANES);
    let (b_chunks, b_rest) = b.split_at(a_chunks.len());
    for (x, y) in a_chunks
        .chunks_exact(LANES)
        .zip(b_chunks.chunks_exact(LANES))
    {
        for k in 0..LANES {
            sums[k] += x[k] * y[k];
        }
    }
    let tail = a_rest.iter().zip(b_rest).fold(0f32, |t, (x, y)| t + x * y);
    sums.iter().fold(tail, |t, s| t + s)
}

/// `y += alpha · x`.
#[inline(always)]
pub(crate) fn axpy_generic(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

/// Asks the CPU to start loading `data` into cache: for rows that are read next but lie in
/// another page, where the hardware prefetcher does not follow. One hint per 64-byte line,
/// whatever the element type.
#[inline(always)]
pub(crate) fn prefetch<T>(data: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        let start = data.as_ptr().cast::<i8>();
        for offset in (0..std::mem::size_of_val(data)).step_by(64) {
            // SAFETY: a prefetch is a hint; the address is inside `data`.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    start.add(offset),
                )
            };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

/// `e^x` within 2 ulp for x ≤ 88 (Cephes' single-precision reduction and polynomial): 0 below
/// the smallest normal result, +∞ above 88 (the callers only pass x ≤ 0), NaN for NaN.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOWEST: f32 = -87.336_55;
    const HIGHEST: f32 = 88.0;
    // 1.5 · 2^23: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let clamped = if x > HIGHEST { HIGHEST } else { x };
    let clamped = if clamped < LOWEST { LOWEST } else { clamped };
    let shifted = clamped * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    // ln 2 split so that n · 0.693359375 is exact.
    let r = clamped - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e = p * (r * r) + r + 1.0;
    let biased = (shifted.to_bits() as i32 - ROUND.to_bits() as i32 + 127) << 23;
    let value = e * f32::from_bits(biased as u32);
    if x < LOWEST {
        0.0
    } else if x > HIGHEST {
        f32::INFINITY
    } else {
        value
    }
}

/// `x · Φ(x) = x/2 · erfc(-x/√2)`, with erfc from Abramowitz & Stegun 7.1.26 (absolute error
/// ≤ 1.5e-7), taken on the side where it needs no cancellation.
#[inline(always)]
fn gelu(x: f32) -> f32 {
    let z = x * std::f32::consts::FRAC_1_SQRT_2;
    let a = z.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152 + t * 1.061_405_4))));
    // erfc(|z|); erfc(-|z|) = 2 − erfc(|z|).
    let tail = poly * exp(-a * a);
    let cdf_twice = if z < 0.0 { tail } else { 2.0 - tail };
    0.5 * x * cdf_twice
}

#[cfg(test)]
mod tests {
    use super::*;

    fn erf64(x: f64) -> f64 {
        // Series for small |x|, continued fraction beyond: exact to ~1e-15 where used.
        if x.abs() < 3.0 {
            let mut term = x;
            let mut sum = x;
            for n in 1..200 {
                term *= -x * x / n as f64;
                sum += term / (2 * n + 1) as f64;
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            let a = x.abs();
            let mut fraction = 0.0;
            for n in (1..120).rev() {
                fraction = (n as f64 / 2.0) / (a + fraction);
            }
            let erfc = (-a * a).exp() / std::f64::consts::PI.sqrt() / (a + fraction);
            x.signum() * (1.0 - erfc)
        }
    }

    #[test]
    fn exp_is_within_two_ulp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let ours = exp(x) as f64;
            let exact = (x as f64).exp();
            worst = worst.max(((ours - exact) / exact).abs());
            x += 0.0173;
        }
        assert!(worst < 2.5e-7, "relative error {worst}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(88.5), f32::INFINITY);
    }

    #[test]
    fn gelu_matches_the_erf_definition() {
        let mut xs: Vec<f32> = (-4000..4000).map(|i| i as f32 * 2.5e-3).collect();
        let expected: Vec<f64> = xs
            .iter()
            .map(|&x| 0.5 * x as f64 * (1.0 + erf64(x as f64 / 2f64.sqrt())))
            .collect();
        gelu_erf(&mut xs);
        for ((ours, exact), x) in xs.iter().zip(&expected).zip(-4000..) {
            let bound = 1e-7 + 2.5e-7 * (x as f64 * 2.5e-3).abs();
            assert!((*ours as f64 - exact).abs() < bound, "{ours} vs {exact}");
        }
    }

    #[test]
    fn silu_mul_matches_f64() {
        let gate: Vec<f32> = (-2000..2000).map(|i| i as f32 * 0.05).collect();
        let up: Vec<f32> = gate.iter().map(|g| (g * 0.3).cos()).collect();
        let mut out = vec![0f32; gate.len()];
        silu_mul(&gate, &up, &mut out);
        for ((o, g), u) in out.iter().zip(&gate).zip(&up) {
            let (g, u) = (*g as f64, *u as f64);
            let exact = g / (1.0 + (-g).exp()) * u;
            assert!(
                (*o as f64 - exact).abs() <= 4e-7 * exact.abs() + 1e-30,
                "{o} vs {exact}"
            );
        }
        let mut edge = [0f32; 3];
        silu_mul(&[-200.0, 200.0, f32::NAN], &[1.0, 1.0, 1.0], &mut edge);
        assert_eq!(&edge[..2], &[-0.0, 200.0]);
        assert!(edge[2].is_nan());
    }

    #[test]
    fn softmax_rows_sum_to_one_and_match_f64() {
        let width = 37;
        let mut rows: Vec<f32> = (0..3 * width)
            .map(|i| ((i * 7919) % 101) as f32 * 0.31 - 15.0)
            .collect();
        rows[5] = f32::NEG_INFINITY;
        let input = rows.clone();
        softmax_rows(&mut rows, width);
        for (out, inp) in rows.chunks(width).zip(input.chunks(width)) {
            let max = inp.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
            let total: f64 = inp.iter().map(|&x| (x as f64 - max).exp()).sum();
            for (o, i) in out.iter().zip(inp) {
                let exact = (*i as f64 - max).exp() / total;
                assert!(
                    (*o as f64 - exact).abs() < 1e-7 + 1e-6 * exact,
                    "{o} vs {exact}"
                );
            }
        }
        assert_eq!(rows[5], 0.0);
    }

    #[test]
    fn dot_and_axpy_match_f64_at_any_length() {
        for len in [1, 15, 16, 17, 64, 100, 128] {
            let a: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..len).map(|i| (i as f32 * 0.11).cos()).collect();
            let exact: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!(
                (dot_generic(&a, &b) as f64 - exact).abs() < 1e-5,
                "len {len}"
            );
            let mut y = b.clone();
            axpy_generic(0.5, &a, &mut y);
            for ((y, a), b) in y.iter().zip(&a).zip(&b) {
                assert_eq!(*y, b + 0.5 * a);
            }
        }
    }

    /// The generic (baseline) compilation and the dispatched (widest) one agree bit for bit.
    #[test]
    fn every_compilation_gives_the_same_bits() {
        let mut xs: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.7).sin() * 9.0).collect();
        let mut ys = xs.clone();
        gelu_erf(&mut xs);
        for y in ys.iter_mut() {
            *y = gelu(*y);
        }
        assert_eq!(xs, ys);
        softmax_rows(&mut xs, 100);
        softmax_rows_generic(&mut ys, 100);
        assert_eq!(xs, ys);
    }
}
