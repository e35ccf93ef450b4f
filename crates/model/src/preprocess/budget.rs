//! The most memory [`preprocess`](super::preprocess) takes for one image, stated from the
//! limits alone so that a server can size itself and a test or fuzzer can hold it to it.

use super::decode::{DecodeLimits, JPEG_COEFFICIENT_BYTES_PER_PIXEL, PNG_METADATA_BYTES};

/// Bytes per allowed pixel at the costliest moment of any path, with `P = max_pixels`:
///
/// * decoding, the largest share: an animated lossy WebP with alpha holds image-webp's canvas
///   (4 P), the frame in RGBA (4 P), its YUV planes (1.5 P) and alpha plane (P), and the RGBA
///   samples handed back (4 P): 14.5 P. A progressive CMYK JPEG holds libjpeg-turbo's
///   coefficients (capped at 8 P) and the CMYK samples (4 P); a 16-bit RGBA PNG its samples
///   (8 P); GIF and BMP at most 4 P. Samples become RGB in place, never in a second buffer.
/// * resizing: the decoded image (3 P), the horizontal pass's rows and the result (3 P each,
///   since the resize is refused when it would cost more than `P` pixels) and the tap tables
///   (16 bytes per source pixel of one axis, at most `P / 64`).
/// * normalising: the resized image and its f32 copy, 15 bytes per output pixel, at most
///   15 P when the output side's square is all of `max_pixels`.
const PEAK_BYTES_PER_PIXEL: u64 = 16;
const _: () = assert!(JPEG_COEFFICIENT_BYTES_PER_PIXEL + 4 <= PEAK_BYTES_PER_PIXEL);

/// What does not grow with the pixel count: the PNG decoder's metadata allowance and its row
/// buffers (each row is within that allowance, and it keeps about three), libjpeg-turbo's row
/// buffers and tables (sides are at most 65,535 pixels), VP8's macroblock padding (sides at
/// most 16,383), Huffman and LZW tables.
const FIXED_BYTES: u64 = 4 * PNG_METADATA_BYTES as u64 + (32 << 20);

/// The most bytes [`preprocess`](super::preprocess) allocates at once for one image under
/// `limits`, whatever the bytes are: every buffer of decoding (the decoder's own included,
/// libjpeg-turbo's C heap too), resizing and normalising, on top of the input slice itself.
///
/// For the defaults (50 megapixels) this is 16 × 50,000,000 + 96 MiB ≈ 901 MB; it does not
/// depend on `max_bytes`, since no decoder keeps more than a fixed share of the input.
/// image-webp builds every Huffman group a lossless WebP bitstream declares (up to 65,536 of
/// them, about 120 KB each at worst) before looking at pixels, which would let a few MB of file
/// allocate gigabytes: the bitstream (a `VP8L` frame or a lossless `ALPH` plane) is read up to
/// the end of its groups first, and an image whose groups, with what the decoder already holds,
/// would pass this bound is refused.
pub fn peak_bytes_bound(limits: &DecodeLimits) -> u64 {
    limits
        .max_pixels
        .saturating_mul(PEAK_BYTES_PER_PIXEL)
        .saturating_add(FIXED_BYTES)
}
