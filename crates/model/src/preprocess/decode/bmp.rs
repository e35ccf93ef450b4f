//! BMP through `image`, with one correction: `image` widens 5- and 6-bit channels of 16-bit
//! BMPs by rounding, Pillow's unpackers (`BGR;15`, `BGR;16`) by truncating `v * 255 / max`.

use std::io::Cursor;

use image::codecs::bmp::BmpDecoder;
use image::RgbImage;

use super::{corrupt, decode_with_image, ImageFormat, SizeCheck};
use crate::preprocess::PreprocessError;

const FORMAT: ImageFormat = ImageFormat::Bmp;

pub(super) fn decode(bytes: &[u8], check: SizeCheck<'_>) -> Result<RgbImage, PreprocessError> {
    // `image` refuses sides over 65535 as malformed; checking first reports them as too big.
    if let Some((width, height)) = header_size(bytes) {
        check.pixels(FORMAT, width, height)?;
    }
    let decoder = BmpDecoder::new(Cursor::new(bytes)).map_err(|e| corrupt(FORMAT, e))?;
    let mut image = decode_with_image(FORMAT, decoder, check)?;
    if let Some(bits) = sixteen_bit_layout(bytes)? {
        for px in image.pixels_mut() {
            for (v, &b) in px.0.iter_mut().zip(&bits) {
                *v = widen_like_pillow(*v, b);
            }
        }
    }
    Ok(image)
}

/// Width and height from the info header (negative heights mean top-down rows), or `None`
/// for the old 12-byte header, whose 16-bit sizes `image` handles.
fn header_size(bytes: &[u8]) -> Option<(u64, u64)> {
    let i32_at = |at: usize| {
        bytes
            .get(at..at + 4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    if i32_at(14)? <= 12 {
        return None;
    }
    Some((
        i32_at(18)?.unsigned_abs().into(),
        i32_at(22)?.unsigned_abs().into(),
    ))
}

/// Bits of red, green and blue when the file is a 16-bit BMP, read from the headers `image`
/// has already validated.
///
/// Pillow accepts exactly two 16-bit layouts, 5-5-5 (`BI_RGB`, or bit fields 0x7C00, 0x3E0,
/// 0x1F) and 5-6-5 (bit fields 0xF800, 0x7E0, 0x1F), and refuses any other.
fn sixteen_bit_layout(bytes: &[u8]) -> Result<Option<[u32; 3]>, PreprocessError> {
    let u16_at = |at: usize| {
        bytes
            .get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |at: usize| {
        bytes
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    // BITMAPCOREHEADER (12 bytes) has no 16-bit mode; the others keep the bit count at 28.
    if u32_at(14) == Some(12) || u16_at(28) != Some(16) {
        return Ok(None);
    }
    const BI_RGB: u32 = 0;
    const BI_BITFIELDS: u32 = 3;
    // The three masks follow a 40-byte header and sit at the same offset inside longer ones.
    let masks = [u32_at(54), u32_at(58), u32_at(62)];
    match (u32_at(30), masks) {
        (Some(BI_RGB), _) => Ok(Some([5, 5, 5])),
        (Some(BI_BITFIELDS), [Some(0x7C00), Some(0x3E0), Some(0x1F)]) => Ok(Some([5, 5, 5])),
        (Some(BI_BITFIELDS), [Some(0xF800), Some(0x7E0), Some(0x1F)]) => Ok(Some([5, 6, 5])),
        _ => Err(PreprocessError::UnsupportedFormat(
            "16-bit BMP with a bit-field layout other than 5-5-5 or 5-6-5",
        )),
    }
}

/// Recovers the `bits`-bit sample from `image`'s rounded widening (rounding back is exact for
/// any widening within half a step of `v * 255 / max`), then widens it Pillow's way.
fn widen_like_pillow(v: u8, bits: u32) -> u8 {
    let max = (1u32 << bits) - 1;
    let sample = (u32::from(v) * max + 127) / 255;
    (sample * 255 / max) as u8
}
