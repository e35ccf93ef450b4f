//! q4k and q8_0 weights packed once, at load, for the AVX-512 VNNI integer dot product, and
//! their matmul on the CPU.
//!
//! candle's quantized matmul keeps a weight in ggml's blocks and, on a VNNI CPU, builds a
//! second copy in an expanded tile layout the first time it multiplies fewer than 64 rows;
//! the cache has no switch, so a q4k model takes 2.3 times its size (the 13 B decoder: 7.1 GB
//! of blocks and 9.5 GB of tiles), which puts the full model past a 24 GB machine. Here the
//! tiles are the only copy: built from ggml's blocks while loading (the blocks are then
//! dropped) and multiplied directly at every count of rows, prefill chunks included (on this
//! project's CPUs the integer dot products outran the f32 GEMM up to 256 rows and more).
//!
//! The values are ggml's exactly (each weight's 4- or 8-bit code and its block's scale and
//! minimum, multiplied out to f32 as ggml's dequantization does): dequantizing the tiles gives
//! candle's dequantization of the same blocks, bit for bit (the tests check it). The activations are quantized per 32 values to i8 with an f32 scale, as
//! ggml quantizes them for q8_0 (for q4k ggml uses one scale per 256; per 32 is finer).
//!
//! Layout: tiles of 16 output rows (one zmm of i32 lanes), and per tile, for each block of 32
//! input values, the codes as `vpdpbusd` reads them: 64-byte vectors whose lane r holds row
//! r's four codes for input values 4g..4g+4. q8_0 has eight such vectors per block (its signed
//! codes stored +128, as u8, the offset taken back through the activations' sums); q4k four,
//! each holding two in its nibbles (low: values 4p.., high: 16 + 4p..). Beside them the
//! block's 16 scales and (q4k) 16 minimums.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Result;
use half::f16;
use rayon::prelude::*;

/// Output rows per tile: one zmm of i32 (or f32) lanes.
const TILE: usize = 16;
/// Input values per block: one scale for each row of a tile.
const BLOCK: usize = 32;
/// Activation rows multiplied against a tile at once (their accumulators stay in registers).
const MAX_ROWS: usize = 8;
/// Rows whose activations are kept in cache while every tile passes over them.
const ROW_BLOCK: usize = 64;

/// ggml's type whose codes a [`VnniWeight`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Codes {
    /// Unsigned 4-bit codes; a value is `scale·q − min`.
    Q4K,
    /// Signed 8-bit codes stored +128; a value is `scale·(q − 128)`.
    Q8_0,
}

impl Codes {
    /// Bytes of codes per tile and block.
    fn code_bytes(self) -> usize {
        match self {
            Codes::Q4K => TILE * BLOCK / 2,
            Codes::Q8_0 => TILE * BLOCK,
        }
    }

    /// f32 per tile and block: the scales, then (q4k) the minimums.
    fn scale_floats(self) -> usize {
        match self {
            Codes::Q4K => 2 * TILE,
            Codes::Q8_0 => TILE,
        }
    }
}

/// A weight [out, in] in VNNI tiles, the only copy kept of it.
#[derive(Debug, Clone)]
pub struct VnniWeight {
    codes_of: Codes,
    out_dim: usize,
    in_dim: usize,
    codes: Vec<u8>,
    scales: Vec<f32>,
}

/// Whether this CPU has the instructions the tiles are multiplied with: decided once, at load.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether a weight [out, in] quantized to `dtype` can be packed: q4k or q8_0, whole tiles of
/// rows, whole blocks of its type along `in`.
fn takes(dtype: GgmlDType, out_dim: usize, in_dim: usize) -> bool {
    matches!(dtype, GgmlDType::Q4K | GgmlDType::Q8_0)
        && out_dim > 0
        && out_dim.is_multiple_of(TILE)
        && in_dim > 0
        && in_dim.is_multiple_of(dtype.block_size())
}

