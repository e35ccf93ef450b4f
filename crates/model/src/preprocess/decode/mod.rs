//! Decoding to 8-bit RGB with the values Pillow's `Image.open(f).convert("RGB")` gives.
//!
//! The format is recognised from the leading bytes, as Pillow does, never from a name or a MIME
//! type. Alpha is dropped, not composited, because that is what `convert("RGB")` does. EXIF
//! orientation is ignored because neither Pillow's `open` nor upstream applied it.

mod bmp;
mod gif;
mod jpeg;
mod png;
mod vp8l_bound;
mod webp;

use std::fmt;

use image::RgbImage;

use super::PreprocessError;
pub(crate) use jpeg::COEFFICIENT_BYTES_PER_PIXEL as JPEG_COEFFICIENT_BYTES_PER_PIXEL;
pub(crate) use png::METADATA_BYTES as PNG_METADATA_BYTES;

/// The smallest output side a resize is costed at: below it, the tap tables and per-row work
/// of a very long side would dominate whatever the output size.
const MIN_COSTED_SIDE: u32 = 64;

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
    /// Most pixels (width × height, from the header) an image may have. When the image is to
    /// be resized, the same budget also bounds the resize: see
    /// [`PreprocessError::TooCostlyToResize`]. Peak memory is a fixed multiple of this, stated
    /// by [`peak_bytes_bound`](crate::preprocess::peak_bytes_bound).
    pub max_pixels: u64,
    /// Most bytes of encoded data accepted.
    pub max_bytes: usize,
}

impl Default for DecodeLimits {
    /// 50 megapixels (more than phones send by default) and 64 MiB of data. Pillow's own guard
    /// is looser: it refuses from 179 megapixels.
    fn default() -> Self {
        Self {
            max_pixels: 50_000_000,
            max_bytes: 64 << 20,
        }
    }
}

/// Decodes `bytes` to RGB, as Pillow would, after checking `limits`.
pub fn decode_rgb(bytes: &[u8], limits: &DecodeLimits) -> Result<RgbImage, PreprocessError> {
    decode_checked(
        bytes,
        SizeCheck {
            limits,
            resize_to: None,
        },
    )
}

/// [`decode_rgb`] for an image about to be resized to `size`×`size`: the header is also
/// checked against the cost of that resize, so that an image refused for it is refused before
/// it is decoded.
pub(crate) fn decode_for_resize(
    bytes: &[u8],
    limits: &DecodeLimits,
    size: u32,
) -> Result<RgbImage, PreprocessError> {
    decode_checked(
        bytes,
        SizeCheck {
            limits,
            resize_to: Some(size),
        },
    )
}

fn decode_checked(bytes: &[u8], check: SizeCheck<'_>) -> Result<RgbImage, PreprocessError> {
    let limits = check.limits;
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
        ImageFormat::Png => png::decode(bytes, check),
        ImageFormat::Jpeg => jpeg::decode(bytes, check),
        ImageFormat::Gif => gif::decode(bytes, check),
        ImageFormat::Bmp => bmp::decode(bytes, check),
        ImageFormat::WebP => webp::decode(bytes, check),
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

/// What every decoder checks a header's size against before allocating anything that size.
#[derive(Debug, Clone, Copy)]
struct SizeCheck<'a> {
    limits: &'a DecodeLimits,
    /// Side of the square the decoded image is resized to, when it is.
    resize_to: Option<u32>,
}

