//! JPEG through libjpeg-turbo (TurboJPEG), the library Pillow decodes with: same IDCT, same
//! "fancy" chroma upsampling, same YCbCr→RGB tables, hence the same bytes. zune-jpeg, the
//! decoder inside `image`, differs by up to 5 levels.
//!
//! The raw TurboJPEG API is used because the safe wrapper turns every libjpeg *warning* into a
//! failure and then withholds even the header. Pillow ignores warnings (cameras often leave
//! stray bytes between markers) and only refuses a file that ends too early, so warnings pass
//! here too and truncation is detected separately, by [`ends_before_eoi`].

use std::ffi::{c_int, CStr};

use image::RgbImage;
use turbojpeg_sys as tj;

use super::{corrupt, rgb_image, to_rgb, ImageFormat, SizeCheck};
use crate::preprocess::PreprocessError;

const FORMAT: ImageFormat = ImageFormat::Jpeg;

/// Far above the ~10 scans of real progressive files, far below the thousands a crafted file
/// uses to make decoding take minutes (libjpeg-turbo's own advice for untrusted input).
const MAX_SCANS: c_int = 500;

/// What libjpeg-turbo may hold per pixel in whole-image buffers: progressive (and
/// multi-scan) files keep every DCT coefficient until the last scan, 2 bytes each, 64 per 8×8
/// block per component, so 8 bytes per pixel for four full-resolution components (CMYK 4:4:4,
/// the most a real file has). Its other buffers span a few rows.
pub(crate) const COEFFICIENT_BYTES_PER_PIXEL: u64 = 8;

pub(super) fn decode(bytes: &[u8], check: SizeCheck<'_>) -> Result<RgbImage, PreprocessError> {
    let mut decompressor = Decompressor::new()?;
    decompressor.set(tj::TJPARAM_TJPARAM_SCANLIMIT, MAX_SCANS)?;
    // libjpeg-turbo allocates its coefficient buffers itself, out of sight of the header
    // check: cap them so that a file with more components or sampling tricks than a real one
    // fails instead (libjpeg reports it cannot fit them, having no backing store).
    decompressor.set(
        tj::TJPARAM_TJPARAM_MAXMEMORY,
        coefficient_megabytes(check.limits.max_pixels),
    )?;
    decompressor.read_header(bytes)?;
    let width = decompressor.get(tj::TJPARAM_TJPARAM_JPEGWIDTH);
    let height = decompressor.get(tj::TJPARAM_TJPARAM_JPEGHEIGHT);
    let (width, height) = match (u32::try_from(width), u32::try_from(height)) {
        (Ok(w), Ok(h)) => (w, h),
        _ => return Err(corrupt(FORMAT, "header gives no size")),
    };
    let pixels = check.pixels(FORMAT, width.into(), height.into())?;
    if ends_before_eoi(bytes) {
        return Err(corrupt(FORMAT, "file ends before the end-of-image marker"));
    }
    // Pillow reads CMYK and YCCK files as CMYK and converts that itself; libjpeg converts
    // everything else (grey included) to RGB exactly as Pillow's "RGB" output mode does.
    let colourspace = decompressor.get(tj::TJPARAM_TJPARAM_COLORSPACE);
    let cmyk = [tj::TJCS_TJCS_CMYK, tj::TJCS_TJCS_YCCK]
        .iter()
        .any(|&cs| c_int::try_from(cs) == Ok(colourspace));
    let (format, channels) = if cmyk {
        (tj::TJPF_TJPF_CMYK, 4)
    } else {
        (tj::TJPF_TJPF_RGB, 3)
    };
    let mut samples = vec![0u8; pixels * channels];
    decompressor.decompress(bytes, &mut samples, width as usize * channels, format)?;
    let rgb = if cmyk { cmyk_to_rgb(samples) } else { samples };
    Ok(rgb_image(width, height, rgb))
}

/// Owns a TurboJPEG decompression instance.
struct Decompressor(tj::tjhandle);

impl Decompressor {
    fn new() -> Result<Self, PreprocessError> {
        // SAFETY: tj3Init has no preconditions; a null result is handled.
        let handle = unsafe { tj::tj3Init(tj::TJINIT_TJINIT_DECOMPRESS as c_int) };
        if handle.is_null() {
            return Err(corrupt(FORMAT, "could not start libjpeg-turbo"));
        }
        Ok(Self(handle))
    }

    fn set(&mut self, param: tj::TJPARAM, value: c_int) -> Result<(), PreprocessError> {
        // SAFETY: the handle is live; unknown parameters are reported, not undefined.
        let status = unsafe { tj::tj3Set(self.0, param as c_int, value) };
        self.check(status)
    }

    fn get(&self, param: tj::TJPARAM) -> c_int {
        // SAFETY: as in `set`; unset parameters read as -1.
        unsafe { tj::tj3Get(self.0, param as c_int) }
    }