/// ggml's q4k 6-bit scale and minimum of sub-block `j` (0..8) from a block's 12 packed bytes.
fn q4k_scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Sub-block `sub` (32 values) of ggml's q4k `block` (d, dmin, 12 scale bytes, 128 code bytes)
/// into row `r` of a tile's block: its codes and its scale and minimum.
fn pack_q4k(block: &[u8], sub: usize, r: usize, codes: &mut [u8], scales: &mut [f32]) {
    let (d, dmin) = (f16_at(block, 0), f16_at(block, 2));
    let (sc, m) = q4k_scale_min(sub, &block[4..16]);
    scales[r] = d * sc as f32;
    scales[TILE + r] = dmin * m as f32;
    // 32 bytes per 64 values: the first 32 in the low nibbles, the next 32 in the high ones.
    let qs = &block[16 + sub / 2 * 32..][..BLOCK];
    let q = |i: usize| {
        if sub.is_multiple_of(2) {
            qs[i] & 0x0F
        } else {
            qs[i] >> 4
        }
    };
    for p in 0..4 {
        for j in 0..4 {
            codes[(p * TILE + r) * 4 + j] = q(4 * p + j) | (q(16 + 4 * p + j) << 4);
        }
    }
}

/// ggml's q8_0 `block` (d, 32 signed codes) into row `r` of a tile's block, codes +128.
fn pack_q8_0(block: &[u8], r: usize, codes: &mut [u8], scales: &mut [f32]) {
    scales[r] = f16_at(block, 0);
    for (i, &byte) in block[2..2 + BLOCK].iter().enumerate() {
        codes[(i / 4 * TILE + r) * 4 + i % 4] = (byte as i8 as i16 + 128) as u8;
    }
}

impl VnniWeight {
    /// Packs a quantized weight [out, in]; `None` when [`takes`] refuses its type or shape.
    pub fn pack(q: &QTensor) -> Result<Option<Self>> {
        let (out_dim, in_dim) = q.shape().dims2()?;
        let dtype = q.dtype();
        if !takes(dtype, out_dim, in_dim) {
            return Ok(None);
        }
        let codes_of = match dtype {
            GgmlDType::Q4K => Codes::Q4K,
            _ => Codes::Q8_0,
        };
        let data = q.data()?;
        let ggml_bytes = dtype.type_size();
        // Blocks of 32 per ggml block: 8 for q4k's 256, 1 for q8_0.
        let subs = dtype.block_size() / BLOCK;
        let row_bytes = in_dim / dtype.block_size() * ggml_bytes;
        if data.len() != out_dim * row_bytes {
            candle_core::bail!(
                "{dtype:?} weight [{out_dim}, {in_dim}] holds {} bytes, not {}",
                data.len(),
                out_dim * row_bytes
            );
        }
        let blocks = in_dim / BLOCK;
        let tiles = out_dim / TILE;
        let code_bytes = codes_of.code_bytes();
        let scale_floats = codes_of.scale_floats();
        let mut codes = vec![0u8; tiles * blocks * code_bytes];
        let mut scales = vec![0f32; tiles * blocks * scale_floats];
        codes
            .par_chunks_mut(blocks * code_bytes)
            .zip(scales.par_chunks_mut(blocks * scale_floats))
            .enumerate()
            .for_each(|(tile, (codes, scales))| {
                for r in 0..TILE {
                    let row = &data[(tile * TILE + r) * row_bytes..][..row_bytes];
                    for b in 0..blocks {
                        let codes = &mut codes[b * code_bytes..][..code_bytes];
                        let scales = &mut scales[b * scale_floats..][..scale_floats];
                        let block = &row[b / subs * ggml_bytes..][..ggml_bytes];
                        match codes_of {
                            Codes::Q4K => pack_q4k(block, b % subs, r, codes, scales),
                            Codes::Q8_0 => pack_q8_0(block, r, codes, scales),
                        }
                    }
                }
            });
        Ok(Some(Self {
            codes_of,
            out_dim,
            in_dim,
            codes,
            scales,
        }))
    }

    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    pub fn in_dim(&self) -> usize {
        self.in_dim
    }

    /// Bytes held: the codes and the scales.
    #[cfg(test)]
    fn size_in_bytes(&self) -> usize {
        self.codes.len() + self.scales.len() * 4
    }

