//! WebP through `image` (image-webp), whose lossy and lossless decoding equal libwebp's, the
//! library Pillow uses.
//!
//! A lossless bitstream (a `VP8L` chunk, or an `ALPH` chunk's lossless alpha plane) is first
//! read up to the end of its prefix codes by [`vp8l_bound`](super::vp8l_bound), since
//! image-webp builds all of them, however many the file declares, with no limit of its own.

use std::io::Cursor;

use image::codecs::webp::WebPDecoder;
use image::{ImageDecoder, RgbImage, Rgba};

use super::vp8l_bound::{self, Header, Refusal};
use super::{corrupt, decode_with_image, ImageFormat, SizeCheck};
use crate::preprocess::{peak_bytes_bound, PreprocessError};

const FORMAT: ImageFormat = ImageFormat::WebP;

pub(super) fn decode(bytes: &[u8], check: SizeCheck<'_>) -> Result<RgbImage, PreprocessError> {
    let mut decoder = WebPDecoder::new(Cursor::new(bytes)).map_err(|e| corrupt(FORMAT, e))?;
    let (width, height) = decoder.dimensions();
    // Before the bitstream check, whose own allocation grows with the size.
    check.pixels(FORMAT, width.into(), height.into())?;
    check_lossy_frame(bytes, width, height)?;
    if let Some(stream) = lossless_stream(bytes, width, height) {
        let limit = peak_bytes_bound(check.limits);
        vp8l_bound::check(stream.data, stream.header, stream.held, limit).map_err(refused)?;
    }
    if decoder.has_animation() {
        // Pillow reads animations through libwebp's WebPAnimDecoder, which starts from a
        // transparent black canvas whatever background colour the file asks for.
        decoder
            .set_background_color(Rgba([0, 0, 0, 0]))
            .map_err(|e| corrupt(FORMAT, e))?;
    }
    decode_with_image(FORMAT, decoder, check)
}

/// Refuses a lossy (`VP8 `) bitstream whose own header disagrees with the size the file
/// declares for it: image-webp allocates its planes at the bitstream's size (up to
/// 16,383 × 16,383, 400 MB) and only compares the sizes after decoding, so a 90 × 60 canvas
/// could otherwise make it allocate hundreds of megabytes. Such a file is refused by
/// image-webp anyway (inconsistent image sizes); this refuses it before the planes exist.
/// Checked where image-webp 0.2.4 decodes a `VP8 ` chunk of an extended file: the first at
/// the top level of a still image (sized as the canvas), or the first frame's (sized as the
/// frame). A simple file's canvas is the bitstream's own size, already checked.
fn check_lossy_frame(bytes: &[u8], width: u32, height: u32) -> Result<(), PreprocessError> {
    let Some((first, vp8x_size)) = chunk_at(bytes, 12) else {
        return Ok(());
    };
    if &first != b"VP8X" {
        return Ok(());
    }
    let animated = bytes.get(20).is_some_and(|flags| flags & 0b10 != 0);
    let Some(riff_size) = bytes.get(4..8) else {
        return Ok(());
    };
    let riff_size = u64::from(u32::from_le_bytes(riff_size.try_into().expect("4 bytes")));
    let mut position = 20 + rounded(vp8x_size);
    let end = position + riff_size.saturating_sub(12);
    while position < end {
        let Some((fourcc, size)) = chunk_at(bytes, position) else {
            break;
        };
        match &fourcc {
            b"VP8 " if !animated => return vp8_size_is(bytes, position + 8, width, height),
            b"ANMF" if animated => {
                let start = position + 8;
                let field = |at: u64| -> Option<u32> {
                    let at = usize::try_from(start + at).ok()?;
                    let b = bytes.get(at..at.checked_add(3)?)?;
                    Some(u32::from(b[0]) | u32::from(b[1]) << 8 | u32::from(b[2]) << 16)
                };
                let (Some(frame_width), Some(frame_height)) = (field(6), field(9)) else {
                    return Ok(());
                };
                // The frame's bitstream comes first, or after its alpha plane.
                let mut sub = start + 16;
                for _ in 0..2 {
                    let Some((fourcc, size)) = chunk_at(bytes, sub) else {
                        break;
                    };
                    if &fourcc == b"VP8 " {
                        return vp8_size_is(bytes, sub + 8, frame_width + 1, frame_height + 1);
                    }
                    sub += 8 + rounded(size);
                }
                return Ok(());
            }
            _ => {}
        }
        position += 8 + rounded(size);
    }
    Ok(())
}