    fn read_header(&mut self, bytes: &[u8]) -> Result<(), PreprocessError> {
        let len = tj::size_t::try_from(bytes.len()).map_err(|e| corrupt(FORMAT, e))?;
        // SAFETY: `bytes` is valid for `len` bytes and only read.
        let status = unsafe { tj::tj3DecompressHeader(self.0, bytes.as_ptr(), len) };
        self.check(status)
    }

    /// Decodes into `out`, which the caller sized from the header as rows of `pitch` bytes.
    fn decompress(
        &mut self,
        bytes: &[u8],
        out: &mut [u8],
        pitch: usize,
        format: tj::TJPF,
    ) -> Result<(), PreprocessError> {
        let len = tj::size_t::try_from(bytes.len()).map_err(|e| corrupt(FORMAT, e))?;
        let pitch = c_int::try_from(pitch).map_err(|e| corrupt(FORMAT, e))?;
        // SAFETY: `out` holds height × pitch bytes for the size the header reported (the same
        // handle and data), so libjpeg-turbo writes inside it; `bytes` is only read.
        let status = unsafe {
            tj::tj3Decompress8(self.0, bytes.as_ptr(), len, out.as_mut_ptr(), pitch, format)
        };
        self.check(status)
    }

    /// Turns a TurboJPEG status into Pillow's verdict: warnings (the decoder recovered) pass,
    /// fatal errors fail.
    fn check(&self, status: c_int) -> Result<(), PreprocessError> {
        if status == 0 {
            return Ok(());
        }
        // SAFETY: the handle is live.
        let code = unsafe { tj::tj3GetErrorCode(self.0) };
        if c_int::try_from(tj::TJERR_TJERR_WARNING) == Ok(code) {
            return Ok(());
        }
        // SAFETY: TurboJPEG returns a NUL-terminated string owned by the handle.
        let message = unsafe { CStr::from_ptr(tj::tj3GetErrorStr(self.0)) };
        Err(corrupt(FORMAT, message.to_string_lossy()))
    }
}

impl Drop for Decompressor {
    fn drop(&mut self) {
        // SAFETY: the handle came from tj3Init and is destroyed once.
        unsafe { tj::tj3Destroy(self.0) }
    }
}

/// Whether the data runs out before an end-of-image marker, walking the markers as libjpeg
/// does (segments skipped by their length, entropy-coded data up to the next marker) so that
/// an EOI inside an EXIF thumbnail does not count. libjpeg pads such a file with grey and only
/// warns; Pillow stops with "image file is truncated".
fn ends_before_eoi(bytes: &[u8]) -> bool {
    const EOI: u8 = 0xd9;
    let mut at = 2; // past SOI
    loop {
        let Some(marker_at) = next_marker(bytes, at) else {
            return true;
        };
        let marker = bytes[marker_at + 1];
        at = marker_at + 2;
        match marker {
            EOI => return false,
            // TEM stands alone (restart markers never get here: `next_marker` skips them).
            0x01 => {}
            // The length counts its own two bytes. After SOS, the scan's entropy-coded data
            // follows and `next_marker` skips it.
            _ => match bytes.get(at..at + 2) {
                Some(len) => at += usize::from(u16::from_be_bytes([len[0], len[1]])),
                None => return true,
            },
        }
    }
}

/// Position of the next marker at or after `from`, skipping what libjpeg skips: data bytes,
/// stuffed 0xFF 0x00 pairs, 0xFF fill and the restart markers inside a scan.
fn next_marker(bytes: &[u8], from: usize) -> Option<usize> {
    (from..bytes.len().saturating_sub(1))
        .find(|&at| bytes[at] == 0xff && !matches!(bytes[at + 1], 0x00 | 0xd0..=0xd7 | 0xff))
}

/// Pillow's JPEG "CMYK;I" unpacking (Adobe files store inverted ink) followed by its
/// `cmyk2rgb`: `channel = (255 - k) - c * (255 - k) / 255`, the division being Pillow's
/// rounding `MULDIV255`. Written over the raw samples: c = 255 - raw_c, 255 - k = raw_k.
fn cmyk_to_rgb(samples: Vec<u8>) -> Vec<u8> {
    to_rgb(samples, 4, |px| {
        let nk = u32::from(px[3]);
        [0, 1, 2].map(|i| (nk - muldiv255(255 - u32::from(px[i]), nk)) as u8)
    })
}

/// [`COEFFICIENT_BYTES_PER_PIXEL`] for `max_pixels`, in TurboJPEG's unit (whole megabytes,
/// rounded up), at least 1 (0 would mean no limit).
fn coefficient_megabytes(max_pixels: u64) -> c_int {
    let bytes = max_pixels.saturating_mul(COEFFICIENT_BYTES_PER_PIXEL);
    c_int::try_from(bytes.div_ceil(1 << 20).max(1)).unwrap_or(c_int::MAX)
}

/// Pillow's `MULDIV255`: `a * b / 255` rounded, for `a, b` in 0..=255.
fn muldiv255(a: u32, b: u32) -> u32 {
    let t = a * b + 128;
    ((t >> 8) + t) >> 8
}
