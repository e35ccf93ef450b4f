//! Peak memory of `preprocess` on hostile images, measured by a counting allocator and held to
//! `peak_bytes_bound`: images whose resize would cost more than the pixel budget are refused
//! from the header, and the rest never take more than the stated bound.
//!
//! libjpeg-turbo allocates with C's malloc, which this allocator does not see; its share is
//! capped inside libjpeg-turbo itself (TurboJPEG's memory limit), so the JPEG cases here measure
//! the Rust side only.

use std::path::Path;

use internvl_model::preprocess::{
    peak_bytes_bound, preprocess, DecodeLimits, ImageFormat, PixelValues, PreprocessConfig,
    PreprocessError,
};

mod counting;

use counting::{peak_during, CountingAllocator};

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Runs `preprocess` and returns its result with the most bytes it had allocated at once.
fn measured(
    bytes: &[u8],
    config: &PreprocessConfig,
) -> (Result<PixelValues, PreprocessError>, usize) {
    peak_during(|| preprocess(bytes, config))
}

fn config(max_pixels: u64) -> PreprocessConfig {
    PreprocessConfig {
        limits: DecodeLimits {
            max_pixels,
            ..DecodeLimits::default()
        },
        ..PreprocessConfig::default()
    }
}

/// An 8-bit grey PNG of zeros, encoded for real (rows streamed, never all in memory at once).
fn grey_png(width: u32, height: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, width, height);
    encoder.set_color(png::ColorType::Grayscale);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Fastest);
    encoder.set_filter(png::Filter::NoFilter);
    let mut writer = encoder.write_header().unwrap();
    let mut stream = writer.stream_writer().unwrap();
    let zeros = vec![0u8; 1 << 20];
    let mut left = u64::from(width) * u64::from(height);
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        std::io::Write::write_all(&mut stream, &zeros[..n]).unwrap();
        left -= n as u64;
    }
    stream.finish().unwrap();
    writer.finish().unwrap();
    out
}

fn fixture(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/images")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn expect_too_costly(result: Result<PixelValues, PreprocessError>, format: ImageFormat) {
    match result {
        Err(PreprocessError::TooCostlyToResize { format: f, .. }) => assert_eq!(f, format),
        Err(other) => panic!("expected the resize budget, got {other}"),
        Ok(_) => panic!("expected the resize budget, got pixels"),
    }
}

fn assert_within_bound(what: &str, peak: usize, config: &PreprocessConfig) {
    let bound = peak_bytes_bound(&config.limits);
    eprintln!("{what}: peak {peak} bytes, bound {bound}");
    assert!(peak as u64 <= bound, "{what}: peak {peak} > bound {bound}");
}

/// The two shapes found from outside: 50 megapixels, so within the pixel count, but resizing
/// 1×50,000,000 builds a 67 GB intermediate and 50,000,000×1 an 800 MB tap table. Both are
/// refused from the header, before anything their size exists.
#[test]
fn one_pixel_wide_or_high_images_are_refused_from_the_header() {
    let config = PreprocessConfig::default();
    for (width, height) in [(1, 50_000_000), (50_000_000, 1), (1, 1_000_000)] {
        let png = grey_png(width, height);
        let (result, peak) = measured(&png, &config);
        expect_too_costly(result, ImageFormat::Png);
        assert!(
            peak < 1 << 20,
            "{width}x{height}: allocated {peak} bytes before refusing"
        );
    }
}

/// The cost rule's edge, with a small budget so the images stay small: an image as narrow as
/// the budget allows is resized within the bound; one row or column more is refused. Each
/// shape also passes the plain pixel count, so the rule is what refuses it.
#[test]
fn narrow_and_flat_images_at_the_edge_of_the_budget() {
    let size = u64::from(PreprocessConfig::default().image_size);
    let long = 20_000u64;
    let config = config(size * long);
    for (width, height) in [(1, long), (long, 1), (7, long), (long, 7)] {
        let png = grey_png(width as u32, height as u32);
        let (result, peak) = measured(&png, &config);
        let pixels = result.unwrap_or_else(|e| panic!("{width}x{height}: {e}"));
        assert_eq!((pixels.width, pixels.height), (448, 448));
        assert_within_bound(&format!("{width}x{height}"), peak, &config);

        let (w, h) = if width == 1 || width == 7 {
            (width, height + 1)
        } else {
            (width + 1, height)
        };
        let (result, peak) = measured(&grey_png(w as u32, h as u32), &config);
        expect_too_costly(result, ImageFormat::Png);
        assert!(peak < 1 << 20, "{w}x{h}: allocated {peak} bytes");
    }
}

/// A GIF's first frame may overhang its logical screen; Pillow grows the canvas to hold it, so
/// the check is on the grown canvas, not on the screen the header announces.
#[test]
fn gif_frame_larger_than_its_screen_is_checked_on_the_canvas() {
    // A 1×1 screen and a 3000×2000 frame of one colour (LZW: clear code, then stop).
    let mut gif = b"GIF89a\x01\x00\x01\x00\x00\x00\x00".to_vec();
    gif.extend([b',', 0, 0, 0, 0]);
    gif.extend(3000u16.to_le_bytes());
    gif.extend(2000u16.to_le_bytes());
    gif.extend([0x80, 0, 0, 0, 255, 255, 255]);
    gif.extend([0x02, 0x02, 0x44, 0x01, 0x00, b';']);

    let small = config(5_000_000);
    let (result, peak) = measured(&gif, &small);
    assert!(
        matches!(
            result,
            Err(PreprocessError::TooManyPixels {
                format: ImageFormat::Gif,
                width: 3000,
                height: 2000,
                ..
            })
        ),
        "{result:?}"
    );
    assert!(peak < 1 << 20, "allocated {peak} bytes before refusing");

    let roomy = config(6_000_000);
    let (result, peak) = measured(&gif, &roomy);
    // The frame's data ends early; whatever the decoder makes of that, it stays in bounds.
    if let Err(e) = &result {
        assert!(matches!(e, PreprocessError::Corrupt { .. }), "{e}");
    }
    assert_within_bound("gif 3000x2000 frame on a 1x1 screen", peak, &roomy);
}

