//! Image preprocessing against Pillow 12.x, the library upstream V1.1 preprocessed with.
//!
//! The fixtures and Pillow's outputs for them come from `scripts/reference/make_images.py`.
//! Decoding, resizing (fed Pillow's own decode, so it is measured alone) and the whole pipeline
//! are each held to zero differences. Run with `-- --nocapture` to see the per-image table.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};

use internvl_model::preprocess::{
    decode_rgb, preprocess, resize_bicubic, DecodeLimits, ImageFormat, PreprocessConfig,
    PreprocessError, RgbImage,
};
use serde::Deserialize;
use sha2::{Digest, Sha256};

#[derive(Deserialize)]
struct Manifest {
    pillow: String,
    size: u32,
    mean: [f32; 3],
    std: [f32; 3],
    images: Vec<Fixture>,
}

#[derive(Deserialize)]
struct Fixture {
    name: String,
    file: String,
    pillow_mode: String,
    decoded: Reference,
    resized: Reference,
    normalised: Normalised,
}

#[derive(Deserialize)]
struct Reference {
    file: String,
    sha256: String,
}

#[derive(Deserialize)]
struct Normalised {
    sha256: String,
    sum: f64,
    samples: Option<Vec<(usize, f64)>>,
}

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn image_bytes(name: &str) -> Vec<u8> {
    read(&fixtures_dir().join("images").join(name))
}

fn manifest() -> Manifest {
    let path = fixtures_dir().join("reference/images/manifest.json");
    serde_json::from_slice(&read(&path)).expect("manifest.json parses")
}

fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// Pillow's pixels, checked against the hash Pillow wrote so that the lossless WebP they are
/// stored in cannot hide a difference.
fn load_reference(reference: &Reference) -> RgbImage {
    let path = fixtures_dir()
        .join("reference/images")
        .join(&reference.file);
    let image = image::load_from_memory(&read(&path))
        .expect("reference decodes")
        .into_rgb8();
    assert_eq!(
        sha256_hex(image.as_raw()),
        reference.sha256,
        "{} does not hold the pixels Pillow wrote",
        reference.file
    );
    image
}

/// Largest absolute difference and share of differing bytes.
fn compare(ours: &RgbImage, pillow: &RgbImage) -> (u8, f64) {
    if ours.dimensions() != pillow.dimensions() {
        return (u8::MAX, 1.0);
    }
    let (max, differing) = ours
        .as_raw()
        .iter()
        .zip(pillow.as_raw())
        .map(|(&a, &b)| a.abs_diff(b))
        .fold((0, 0usize), |(max, n), d| {
            (max.max(d), n + usize::from(d != 0))
        });
    (max, differing as f64 / ours.as_raw().len() as f64)
}

