//! Pillow 12's BICUBIC resize (`src/libImaging/Resample.c`), re-implemented to the bit.
//!
//! Pillow resamples in two separable passes with 22-bit fixed-point weights and clips the
//! intermediate image to u8 between them, so the pass order and every rounding step change the
//! output. Pillow ≤ 12 always runs the horizontal pass first (13.0 sometimes starts with the
//! vertical one); V1.1 was trained with the ≤ 12 order, which is what this reproduces.

use image::RgbImage;

/// Fixed-point fraction bits: 8 bits of pixel, 2 bits of headroom for the filter's negative
/// lobes and overshoot, within a 32-bit accumulator.
const PRECISION_BITS: u32 = 32 - 8 - 2;
/// Added to each accumulator so that the final shift rounds half up.
const HALF: i32 = 1 << (PRECISION_BITS - 1);
/// Radius of the bicubic kernel at scale 1.
const SUPPORT: f64 = 2.0;

/// Keys' cubic convolution with a = -0.5, the kernel Pillow calls BICUBIC.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// For each output position along one axis: the first input index, how many inputs it reads
/// and their fixed-point weights (`stride` slots per output, unused ones zero).
struct Taps {
    start: Vec<usize>,
    len: Vec<usize>,
    weights: Vec<i32>,
    stride: usize,
}

impl Taps {
    /// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for the box (0, in_size).
    fn new(in_size: u32, out_size: u32) -> Self {
        // Pillow passes the box as C floats, so the input extent goes through f32 first.
        let scale = f64::from(in_size as f32) / f64::from(out_size);
        // Shrinking widens the kernel (antialiasing); enlarging keeps it at radius 2.
        let filter_scale = scale.max(1.0);
        let support = SUPPORT * filter_scale;
        // Pillow multiplies by the reciprocal; dividing can differ in the last bit.
        let inv_filter_scale = 1.0 / filter_scale;
        let stride = support.ceil() as usize * 2 + 1;
        let out = out_size as usize;
        let mut taps = Self {
            start: Vec::with_capacity(out),
            len: Vec::with_capacity(out),
            weights: vec![0; out * stride],
            stride,
        };
        let mut w = vec![0.0f64; stride];
        for (xx, fixed) in taps.weights.chunks_exact_mut(stride).enumerate() {
            let center = (xx as f64 + 0.5) * scale;
            // C's (int) cast truncates toward zero, which is what `as` does.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(i64::from(in_size));
            let n = (xmax - xmin).max(0) as usize;
            let mut total = 0.0;
            for (x, wx) in w[..n].iter_mut().enumerate() {
                *wx = bicubic(((x as i64 + xmin) as f64 - center + 0.5) * inv_filter_scale);
                total += *wx;
            }
            for (wx, fx) in w[..n].iter().zip(fixed.iter_mut()) {
                let normalised = if total != 0.0 { wx / total } else { *wx };
                // Round half away from zero, as Pillow does.
                let scaled = normalised * f64::from(1u32 << PRECISION_BITS);
                *fx = if normalised < 0.0 {
                    (scaled - 0.5) as i32
                } else {
                    (scaled + 0.5) as i32
                };
            }
            taps.start.push(xmin as usize);
            taps.len.push(n);
        }
        taps
    }

    fn of(&self, i: usize) -> (usize, &[i32]) {
        let weights = &self.weights[i * self.stride..][..self.len[i]];
        (self.start[i], weights)
    }
}

fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes to `width`×`height` exactly as Pillow 12's `Image.resize(size, Image.BICUBIC)`
/// does for an RGB image, aspect ratio ignored.
///
/// A dimension that does not change skips its pass, as in Pillow (the pass would not be the
/// identity: the kernel still blurs).
pub fn resize_bicubic(src: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (in_w, in_h) = src.dimensions();
    // Pillow's loops would read nothing and write clip8(HALF) = 0 everywhere.
    if width == 0 || height == 0 || in_w == 0 || in_h == 0 {
        return RgbImage::new(width, height);
    }
    let vertical = Taps::new(in_h, height);
    let horizontal_out;
    // The horizontal pass only produces the rows the vertical pass reads, as in Pillow.
    let (pixels, row_offset) = if width != in_w {
        let first = vertical.start[0];
        let last = vertical.start[height as usize - 1] + vertical.len[height as usize - 1];
        horizontal_out = resample_rows(src, first..last, &Taps::new(in_w, width));
        (horizontal_out.as_slice(), first)
    } else {
        (src.as_raw().as_slice(), 0)
    };
    let data = if height != in_h {
        resample_columns(pixels, width as usize, row_offset, &vertical)
    } else {
        pixels.to_vec()
    };
    RgbImage::from_raw(width, height, data).expect("both passes produce width*height*3 bytes")
}

/// Horizontal pass over the source rows in `rows`.
fn resample_rows(src: &RgbImage, rows: std::ops::Range<usize>, taps: &Taps) -> Vec<u8> {
    let in_row = src.width() as usize * 3;
    let out_w = taps.len.len();
    let mut out = Vec::with_capacity(rows.len() * out_w * 3);
    for row in src
        .as_raw()
        .chunks_exact(in_row)
        .skip(rows.start)
        .take(rows.len())
    {
        for xx in 0..out_w {
            let (start, weights) = taps.of(xx);
            let mut acc = [HALF; 3];
            for (px, &w) in row[start * 3..].chunks_exact(3).zip(weights) {
                acc[0] += i32::from(px[0]) * w;
                acc[1] += i32::from(px[1]) * w;
                acc[2] += i32::from(px[2]) * w;
            }
            out.extend(acc.map(clip8));
        }
    }
    out
}

/// Vertical pass; `pixels` holds rows of `width` RGB pixels whose first row is source row
/// `row_offset`. Whole rows are accumulated at once for locality; integer sums do not depend
/// on the order, so this equals Pillow's per-pixel loop.
fn resample_columns(pixels: &[u8], width: usize, row_offset: usize, taps: &Taps) -> Vec<u8> {
    let row_len = width * 3;
    let out_h = taps.len.len();
    let mut out = Vec::with_capacity(out_h * row_len);
    let mut acc = vec![0i32; row_len];
    for yy in 0..out_h {
        let (start, weights) = taps.of(yy);
        acc.fill(HALF);
        let rows = pixels[(start - row_offset) * row_len..].chunks_exact(row_len);
        for (row, &w) in rows.zip(weights) {
            for (a, &p) in acc.iter_mut().zip(row) {
                *a += i32::from(p) * w;
            }
        }
        out.extend(acc.iter().map(|&a| clip8(a)));
    }
    out
}