/// Real files with their header's size raised to just under the budget and the data left
/// tiny: decoding allocates for the header's size and then finds the data short, all within
/// the bound.
#[test]
fn huge_headers_with_tiny_data_stay_within_the_bound() {
    let side: u32 = 4000;
    let config = config(u64::from(side) * u64::from(side));

    let mut bmp = fixture("bmp_rgb_203x101.bmp");
    bmp[18..22].copy_from_slice(&side.to_le_bytes());
    bmp[22..26].copy_from_slice(&side.to_le_bytes());

    let mut progressive = fixture("jpg_progressive_301x203.jpg");
    let sof = progressive
        .windows(2)
        .position(|w| w == [0xff, 0xc2])
        .unwrap();
    for at in [sof + 5, sof + 7] {
        progressive[at..at + 2].copy_from_slice(&(side as u16).to_be_bytes());
    }

    let mut lossless = fixture("webp_lossless_200x300.webp");
    assert_eq!(&lossless[12..16], b"VP8L");
    lossless[21..25].copy_from_slice(&((side - 1) | (side - 1) << 14).to_le_bytes());

    // The animated fixture's canvas (VP8X, 24-bit sizes minus one) grown around its frames.
    let mut animated = fixture("webp_animated_90x60.webp");
    assert_eq!(&animated[12..16], b"VP8X");
    for at in [24, 27] {
        animated[at..at + 3].copy_from_slice(&(side - 1).to_le_bytes()[..3]);
    }

    for (name, bytes) in [
        ("bmp", bmp),
        ("progressive jpeg", progressive),
        ("lossless webp", lossless),
        ("animated webp", animated),
    ] {
        let (result, peak) = measured(&bytes, &config);
        if let Err(e) = &result {
            assert!(matches!(e, PreprocessError::Corrupt { .. }), "{name}: {e}");
        }
        assert_within_bound(name, peak, &config);
    }
}

/// The costliest ordinary file per pixel among the PNG layouts: 16-bit RGBA, 8 bytes a pixel
/// from the decoder, converted to RGB in place.
#[test]
fn sixteen_bit_rgba_png_stays_within_the_bound() {
    let (width, height) = (2000u32, 1500u32);
    let mut png = Vec::new();
    let mut encoder = png::Encoder::new(&mut png, width, height);
    encoder.set_color(png::ColorType::Rgba);
    encoder.set_depth(png::BitDepth::Sixteen);
    encoder.set_compression(png::Compression::Fastest);
    let mut writer = encoder.write_header().unwrap();
    let data: Vec<u8> = (0..width as usize * height as usize * 8)
        .map(|i| (i % 251) as u8)
        .collect();
    writer.write_image_data(&data).unwrap();
    writer.finish().unwrap();
    drop(data);

    let config = config(u64::from(width) * u64::from(height));
    let (result, peak) = measured(&png, &config);
    result.unwrap();
    assert_within_bound("rgba16 png", peak, &config);
}

#[test]
fn the_bound_for_the_default_limits() {
    // 16 bytes per pixel of 50 megapixels, plus 96 MiB that do not grow with the image.
    assert_eq!(
        peak_bytes_bound(&DecodeLimits::default()),
        800_000_000 + (96 << 20)
    );
}

/// `bytes` with the size in the key-frame header of its first `VP8 ` bitstream set to
/// 16,383 × 16,383, the largest VP8 can say.
fn with_huge_vp8_header(mut bytes: Vec<u8>) -> Vec<u8> {
    let at = bytes
        .windows(4)
        .position(|w| w == b"VP8 ")
        .expect("a lossy bitstream")
        + 8;
    assert_eq!(bytes[at + 3..at + 6], [0x9d, 0x01, 0x2a], "a key frame");
    bytes[at + 6..at + 10].copy_from_slice(&[0xff, 0x3f, 0xff, 0x3f]);
    bytes
}

/// A lossy bitstream declaring 16,383 × 16,383 pixels inside a small still image with alpha
/// or a small animation frame: image-webp would allocate its planes (400 MB) before comparing
/// the sizes; the size is compared first, whatever the limits.
#[test]
fn a_lossy_bitstream_larger_than_its_frame_is_refused_before_decoding() {
    let config = config(4_000_000);
    for name in ["webp_lossy_alpha_150x100.webp", "webp_animated_90x60.webp"] {
        let (result, peak) = measured(&with_huge_vp8_header(fixture(name)), &config);
        assert_within_bound(name, peak, &config);
        match result {
            Err(PreprocessError::Corrupt { format, reason }) => {
                assert_eq!(format, ImageFormat::WebP, "{name}");
                assert!(reason.contains("16383x16383"), "{name}: {reason}");
            }
            other => panic!("{name}: expected a refusal, got {other:?}"),
        }
    }
}