    /// The weight in f32, transposed to [in, out] (the rows the CPU's GEMM streams), its values
    /// ggml's dequantization of the same blocks: what the product is checked against.
    #[cfg(test)]
    fn dequantize(&self) -> Vec<f32> {
        let (n, blocks) = (self.out_dim, self.in_dim / BLOCK);
        let (code_bytes, scale_floats) = (self.codes_of.code_bytes(), self.codes_of.scale_floats());
        let mut out = vec![0f32; self.in_dim * n];
        out.par_chunks_mut(BLOCK * n)
            .enumerate()
            .for_each(|(b, out)| {
                for tile in 0..n / TILE {
                    let at = tile * blocks + b;
                    let codes = &self.codes[at * code_bytes..][..code_bytes];
                    let scales = &self.scales[at * scale_floats..][..scale_floats];
                    for kk in 0..BLOCK {
                        let (g, j) = (kk % 16 / 4, kk % 4);
                        let dst = &mut out[kk * n + tile * TILE..][..TILE];
                        for (r, y) in dst.iter_mut().enumerate() {
                            *y = match self.codes_of {
                                Codes::Q4K => {
                                    let byte = codes[(g * TILE + r) * 4 + j];
                                    let q = if kk < 16 { byte & 0x0F } else { byte >> 4 };
                                    scales[r] * q as f32 - scales[TILE + r]
                                }
                                Codes::Q8_0 => {
                                    let q = codes[(kk / 4 * TILE + r) * 4 + j] as i32 - 128;
                                    scales[r] * q as f32
                                }
                            };
                        }
                    }
                }
            });
        out
    }

    /// `x` [rows, in] (f32, row-major) times the weight's transpose: [rows, out].
    pub fn matmul(&self, x: &[f32], rows: usize) -> Vec<f32> {
        // The kernel's instructions exist only where `available()` said so; `Linear` packs only
        // there, and this keeps any other caller from reaching them elsewhere.
        assert!(
            available(),
            "VNNI tiles multiplied on a CPU without AVX-512 VNNI"
        );
        assert_eq!(
            x.len(),
            rows * self.in_dim,
            "activations [{rows}, {}]",
            self.in_dim
        );
        let acts = Activations::quantize(x, rows, self.in_dim);
        let n = self.out_dim;
        let mut out = vec![0f32; rows * n];
        let chunks = rows.div_ceil(MAX_ROWS);
        let tiles = n / TILE;
        let block_chunks = ROW_BLOCK / MAX_ROWS;
        let row_blocks = chunks.div_ceil(block_chunks);
        let dst = SharedOut(out.as_mut_ptr());
        // Blocks of up to ROW_BLOCK rows, and within one, tile-major: the chunks of rows that
        // share a tile run one after another while its codes are in cache, and a block's
        // activations stay in cache across the tiles (a prefill chunk's thousand rows would
        // not).
        (0..row_blocks * tiles * block_chunks)
            .into_par_iter()
            .with_min_len(4)
            .for_each(|unit| {
                let (row_block, within) =
                    (unit / (tiles * block_chunks), unit % (tiles * block_chunks));
                let (tile, chunk) = (
                    within / block_chunks,
                    row_block * block_chunks + within % block_chunks,
                );
                if chunk >= chunks {
                    return;
                }
                let first = chunk * MAX_ROWS;
                let count = (rows - first).min(MAX_ROWS);
                // SAFETY: `available()` holds (asserted above); each unit writes its own 16
                // columns of its own rows, inside `out`.
                unsafe { x86::tile_rows(self, &acts, tile, first, count, &dst) };
            });
        out
    }
}

/// The output's base pointer, shared by units that each write disjoint elements.
struct SharedOut(*mut f32);
// SAFETY: units write disjoint (row, 16-column) spans of one live allocation.
unsafe impl Sync for SharedOut {}

/// Activation rows quantized per 32 values: i8 codes, their block's scale, and that scale times
/// the codes' sum (which takes back the weights' minimum or +128 offset).
struct Activations {
    codes: Vec<i8>,
    scale: Vec<f32>,
    scaled_sum: Vec<f32>,
    blocks: usize,
}

