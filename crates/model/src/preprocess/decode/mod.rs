//! Decoding to 8-bit RGB with the values Pillow's `Image.open(f).convert("RGB")` gives.
//!
//! The format is recognised from the leading bytes, as Pillow does, never from a name or a MIME
//! type. Alpha is dropped, not composited, because that is what `convert("RGB")` does. EXIF
//! orientation is ignored because neither Pillow's `open` nor upstream applied it.

mod bmp;
mod gif;
mod jpeg;
mod png;
mod webp;

use std::fmt;

use image::RgbImage;

use super::PreprocessError;

/// The formats accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Png,
    Jpeg,
    Gif,
    Bmp,
    WebP,
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Png => "PNG",
            Self::Jpeg => "JPEG",
            Self::Gif => "GIF",
            Self::Bmp => "BMP",
            Self::WebP => "WebP",
        })
    }
}

/// Bounds on untrusted input, enforced before decoding so that a small hostile file cannot
/// make the server allocate gigabytes (a decompression bomb).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Most pixels (width × height, from the header) an image may have. Peak memory while
    /// decoding is a few bytes per pixel: up to 8 for a 16-bit RGBA PNG, plus 3 for the result.
    pub max_pixels: u64,
    /// Most bytes of encoded data accepted.
    pub max_bytes: usize,
}

impl Default for DecodeLimits {
    /// 50 megapixels (more than phones send by default; peak memory stays under ~600 MB) and
    /// 64 MiB of data. Pillow's own guard is looser: it refuses from 179 megapixels.
    fn default() -> Self {
        Self {
            max_pixels: 50_000_000,
            max_bytes: 64 << 20,
        }
    }
}

/// Decodes `bytes` to RGB, as Pillow would, after checking `limits`.
pub fn decode_rgb(bytes: &[u8], limits: &DecodeLimits) -> Result<RgbImage, PreprocessError> {
    if bytes.is_empty() {
        return Err(PreprocessError::Empty);
    }
    if bytes.len() > limits.max_bytes {
        return Err(PreprocessError::TooManyBytes {
            len: bytes.len(),
            max: limits.max_bytes,
        });
    }
    match sniff(bytes)? {
        ImageFormat::Png => png::decode(bytes, limits),
        ImageFormat::Jpeg => jpeg::decode(bytes, limits),
        ImageFormat::Gif => gif::decode(bytes, limits),
        ImageFormat::Bmp => bmp::decode(bytes, limits),
        ImageFormat::WebP => webp::decode(bytes, limits),
    }
}

fn sniff(bytes: &[u8]) -> Result<ImageFormat, PreprocessError> {
    let at = |offset: usize, magic: &[u8]| bytes.get(offset..offset + magic.len()) == Some(magic);
    if at(0, b"\x89PNG\r\n\x1a\n") {
        Ok(ImageFormat::Png)
    } else if at(0, b"\xff\xd8\xff") {
        Ok(ImageFormat::Jpeg)
    } else if at(0, b"GIF87a") || at(0, b"GIF89a") {
        Ok(ImageFormat::Gif)
    } else if at(0, b"BM") {
        Ok(ImageFormat::Bmp)
    } else if at(0, b"RIFF") && at(8, b"WEBP") {
        Ok(ImageFormat::WebP)
    } else {
        Err(PreprocessError::UnsupportedFormat(unsupported_name(bytes)))
    }
}

/// Names a few formats clients commonly send, so that the error says what was received.
fn unsupported_name(bytes: &[u8]) -> &'static str {
    let head = &bytes[..bytes.len().min(512)];
    let text = head.trim_ascii_start();
    if head.starts_with(b"II*\0") || head.starts_with(b"MM\0*") {
        "TIFF"
    } else if head.get(4..8) == Some(b"ftyp") {
        "HEIF/AVIF or another ISO media file"
    } else if text.starts_with(b"<") {
        "SVG or other markup text"
    } else {
        "unrecognised data"
    }
}

/// Checks the size read from a header and returns the pixel count, before any buffer of that
/// size exists.
fn check_size(
    format: ImageFormat,
    width: u64,
    height: u64,
    limits: &DecodeLimits,
) -> Result<usize, PreprocessError> {
    let pixels = width.saturating_mul(height);
    if pixels == 0 {
        return Err(PreprocessError::ZeroSize {
            format,
            width,
            height,
        });
    }
    if pixels > limits.max_pixels {
        return Err(PreprocessError::TooManyPixels {
            format,
            width,
            height,
            max: limits.max_pixels,
        });
    }
    usize::try_from(pixels).map_err(|_| PreprocessError::TooManyPixels {
        format,
        width,
        height,
        max: limits.max_pixels,
    })
}

fn corrupt(format: ImageFormat, reason: impl fmt::Display) -> PreprocessError {
    PreprocessError::Corrupt {
        format,
        reason: reason.to_string(),
    }
}

/// Wraps RGB bytes whose length the caller derived from `width`×`height`.
fn rgb_image(width: u32, height: u32, data: Vec<u8>) -> RgbImage {
    RgbImage::from_raw(width, height, data).expect("decoders fill width*height*3 bytes")
}

/// `convert("RGB")` of an image with one 8-bit grey channel and `stride` bytes per pixel
/// (alpha, if any, dropped).
fn grey_to_rgb(samples: &[u8], stride: usize) -> Vec<u8> {
    samples
        .chunks_exact(stride)
        .flat_map(|px| [px[0]; 3])
        .collect()
}

/// `convert("RGB")` of 8-bit RGB with `stride` bytes per pixel (alpha, if any, dropped).
fn rgbx_to_rgb(samples: &[u8], stride: usize) -> Vec<u8> {
    if stride == 3 {
        return samples.to_vec();
    }
    samples
        .chunks_exact(stride)
        .flat_map(|px| [px[0], px[1], px[2]])
        .collect()
}

/// Decodes with an `image` decoder once its header has passed `limits`, dropping alpha.
fn decode_with_image(
    format: ImageFormat,
    decoder: impl image::ImageDecoder,
    limits: &DecodeLimits,
) -> Result<RgbImage, PreprocessError> {
    let (width, height) = decoder.dimensions();
    check_size(format, width.into(), height.into(), limits)?;
    let colour = decoder.color_type();
    let size = usize::try_from(decoder.total_bytes()).map_err(|e| corrupt(format, e))?;
    let mut samples = vec![0u8; size];
    decoder
        .read_image(&mut samples)
        .map_err(|e| corrupt(format, e))?;
    let rgb = match colour {
        image::ColorType::L8 => grey_to_rgb(&samples, 1),
        image::ColorType::La8 => grey_to_rgb(&samples, 2),
        image::ColorType::Rgb8 => samples,
        image::ColorType::Rgba8 => rgbx_to_rgb(&samples, 4),
        other => {
            return Err(corrupt(
                format,
                format!("unexpected pixel layout {other:?}"),
            ))
        }
    };
    Ok(rgb_image(width, height, rgb))
}