/// Compares the size in the key-frame header of the `VP8 ` bitstream at `at` (a 3-byte frame
/// tag, the start code, then 14-bit width and height) with the size expected of it.
fn vp8_size_is(bytes: &[u8], at: u64, width: u32, height: u32) -> Result<(), PreprocessError> {
    let Some(header) = usize::try_from(at)
        .ok()
        .and_then(|at| bytes.get(at..at.checked_add(10)?))
    else {
        return Ok(()); // Too short to decode: image-webp reports it.
    };
    let keyframe = header[0] & 1 == 0 && header[3..6] == [0x9d, 0x01, 0x2a];
    if !keyframe {
        return Ok(()); // Not decodable: image-webp reports it.
    }
    let side = |i: usize| u32::from(u16::from_le_bytes([header[i], header[i + 1]]) & 0x3fff);
    let (stream_width, stream_height) = (side(6), side(8));
    if (stream_width, stream_height) != (width, height) {
        return Err(corrupt(
            FORMAT,
            format!(
                "the lossy bitstream is {stream_width}x{stream_height} pixels, but the file \
                 declares {width}x{height} for it"
            ),
        ));
    }
    Ok(())
}

fn refused(refusal: Refusal) -> PreprocessError {
    match refusal {
        Refusal::Invalid(reason) => corrupt(FORMAT, format!("lossless bitstream: {reason}")),
        Refusal::TooCostly {
            groups,
            needed,
            limit,
        } => corrupt(
            FORMAT,
            format!(
                "the lossless bitstream declares {groups} prefix-code groups; decoding it would \
                 hold at least {needed} bytes at once, more than the limit of {limit}"
            ),
        ),
    }
}

/// The lossless bitstream image-webp decodes for the image `read_image` returns, with what
/// image-webp already holds by then.
struct Stream<'a> {
    data: &'a [u8],
    header: Header,
    /// The output samples (at most 4 bytes a canvas pixel) and image-webp's own pixel buffers.
    held: u64,
}

/// Finds the stream as image-webp 0.2.4 does (`decoder.rs`: `read_data`, `read_image`,
/// `read_frame`), on a file its `WebPDecoder::new` accepted whose canvas is
/// `width`×`height`. `None` when what it decodes first is lossy without a lossless alpha plane,
/// or when it fails before decoding anything.
fn lossless_stream(bytes: &[u8], width: u32, height: u32) -> Option<Stream<'_>> {
    let canvas = u64::from(width) * u64::from(height);
    let (first, first_size) = chunk_at(bytes, 12)?;
    match &first {
        // The samples and, without alpha, an RGBA copy.
        b"VP8L" => Some(Stream {
            data: range(bytes, 20, first_size),
            header: Header::Explicit { width, height },
            held: 8 * canvas,
        }),
        b"VP8X" => extended(bytes, width, height, first_size),
        _ => None,
    }
}

