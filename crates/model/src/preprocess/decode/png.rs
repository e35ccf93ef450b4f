//! PNG through the `png` crate, which (unlike `image`) reports the file's own colour type and
//! bit depth: Pillow treats 16-bit grey differently from 16-bit grey+alpha, and both come out
//! of the decoder as 16-bit grey+alpha when a grey image has a tRNS chunk.

use std::io::Cursor;

use image::RgbImage;
use png::{BitDepth, ColorType, Transformations};

use super::{corrupt, grey_to_rgb, rgb_image, rgbx_to_rgb, to_rgb, ImageFormat, SizeCheck};
use crate::preprocess::PreprocessError;

const FORMAT: ImageFormat = ImageFormat::Png;

/// What the `png` crate may allocate besides the pixels, cumulatively: metadata chunks (text,
/// ICC profiles, decompressed or not) and its output row. Pillow caps a text chunk at 1 MiB and
/// all text at 64 MiB; a single image's metadata larger than this is no photograph.
pub(crate) const METADATA_BYTES: usize = 16 << 20;

pub(super) fn decode(bytes: &[u8], check: SizeCheck<'_>) -> Result<RgbImage, PreprocessError> {
    let mut decoder = png::Decoder::new_with_limits(
        Cursor::new(bytes),
        png::Limits {
            bytes: METADATA_BYTES,
        },
    );
    let header = decoder.read_header_info().map_err(png_error)?;
    let (width, height) = (header.width, header.height);
    check.pixels(FORMAT, width.into(), height.into())?;
    let source_colour = header.color_type;
    // Palette to RGB(A), 1/2/4-bit grey scaled to 8 bits (×255, ×85, ×17 like Pillow's
    // unpackers) and tRNS to an alpha channel, which is then dropped; 16 bits stay 16 bits.
    decoder.set_transformations(Transformations::EXPAND);
    let mut reader = decoder.read_info().map_err(png_error)?;
    // The png crate's palette expansion indexes whole RGB entries and panics on a PLTE
    // chunk that is not whole entries (one of 49 bytes, found by fuzzing); the PNG
    // specification makes that chunk an error.
    if let Some(palette) = &reader.info().palette {
        if !palette.len().is_multiple_of(3) {
            return Err(corrupt(
                FORMAT,
                format_args!(
                    "its palette (PLTE) is {} bytes, not whole RGB entries",
                    palette.len()
                ),
            ));
        }
    }
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| corrupt(FORMAT, "image too large for this platform"))?;
    let mut samples = vec![0; size];
    let frame = reader.next_frame(&mut samples).map_err(png_error)?;
    // The decoder's row buffers go before the conversion needs room.
    drop(reader);
    samples.truncate(frame.buffer_size());
    let rgb = match (frame.color_type, frame.bit_depth) {
        (ColorType::Grayscale, BitDepth::Sixteen) => grey16_to_rgb(samples, 2),
        // Grey with tRNS is still Pillow's "I;16", only the decoder added the alpha.
        (ColorType::GrayscaleAlpha, BitDepth::Sixteen) if source_colour == ColorType::Grayscale => {
            grey16_to_rgb(samples, 4)
        }
        // True grey+alpha is unpacked as "LA;16B": the high byte (first, big-endian) is kept.
        (ColorType::GrayscaleAlpha, BitDepth::Sixteen) => grey_to_rgb(samples, 4),
        (ColorType::Rgb, BitDepth::Sixteen) => high_bytes_rgb(samples, 6),
        (ColorType::Rgba, BitDepth::Sixteen) => high_bytes_rgb(samples, 8),
        (ColorType::Grayscale, _) => grey_to_rgb(samples, 1),
        (ColorType::GrayscaleAlpha, _) => grey_to_rgb(samples, 2),
        (ColorType::Rgb, _) => rgbx_to_rgb(samples, 3),
        (ColorType::Rgba, _) => rgbx_to_rgb(samples, 4),
        (ColorType::Indexed, _) => return Err(corrupt(FORMAT, "palette was not expanded")),
    };
    Ok(rgb_image(width, height, rgb))
}

/// The decoder's error as the client's: the allowance, when exceeded, is named.
fn png_error(e: png::DecodingError) -> PreprocessError {
    match e {
        png::DecodingError::LimitsExceeded => corrupt(
            FORMAT,
            format_args!(
                "its metadata or one row needs more than {} MiB",
                METADATA_BYTES >> 20
            ),
        ),
        other => corrupt(FORMAT, other),
    }
}

/// Pillow opens 16-bit grey as "I;16", whose conversion to RGB clamps: `min(v, 255)`, so
/// anything but very dark values becomes white.
fn grey16_to_rgb(samples: Vec<u8>, stride: usize) -> Vec<u8> {
    to_rgb(samples, stride, |px| {
        [u16::from_be_bytes([px[0], px[1]]).min(255) as u8; 3]
    })
}

/// Pillow unpacks 16-bit RGB(A) ("RGB;16B", "RGBA;16B") by keeping each sample's high byte.
fn high_bytes_rgb(samples: Vec<u8>, stride: usize) -> Vec<u8> {
    to_rgb(samples, stride, |px| [px[0], px[2], px[4]])
}