impl Activations {
    fn quantize(x: &[f32], rows: usize, in_dim: usize) -> Self {
        let blocks = in_dim / BLOCK;
        let mut codes = vec![0i8; rows * in_dim];
        let mut scale = vec![0f32; rows * blocks];
        let mut scaled_sum = vec![0f32; rows * blocks];
        // One row per task: a prefill chunk's thousands of rows are spread over the threads.
        x.par_chunks(in_dim.max(1))
            .zip(codes.par_chunks_mut(in_dim.max(1)))
            .zip(scale.par_chunks_mut(blocks.max(1)))
            .zip(scaled_sum.par_chunks_mut(blocks.max(1)))
            .with_min_len(8)
            .for_each(|(((x, codes), scale), scaled_sum)| {
                for ((x, codes), (scale, scaled_sum)) in x
                    .chunks_exact(BLOCK)
                    .zip(codes.chunks_exact_mut(BLOCK))
                    .zip(scale.iter_mut().zip(scaled_sum.iter_mut()))
                {
                    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let d = amax / 127.0;
                    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
                    let mut sum = 0i32;
                    for (c, v) in codes.iter_mut().zip(x) {
                        let q = (v * inv).round().clamp(-127.0, 127.0) as i8;
                        *c = q;
                        sum += q as i32;
                    }
                    *scale = d;
                    *scaled_sum = d * sum as f32;
                }
            });
        Self {
            codes,
            scale,
            scaled_sum,
            blocks,
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Activations, Codes, SharedOut, VnniWeight, BLOCK, MAX_ROWS, TILE};
    use std::arch::x86_64::*;

    /// Rows `first..first + count` (at most [`MAX_ROWS`]) of the output's 16 columns of `tile`.
    ///
    /// # Safety
    /// The CPU has AVX-512 F, BW and VNNI; `dst` points at [rows, out] f32.
    pub(super) unsafe fn tile_rows(
        w: &VnniWeight,
        acts: &Activations,
        tile: usize,
        first: usize,
        count: usize,
        dst: &SharedOut,
    ) {
        match count {
            1 => rows::<1>(w, acts, tile, first, dst),
            2 => rows::<2>(w, acts, tile, first, dst),
            3 => rows::<3>(w, acts, tile, first, dst),
            4 => rows::<4>(w, acts, tile, first, dst),
            5 => rows::<5>(w, acts, tile, first, dst),
            6 => rows::<6>(w, acts, tile, first, dst),
            7 => rows::<7>(w, acts, tile, first, dst),
            _ => rows::<MAX_ROWS>(w, acts, tile, first, dst),
        }
    }

    #[inline(always)]
    unsafe fn broadcast4(codes: &[i8], at: usize) -> __m512i {
        _mm512_set1_epi32(std::ptr::read_unaligned(
            codes.as_ptr().add(at) as *const i32
        ))
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn rows<const R: usize>(
        w: &VnniWeight,
        acts: &Activations,
        tile: usize,
        first: usize,
        dst: &SharedOut,
    ) {
        let blocks = acts.blocks;
        let (code_bytes, scale_floats) = (w.codes_of.code_bytes(), w.codes_of.scale_floats());
        let nibble = _mm512_set1_epi8(0x0F);
        let offset = _mm512_set1_ps(128.0);
        let mut acc = [_mm512_setzero_ps(); R];
        for b in 0..blocks {
            let at = tile * blocks + b;
            let codes = w.codes.as_ptr().add(at * code_bytes);
            let scales = w.scales.as_ptr().add(at * scale_floats);
            let scale = _mm512_loadu_ps(scales);
            // Taken back through the activations' sums: q4k's minimum, q8_0's +128.
            let min = match w.codes_of {
                Codes::Q4K => _mm512_loadu_ps(scales.add(TILE)),
                Codes::Q8_0 => _mm512_mul_ps(scale, offset),
            };
            // Two chains per row (values 0..16 and 16..32 of the block), so one row's
            // dependent dot products do not serialize.
            let mut low = [_mm512_setzero_si512(); R];
            let mut high = [_mm512_setzero_si512(); R];
            for g in 0..4 {
                let (lo, hi) = match w.codes_of {
                    Codes::Q4K => {
                        let v = _mm512_loadu_si512(codes.add(g * 64) as *const __m512i);
                        (
                            _mm512_and_si512(v, nibble),
                            _mm512_and_si512(_mm512_srli_epi16::<4>(v), nibble),
                        )
                    }
                    Codes::Q8_0 => (
                        _mm512_loadu_si512(codes.add(g * 64) as *const __m512i),
                        _mm512_loadu_si512(codes.add((g + 4) * 64) as *const __m512i),
                    ),
                };
                for i in 0..R {
                    let a = &acts.codes[((first + i) * blocks + b) * BLOCK..][..BLOCK];
                    low[i] = _mm512_dpbusd_epi32(low[i], lo, broadcast4(a, 4 * g));
                    high[i] = _mm512_dpbusd_epi32(high[i], hi, broadcast4(a, 16 + 4 * g));
                }
            }
            for i in 0..R {
                let at = (first + i) * blocks + b;
                let dot = _mm512_cvtepi32_ps(_mm512_add_epi32(low[i], high[i]));
                let d = _mm512_set1_ps(*acts.scale.get_unchecked(at));
                let sum = _mm512_set1_ps(*acts.scaled_sum.get_unchecked(at));
                acc[i] = _mm512_fmadd_ps(dot, _mm512_mul_ps(scale, d), acc[i]);
                acc[i] = _mm512_fnmadd_ps(min, sum, acc[i]);
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            _mm512_storeu_ps(dst.0.add((first + i) * w.out_dim + tile * TILE), *acc);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    use super::{Activations, SharedOut, VnniWeight};

    /// Never called: [`super::available`] is false off x86.
    pub(super) unsafe fn tile_rows(
        _: &VnniWeight,
        _: &Activations,
        _: usize,
        _: usize,
        _: usize,
        _: &SharedOut,
    ) {
        unreachable!("VNNI tiles off x86")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn weight(out_dim: usize, in_dim: usize) -> Tensor {
        Tensor::randn(0f32, 1.0, (out_dim, in_dim), &Device::Cpu).unwrap()
    }

    /// The packed values are ggml's: dequantizing the tiles gives candle's dequantization of
    /// the same blocks, bit for bit.
    #[test]
    fn dequantizes_to_candles_values_exactly() {
        for dtype in [GgmlDType::Q4K, GgmlDType::Q8_0] {
            let q = QTensor::quantize(&weight(48, 512), dtype).unwrap();
            let packed = VnniWeight::pack(&q).unwrap().unwrap();
            // 6 bits a weight for q4k (the code and a share of each 32's f32 scale and
            // minimum), 9 for q8_0.
            let bits = packed.size_in_bytes() * 8 / (48 * 512);
            assert_eq!(bits, if dtype == GgmlDType::Q4K { 6 } else { 9 });
            let ours = packed.dequantize();
            let theirs: Vec<Vec<f32>> = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .t()
                .unwrap()
                .to_vec2()
                .unwrap();
            assert_eq!(ours, theirs.concat(), "{dtype:?}");
        }
    }

    /// Only q4k and q8_0, in whole tiles and blocks.
    #[test]
    fn refuses_what_it_cannot_pack() {
        assert!(takes(GgmlDType::Q4K, 32, 5120));
        assert!(!takes(GgmlDType::Q4K, 32, 1376));
        assert!(takes(GgmlDType::Q8_0, 32, 1376));
        assert!(!takes(GgmlDType::Q8_0, 40, 1376));
        assert!(!takes(GgmlDType::Q6K, 32, 5120));
        let q = QTensor::quantize(&weight(8, 256), GgmlDType::Q4K).unwrap();
        assert!(VnniWeight::pack(&q).unwrap().is_none());
    }

    /// The product equals the dequantized weight's within the activations' 8-bit rounding, for
    /// every count of rows a chunk can have (1 to 8, and past 8 in several chunks).
    #[test]
    fn matmul_matches_the_dequantized_product() {
        if !available() {
            eprintln!("skipped: this CPU lacks AVX-512 VNNI, so the tiles are never used here");
            return;
        }
        let (out_dim, in_dim) = (64, 768);
        for dtype in [GgmlDType::Q4K, GgmlDType::Q8_0] {
            let q = QTensor::quantize(&weight(out_dim, in_dim), dtype).unwrap();
            let packed = VnniWeight::pack(&q).unwrap().unwrap();
            let w = Tensor::from_vec(packed.dequantize(), (in_dim, out_dim), &Device::Cpu).unwrap();
            assert!(packed.matmul(&[], 0).is_empty());
            for rows in [1, 2, 3, 5, 8, 9, 17, 64, 130] {
                let x = Tensor::randn(0f32, 1.0, (rows, in_dim), &Device::Cpu).unwrap();
                let expected: Vec<f32> = x
                    .matmul(&w)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
                let ours = packed.matmul(&xs, rows);
                let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
                let error = ours
                    .iter()
                    .zip(&expected)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                // An i8 code per value: the product moves by about 1/127 of each term, much
                // less over 768 random signs; a wrong code, scale or row would move it by the
                // output's whole scale.
                assert!(
                    error < 0.02 * scale,
                    "{dtype:?}, {rows} rows: error {error} against outputs up to {scale}"
                );
            }
        }
    }
}