fn le_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[test]
fn every_fixture_matches_pillow() {
    let manifest = manifest();
    assert!(
        manifest.pillow.starts_with("12."),
        "references must come from Pillow 12.x"
    );
    assert!(manifest.images.len() >= 14);
    let config = PreprocessConfig {
        image_size: manifest.size,
        mean: manifest.mean,
        std: manifest.std,
        ..PreprocessConfig::default()
    };
    assert_eq!(
        config,
        PreprocessConfig::default(),
        "the manifest is made for the defaults"
    );

    println!(
        "{:28} {:6} {:>11} {:>9} {:>11} {:>9}  pipeline",
        "image", "pillow", "decode max", "share", "resize max", "share"
    );
    let mut failures = Vec::new();
    for fixture in &manifest.images {
        let bytes = image_bytes(&fixture.file);
        let pillow_decoded = load_reference(&fixture.decoded);
        let pillow_resized = load_reference(&fixture.resized);

        let decode = match decode_rgb(&bytes, &config.limits) {
            Ok(ours) => compare(&ours, &pillow_decoded),
            Err(e) => {
                failures.push(format!("{}: decode failed: {e}", fixture.name));
                (u8::MAX, 1.0)
            }
        };
        let ours_resized = resize_bicubic(&pillow_decoded, manifest.size, manifest.size);
        let resize = compare(&ours_resized, &pillow_resized);
        let pipeline = preprocess(&bytes, &config)
            .map(|p| sha256_hex(&le_bytes(&p.data)) == fixture.normalised.sha256)
            .unwrap_or(false);

        println!(
            "{:28} {:6} {:>11} {:>9.6} {:>11} {:>9.6}  {}",
            fixture.name,
            fixture.pillow_mode,
            decode.0,
            decode.1,
            resize.0,
            resize.1,
            if pipeline { "identical" } else { "DIFFERS" }
        );
        if decode.0 != 0 {
            failures.push(format!(
                "{}: decode differs by up to {}",
                fixture.name, decode.0
            ));
        }
        if resize.0 != 0 {
            failures.push(format!(
                "{}: resize differs by up to {}",
                fixture.name, resize.0
            ));
        }
        if !pipeline {
            failures.push(format!("{}: normalised pixels differ", fixture.name));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The pipeline hash above says whether the normalised values differ; these say by how much,
/// and check the layout (CHW) and the sum independently of the hash.
#[test]
fn normalised_values_match_torchvision() {
    let manifest = manifest();
    let fixture = manifest
        .images
        .iter()
        .find(|f| f.normalised.samples.is_some())
        .expect("one fixture carries samples");
    let pixels = preprocess(&image_bytes(&fixture.file), &PreprocessConfig::default()).unwrap();
    assert_eq!((pixels.height, pixels.width), (448, 448));
    assert_eq!(pixels.data.len(), 3 * 448 * 448);
    for &(index, expected) in fixture.normalised.samples.as_deref().unwrap() {
        // f32 -> f64 -> JSON -> f64 -> f32 is lossless, so the comparison is exact.
        assert_eq!(
            pixels.data[index], expected as f32,
            "value at CHW index {index}"
        );
    }
    let sum: f64 = pixels.data.iter().map(|&v| f64::from(v)).sum();
    assert!((sum - fixture.normalised.sum).abs() < 1e-6 * fixture.normalised.sum.abs());
}

#[test]
fn jpeg_oddities_pillow_accepts_decode_the_same() {
    // Stray bytes between two markers: libjpeg warns and carries on, so does Pillow.
    let clean = image_bytes("jpg_420_333x250.jpg");
    let dqt = clean.windows(2).position(|w| w == [0xff, 0xdb]).unwrap();
    let mut stray = clean[..dqt].to_vec();
    stray.extend_from_slice(&[0x12, 0x34, 0x56]);
    stray.extend_from_slice(&clean[dqt..]);
    // Bytes after the end-of-image marker are ignored by both.
    let mut trailing = clean.clone();
    trailing.extend_from_slice(b"trailing bytes \xff\xd8\xff");
    let limits = DecodeLimits::default();
    let expected = decode_rgb(&clean, &limits).unwrap();
    assert_eq!(decode_rgb(&stray, &limits).unwrap(), expected);
    assert_eq!(decode_rgb(&trailing, &limits).unwrap(), expected);
}

fn expect_corrupt(result: Result<RgbImage, PreprocessError>, expected: ImageFormat) {
    match result {
        Err(PreprocessError::Corrupt { format, .. }) if format == expected => {}
        other => panic!("expected corrupt {expected}, got {other:?}"),
    }
}

#[test]
fn truncated_files_are_rejected() {
    let limits = DecodeLimits::default();
    for (file, format) in [
        ("png_rgb_449x447.png", ImageFormat::Png),
        ("jpg_420_333x250.jpg", ImageFormat::Jpeg),
        ("jpg_progressive_301x203.jpg", ImageFormat::Jpeg),
        ("gif_240x160.gif", ImageFormat::Gif),
        ("webp_lossy_300x200.webp", ImageFormat::WebP),
        ("bmp_rgb_203x101.bmp", ImageFormat::Bmp),
    ] {
        let bytes = image_bytes(file);
        // Pillow refuses all of these ("image file is truncated") rather than padding.
        for keep in [bytes.len() / 2, bytes.len() - 8, 40] {
            expect_corrupt(decode_rgb(&bytes[..keep], &limits), format);
        }
    }
}

#[test]
fn corrupt_data_is_rejected() {
    let limits = DecodeLimits::default();
    let mut png = image_bytes("png_rgb_449x447.png");
    let idat = png.windows(4).position(|w| w == b"IDAT").unwrap();
    png[idat + 20] ^= 0xff;
    expect_corrupt(decode_rgb(&png, &limits), ImageFormat::Png);

    let mut jpeg = image_bytes("jpg_444_250x333.jpg");
    jpeg.truncate(20);
    jpeg.extend(std::iter::repeat_n(0xab, 4000));
    expect_corrupt(decode_rgb(&jpeg, &limits), ImageFormat::Jpeg);

    let mut webp = image_bytes("webp_lossless_200x300.webp");
    for b in &mut webp[40..] {
        *b = b.wrapping_mul(31).wrapping_add(7);
    }
    expect_corrupt(decode_rgb(&webp, &limits), ImageFormat::WebP);
}

/// A PLTE chunk of 49 bytes (not whole RGB entries), found by fuzzing: the png crate's
/// palette expansion panicked on it; it must be refused as corrupt, naming the chunk.
#[test]
fn a_palette_of_partial_entries_is_rejected() {
    let limits = DecodeLimits::default();
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/regressions/image_preprocess/png-palette-49-bytes.png");
    let bytes = std::fs::read(&path).unwrap();
    match decode_rgb(&bytes, &limits) {
        Err(PreprocessError::Corrupt { format, reason }) => {
            assert_eq!(format, ImageFormat::Png);
            assert!(reason.contains("palette (PLTE) is 49 bytes"), "{reason}");
        }
        other => panic!("expected corrupt PNG, got {other:?}"),
    }
}

#[test]
fn unsupported_and_empty_inputs_are_rejected() {
    let limits = DecodeLimits::default();
    assert!(matches!(
        decode_rgb(&[], &limits),
        Err(PreprocessError::Empty)
    ));
    let tiff = b"II*\0\x08\0\0\0\x01\0\0\x01\x03\0\x01\0\0\0\x10\0\0\0";
    assert!(matches!(
        decode_rgb(tiff, &limits),
        Err(PreprocessError::UnsupportedFormat("TIFF"))
    ));
    let svg = b"  <svg xmlns=\"http://www.w3.org/2000/svg\" width=\"10\" height=\"10\"/>";
    assert!(matches!(
        decode_rgb(svg, &limits),
        Err(PreprocessError::UnsupportedFormat(_))
    ));
    let noise: Vec<u8> = (0u32..4096)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    assert!(matches!(
        decode_rgb(&noise, &limits),
        Err(PreprocessError::UnsupportedFormat("unrecognised data"))
    ));
    let small = DecodeLimits {
        max_bytes: 100,
        ..DecodeLimits::default()
    };
    assert!(matches!(
        decode_rgb(&image_bytes("png_rgb_17x13.png"), &small),
        Err(PreprocessError::TooManyBytes { max: 100, .. })
    ));
    // A logical screen of 0×0 is well-formed GIF, but has nothing to show.
    let mut gif = b"GIF89a\0\0\0\0\0\0\0".to_vec();
    gif.push(b';');
    assert!(matches!(
        decode_rgb(&gif, &limits),
        Err(PreprocessError::ZeroSize { .. } | PreprocessError::Corrupt { .. })
    ));
}

/// Headers claiming 100000×100000 pixels (JPEG: 65000×65000, GIF: 65535×65535, WebP:
/// 16383×16383, about the most they can hold) in front of a small file.
fn bombs() -> Vec<(ImageFormat, Vec<u8>)> {
    let side: u32 = 100_000;
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend(side.to_be_bytes());
    ihdr.extend(side.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    png.extend(13u32.to_be_bytes());
    png.extend(&ihdr);
    png.extend(crc32(&ihdr).to_be_bytes());
    png.extend(&image_bytes("png_rgb_17x13.png")[33..]);

    // A real baseline JPEG with its SOF0 height and width set to 65000 (libjpeg's maximum is
    // 65500).
    let mut jpeg = image_bytes("jpg_420_333x250.jpg");
    let sof = jpeg.windows(2).position(|w| w == [0xff, 0xc0]).unwrap();
    for at in [sof + 5, sof + 7] {
        jpeg[at..at + 2].copy_from_slice(&65_000u16.to_be_bytes());
    }

    // Logical screen and first frame of 65535×65535, with a two-colour local palette.
    let mut gif = b"GIF89a\xff\xff\xff\xff\x00\x00\x00".to_vec();
    gif.extend([b',', 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x80]);
    gif.extend([0u8; 6]);
    gif.extend([0x02, 0x02, 0x44, 0x01, 0x00, b';']);

    let mut bmp = image_bytes("bmp_rgb_203x101.bmp");
    bmp[18..22].copy_from_slice(&side.to_le_bytes());
    bmp[22..26].copy_from_slice(&side.to_le_bytes());

    // A real lossless WebP whose VP8L header says 16383×16383 (14-bit sizes minus one).
    let mut webp = image_bytes("webp_lossless_200x300.webp");
    assert_eq!(&webp[12..16], b"VP8L");
    webp[21..25].copy_from_slice(&(16_382u32 | 16_382 << 14).to_le_bytes());

    vec![
        (ImageFormat::Png, png),
        (ImageFormat::Jpeg, jpeg),
        (ImageFormat::Gif, gif),
        (ImageFormat::Bmp, bmp),
        (ImageFormat::WebP, webp),
    ]
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Records the largest single allocation made by the current thread, to prove that a bomb is
/// refused from its header alone. (libjpeg-turbo allocates with C's malloc, unseen here; its
/// header parsing needs only small tables, and the pixel buffer would be ours.)
struct TrackingAllocator;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for TrackingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.with(|l| l.set(l.get().max(layout.size())));
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.with(|l| l.set(l.get().max(new_size)));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: TrackingAllocator = TrackingAllocator;

/// Fast, because refused before any pixel is decoded: each bomb gets the pixel-limit error with
/// the dimensions its header declares (its data holds far fewer pixels), and no single
/// allocation reaches 1 MiB where the smallest bomb's pixels would need 805 MB. What is counted
/// is the work, not the time: how long a refusal takes is a benchmark's question.
#[test]
fn decompression_bombs_fail_fast_without_allocating() {
    let limits = DecodeLimits::default();
    let declared = |format| match format {
        ImageFormat::Png | ImageFormat::Bmp => 100_000,
        ImageFormat::Jpeg => 65_000,
        ImageFormat::Gif => 65_535,
        ImageFormat::WebP => 16_383,
    };
    for (expected, bytes) in bombs() {
        LARGEST.with(|l| l.set(0));
        let result = decode_rgb(&bytes, &limits);
        let largest = LARGEST.with(Cell::get);
        match result {
            Err(PreprocessError::TooManyPixels {
                format,
                width,
                height,
                max,
            }) => {
                assert_eq!((format, max), (expected, limits.max_pixels));
                let side = declared(expected);
                assert_eq!(
                    (width, height),
                    (side, side),
                    "{expected}: the header's size"
                );
            }
            other => panic!("{expected} bomb: expected the pixel limit, got {other:?}"),
        }
        assert!(
            largest < 1 << 20,
            "{expected}: allocated {largest} bytes at once"
        );
    }
}

#[test]
fn resize_handles_empty_sizes_without_panicking() {
    let src = RgbImage::from_pixel(5, 3, image::Rgb([10, 20, 30]));
    assert_eq!(resize_bicubic(&src, 0, 4).dimensions(), (0, 4));
    let empty = RgbImage::new(0, 0);
    let out = resize_bicubic(&empty, 2, 2);
    assert_eq!(out.as_raw(), &[0u8; 12]);
}