impl SizeCheck<'_> {
    /// Checks the size read from a header and returns the pixel count.
    ///
    /// With a resize ahead, the image with each side raised to at least the output side (and
    /// at least [`MIN_COSTED_SIDE`]) must also fit `max_pixels`. Pillow's resize runs the horizontal pass first, over every source
    /// row the vertical pass reads, so its intermediate image, its work and its tap tables grow
    /// with `height × max(width, size)` and `max(width, height)`: a 1×50,000,000 image passes
    /// the pixel count and would still need a 67 GB intermediate. Raising both sides covers
    /// either orientation, caps each side at `max_pixels / size`, and changes nothing for
    /// images at least `size` on both sides.
    fn pixels(
        self,
        format: ImageFormat,
        width: u64,
        height: u64,
    ) -> Result<usize, PreprocessError> {
        let max = self.limits.max_pixels;
        let pixels = width.saturating_mul(height);
        if pixels == 0 {
            return Err(PreprocessError::ZeroSize {
                format,
                width,
                height,
            });
        }
        let too_many = PreprocessError::TooManyPixels {
            format,
            width,
            height,
            max,
        };
        if pixels > max {
            return Err(too_many);
        }
        if let Some(size) = self.resize_to {
            let side = u64::from(size.max(MIN_COSTED_SIDE));
            let padded = width.max(side).saturating_mul(height.max(side));
            if padded > max {
                return Err(PreprocessError::TooCostlyToResize {
                    format,
                    width,
                    height,
                    size,
                    padded,
                    max,
                });
            }
        }
        usize::try_from(pixels).map_err(|_| too_many)
    }
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

/// `convert("RGB")` of pixels of `stride` bytes each, `rgb` giving each pixel's value.
///
/// A pixel that shrinks (`stride` ≥ 3) is rewritten in place, front to back (pixel `i` is read
/// before its output, which starts at or before its input, is written), so no second buffer
/// the size of the image exists; a pixel that grows gets a result allocated at its exact size.
fn to_rgb(mut samples: Vec<u8>, stride: usize, rgb: impl Fn(&[u8]) -> [u8; 3]) -> Vec<u8> {
    let count = samples.len() / stride;
    if stride < 3 {
        let mut out = Vec::with_capacity(count * 3);
        for px in samples.chunks_exact(stride) {
            out.extend_from_slice(&rgb(px));
        }
        return out;
    }
    for i in 0..count {
        let px = rgb(&samples[i * stride..][..stride]);
        samples[i * 3..][..3].copy_from_slice(&px);
    }
    samples.truncate(count * 3);
    samples.shrink_to_fit();
    samples
}

/// `convert("RGB")` of an image with one 8-bit grey channel and `stride` bytes per pixel
/// (alpha, if any, dropped).
fn grey_to_rgb(samples: Vec<u8>, stride: usize) -> Vec<u8> {
    to_rgb(samples, stride, |px| [px[0]; 3])
}

/// `convert("RGB")` of 8-bit RGB with `stride` bytes per pixel (alpha, if any, dropped).
fn rgbx_to_rgb(samples: Vec<u8>, stride: usize) -> Vec<u8> {
    if stride == 3 {
        return samples;
    }
    to_rgb(samples, stride, |px| [px[0], px[1], px[2]])
}

/// Decodes with an `image` decoder once its header has passed `check`, dropping alpha.
fn decode_with_image(
    format: ImageFormat,
    decoder: impl image::ImageDecoder,
    check: SizeCheck<'_>,
) -> Result<RgbImage, PreprocessError> {
    let (width, height) = decoder.dimensions();
    check.pixels(format, width.into(), height.into())?;
    let colour = decoder.color_type();
    let size = usize::try_from(decoder.total_bytes()).map_err(|e| corrupt(format, e))?;
    let mut samples = vec![0u8; size];
    decoder
        .read_image(&mut samples)
        .map_err(|e| corrupt(format, e))?;
    let rgb = match colour {
        image::ColorType::L8 => grey_to_rgb(samples, 1),
        image::ColorType::La8 => grey_to_rgb(samples, 2),
        image::ColorType::Rgb8 => samples,
        image::ColorType::Rgba8 => rgbx_to_rgb(samples, 4),
        other => {
            return Err(corrupt(
                format,
                format!("unexpected pixel layout {other:?}"),
            ))
        }
    };
    Ok(rgb_image(width, height, rgb))
}