fn extended(bytes: &[u8], width: u32, height: u32, vp8x_size: u32) -> Option<Stream<'_>> {
    let canvas = u64::from(width) * u64::from(height);
    let flags = *bytes.get(20)?;
    let alpha = flags & 0b1_0000 != 0;
    let animated = flags & 0b10 != 0;
    let riff_size = u64::from(u32::from_le_bytes(bytes.get(4..8)?.try_into().ok()?));

    // The first chunk of each kind, in file order, up to the RIFF size or the end of the data.
    let (mut vp8l, mut alph, mut anmf) = (None, None, None);
    let mut position = 20 + rounded(vp8x_size);
    let end = position + riff_size.saturating_sub(12);
    while position < end {
        let Some((fourcc, size)) = chunk_at(bytes, position) else {
            break;
        };
        let found = (position + 8, size);
        position += 8 + rounded(size);
        match &fourcc {
            b"VP8L" => _ = vp8l.get_or_insert(found),
            b"ALPH" => _ = alph.get_or_insert(found),
            b"ANMF" => _ = anmf.get_or_insert(found),
            _ => {}
        }
    }
    // The first frame's first two sub-chunks fill in kinds not found at the top level.
    if let Some((start, size)) = anmf {
        let frame_end = start + u64::from(size);
        let mut position = start + 16;
        for _ in 0..2 {
            let Some((fourcc, size)) = chunk_at(bytes, position) else {
                break;
            };
            let found = (position + 8, size);
            match &fourcc {
                b"VP8L" => _ = vp8l.get_or_insert(found),
                b"ALPH" => _ = alph.get_or_insert(found),
                _ => {}
            }
            position += 8 + rounded(size);
            if position + 8 > frame_end {
                break;
            }
        }
    }

    if !animated {
        if let Some((start, size)) = vp8l {
            return Some(Stream {
                data: range(bytes, start, size),
                header: Header::Explicit { width, height },
                held: 8 * canvas,
            });
        }
        if !alpha {
            return None;
        }
        // Lossy with alpha: the samples, the VP8 frame's planes (1.5 bytes a pixel of the
        // macroblock-padded size) and the alpha plane in RGBA.
        let (start, size) = alph?;
        let padded = (u64::from(width) + 16) * (u64::from(height) + 16);
        return alpha_stream(
            range(bytes, start, size),
            width,
            height,
            8 * canvas + 2 * padded,
        );
    }

    // The first frame, which is all `read_image` decodes.
    let (start, anmf_size) = anmf?;
    if anmf_size < 32 {
        return None;
    }
    let field = |at: u64| -> Option<u64> {
        let at = usize::try_from(start + at).ok()?;
        let b = bytes.get(at..at.checked_add(3)?)?;
        Some(u64::from(b[0]) | u64::from(b[1]) << 8 | u64::from(b[2]) << 16)
    };
    let (frame_x, frame_y) = (field(0)? * 2, field(3)? * 2);
    let (frame_width, frame_height) = (field(6)? + 1, field(9)? + 1);
    if frame_width > 16384
        || frame_height > 16384
        || frame_x + frame_width > u64::from(width)
        || frame_y + frame_height > u64::from(height)
    {
        return None;
    }
    let (fourcc, size) = chunk_at(bytes, start + 16)?;
    if rounded(size) + 24 > u64::from(anmf_size) {
        return None;
    }
    // The samples and the frame in RGBA (the canvas comes after).
    let held = 4 * canvas + 4 * frame_width * frame_height;
    let (frame_width, frame_height) = (frame_width as u32, frame_height as u32);
    let data = range(bytes, start + 24, size);
    match &fourcc {
        b"VP8L" => Some(Stream {
            data,
            header: Header::Explicit {
                width: frame_width,
                height: frame_height,
            },
            held,
        }),
        b"ALPH" if rounded(size) + 32 <= u64::from(anmf_size) => {
            alpha_stream(data, frame_width, frame_height, held)
        }
        _ => None,
    }
}

/// An `ALPH` chunk's bitstream when it is lossless (compression method 1).
fn alpha_stream(chunk: &[u8], width: u32, height: u32, held: u64) -> Option<Stream<'_>> {
    let (&info, data) = chunk.split_first()?;
    (info & 0b11 == 1).then_some(Stream {
        data,
        header: Header::Implicit { width, height },
        held,
    })
}

/// The chunk header at `at`: its FourCC and size, `None` past the end of the data.
fn chunk_at(bytes: &[u8], at: u64) -> Option<([u8; 4], u32)> {
    let at = usize::try_from(at).ok()?;
    let header = bytes.get(at..at.checked_add(8)?)?;
    Some((
        header[..4].try_into().ok()?,
        u32::from_le_bytes(header[4..].try_into().ok()?),
    ))
}

/// A chunk's size padded to an even number of bytes, as image-webp rounds it (saturating).
fn rounded(size: u32) -> u64 {
    u64::from(size.saturating_add(size & 1))
}

/// `len` bytes from `start`, cut at the end of the data as image-webp's reader is.
fn range(bytes: &[u8], start: u64, len: u32) -> &[u8] {
    let start = usize::try_from(start)
        .unwrap_or(usize::MAX)
        .min(bytes.len());
    let end = start.saturating_add(len as usize).min(bytes.len());
    &bytes[start..end]
}
