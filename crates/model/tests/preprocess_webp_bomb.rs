//! Lossless WebP's prefix-code groups: image-webp builds every group the entropy image names
//! (up to 65,536, tens of KB each) before any pixel, with no limit of its own. `preprocess`
//! reads the bitstream up to the groups first and refuses an image whose groups would pass
//! `peak_bytes_bound`; held to it here with a counting allocator, on files written bit by bit.

use std::path::Path;

use image::ImageDecoder;
use internvl_model::preprocess::{
    decode_rgb, peak_bytes_bound, preprocess, DecodeLimits, ImageFormat, PixelValues,
    PreprocessConfig, PreprocessError,
};

mod counting;

use counting::{peak_during, CountingAllocator};

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

fn config(max_pixels: u64) -> PreprocessConfig {
    PreprocessConfig {
        limits: DecodeLimits {
            max_pixels,
            ..DecodeLimits::default()
        },
        ..PreprocessConfig::default()
    }
}

/// VP8L's bit order: values least significant bit first, prefix codes most significant first.
#[derive(Default)]
struct Bits {
    bytes: Vec<u8>,
    acc: u64,
    n: u32,
}

impl Bits {
    fn put(&mut self, value: u32, bits: u32) {
        assert!(bits <= 32 && u64::from(value) < 1 << bits);
        self.acc |= u64::from(value) << self.n;
        self.n += bits;
        while self.n >= 8 {
            self.bytes.push(self.acc as u8);
            self.acc >>= 8;
            self.n -= 8;
        }
    }

    fn put_code(&mut self, (code, length): (u32, u32)) {
        for i in (0..length).rev() {
            self.put((code >> i) & 1, 1);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        if self.n > 0 {
            self.bytes.push(self.acc as u8);
        }
        self.bytes
    }
}

/// Canonical codes (code, length) for `lengths`, as RFC 9649 assigns them.
fn canonical(lengths: &[u8]) -> Vec<(u32, u32)> {
    let mut counts = [0u32; 16];
    for &l in lengths {
        counts[usize::from(l)] += 1;
    }
    counts[0] = 0;
    let mut next = [0u32; 16];
    let mut code = 0;
    for l in 1..16 {
        code = (code + counts[l - 1]) << 1;
        next[l] = code;
    }
    lengths
        .iter()
        .map(|&l| {
            let l = usize::from(l);
            let c = next[l];
            next[l] += 1;
            (c, l as u32)
        })
        .collect()
}

const CODE_LENGTH_ORDER: [usize; 19] = [
    17, 18, 0, 1, 2, 3, 4, 5, 16, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
];

/// A simple code of one symbol (read with no bits).
fn put_single(w: &mut Bits, symbol: u32) {
    w.put(1, 1);
    w.put(0, 1);
    if symbol < 2 {
        w.put(0, 1);
        w.put(symbol, 1);
    } else {
        w.put(1, 1);
        w.put(symbol, 8);
    }
}

/// A normal code with these lengths (the alphabet being at least `lengths.len()`), the
/// lengths written literally up to the last non-zero one and a code-length code as short as a
/// complete code over the values used allows (none at all when one value is used).
fn put_normal(w: &mut Bits, lengths: &[u8], alphabet: usize) -> Vec<(u32, u32)> {
    let last = lengths.iter().rposition(|&l| l != 0).unwrap();
    let count = (last + 1).max(2);
    let mut values: Vec<u8> = lengths[..count].to_vec();
    values.sort_unstable();
    values.dedup();
    let mut cl = [0u8; 19];
    if values.len() == 1 {
        cl[usize::from(values[0])] = 1;
    } else {
        let m = values.len() as u32;
        let bits = 32 - (m - 1).leading_zeros();
        let short = (1 << bits) - m;
        for (i, &v) in values.iter().enumerate() {
            cl[usize::from(v)] = if (i as u32) < short { bits - 1 } else { bits } as u8;
        }
    }
    let used = CODE_LENGTH_ORDER
        .iter()
        .rposition(|&s| cl[s] != 0)
        .unwrap()
        .max(3)
        + 1;
    w.put(0, 1);
    w.put(used as u32 - 4, 4);
    for &s in &CODE_LENGTH_ORDER[..used] {
        w.put(u32::from(cl[s]), 3);
    }
    if count < alphabet {
        let value = count as u32 - 2;
        let need = 32 - value.leading_zeros();
        let t = need.saturating_sub(1) / 2;
        w.put(1, 1);
        w.put(t, 3);
        w.put(value, 2 + 2 * t);
    } else {
        w.put(0, 1);
    }
    let cl_codes = canonical(&cl);
    for &l in &lengths[..count] {
        if values.len() > 1 {
            w.put_code(cl_codes[usize::from(l)]);
        }
    }
    canonical(lengths)
}

/// Prefix symbol, extra bit count and extra bits of a length or distance code.
fn prefix(value: u32) -> (u32, u32, u32) {
    let d = value - 1;
    if d < 4 {
        return (d, 0, 0);
    }
    let high = 31 - d.leading_zeros();
    let second = (d >> (high - 1)) & 1;
    (2 * high + second, high - 1, d & ((1 << (high - 1)) - 1))
}

/// Lengths 1, 2, …, 9, 10, 10: complete, longest 10 bits, so image-webp gives it a 4 KB table.
const CHAIN: [u8; 11] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 10];

/// A 1024×1024 lossless WebP whose entropy image (huffman_bits 2, 256×256) names `groups`
/// groups: see [`bitstream`].
fn bomb(groups: u32) -> Vec<u8> {
    riff(b"VP8L", &bitstream(1024, 1024, groups, true))
}

/// A VP8L bitstream (with its header or, for an `ALPH` chunk, without) whose entropy image
/// (huffman_bits 2) names `groups` groups, pixel `i` naming group `i % groups` and the last
/// one the last group, each group costing image-webp as much as a few bits can: green (2,328
/// symbols with an 11-bit colour cache) has 2,048 codes of 11 bits (a 4 KB table and 4,096
/// tree nodes) written with one code-length value; the four others have 10-bit codes (4 KB
/// tables each). The pixels are valid (one black pixel copied), so image-webp decodes the
/// bitstream when it can afford to.
fn bitstream(width: u32, height: u32, groups: u32, header: bool) -> Vec<u8> {
    assert!((1..=65_536).contains(&groups));
    let mut w = Bits::default();
    if header {
        w.put(0x2f, 8);
        w.put(width - 1, 14);
        w.put(height - 1, 14);
        w.put(0, 1);
        w.put(0, 3);
    }
    w.put(0, 1); // no transform
    w.put(1, 1); // colour cache
    w.put(11, 4);
    w.put(1, 1); // meta prefix codes
    w.put(0, 3); // huffman_bits 2

    // The entropy image: green and red of 256 8-bit codes each, one code-length value.
    w.put(0, 1); // no cache
    let green = put_normal(&mut w, &[8; 256], 280);
    let red = put_normal(&mut w, &[8; 256], 256);
    for _ in 0..3 {
        put_single(&mut w, 0);
    }
    let blocks = width.div_ceil(4) * height.div_ceil(4);
    for i in 0..blocks {
        let group = if i + 1 == blocks {
            groups - 1
        } else {
            i % groups
        };
        w.put_code(green[(group & 0xff) as usize]);
        w.put_code(red[(group >> 8) as usize]);
    }

    let long = [11u8; 2048];
    for _ in 0..groups {
        put_normal(&mut w, &long, 280 + 2048);
        for alphabet in [256, 256, 256, 40] {
            put_normal(&mut w, &CHAIN, alphabet);
        }
    }
    let green = canonical(&long);
    let chain = canonical(&CHAIN);
    let (red, blue, alpha, distance) = (&chain, &chain, &chain, &chain);

    // One black transparent pixel, the rest of the row copied from it, the other rows from the
    // row above.
    w.put_code(green[0]);
    w.put_code(red[0]);
    w.put_code(blue[0]);
    w.put_code(alpha[0]);
    let copy = |w: &mut Bits, length: u32, plane_code: u32| {
        let (symbol, extra, bits) = prefix(length);
        w.put_code(green[256 + symbol as usize]);
        w.put(bits, extra);
        let (symbol, extra, bits) = prefix(plane_code);
        w.put_code(distance[symbol as usize]);
        w.put(bits, extra);
    };
    if width > 1 {
        copy(&mut w, width - 1, 2); // distance (1, 0)
    }
    let mut left = width * (height - 1);
    while left > 0 {
        let n = left.min(4096);
        copy(&mut w, n, 1); // distance (0, 1)
        left -= n;
    }
    w.finish()
}

fn riff(fourcc: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let padded = data.len() + (data.len() & 1);
    let mut out = b"RIFF".to_vec();
    out.extend((4 + 8 + padded as u32).to_le_bytes());
    out.extend(b"WEBP");
    out.extend(fourcc);
    out.extend((data.len() as u32).to_le_bytes());
    out.extend(data);
    out.resize(20 + padded, 0);
    out
}

/// What image-webp alone (no check before it) allocates at most to decode `bytes`.
fn image_webp_peak(bytes: &[u8]) -> (Result<Vec<u8>, image::ImageError>, usize) {
    peak_during(|| {
        let decoder = image::codecs::webp::WebPDecoder::new(std::io::Cursor::new(bytes))?;
        let mut buf = vec![0; decoder.total_bytes() as usize];
        decoder.read_image(&mut buf)?;
        Ok(buf)
    })
}

fn expect_refused(result: Result<PixelValues, PreprocessError>, groups: usize) {
    match result {
        Err(PreprocessError::Corrupt {
            format: ImageFormat::WebP,
            reason,
        }) => assert!(
            reason.contains(&format!("declares {groups} prefix-code groups")),
            "{reason}"
        ),
        Err(other) => panic!("expected the group count refused, got {other}"),
        Ok(_) => panic!("expected the group count refused, got pixels"),
    }
}

/// The file is what it claims: image-webp decodes the small versions to black, and without the
/// check its allocation grows by tens of KB a group, so that the full file would take GBs.
#[test]
fn image_webp_alone_allocates_per_group() {
    let mut peaks = Vec::new();
    for groups in [64u32, 512] {
        let bytes = bomb(groups);
        let (result, peak) = image_webp_peak(&bytes);
        let rgba = result.unwrap_or_else(|e| panic!("{groups} groups: {e}"));
        assert!(rgba.iter().all(|&b| b == 0));
        eprintln!(
            "{groups} groups: {} bytes of file, image-webp peak {peak}",
            bytes.len()
        );
        peaks.push(peak as f64);
    }
    let per_group = (peaks[1] - peaks[0]) / (512.0 - 64.0);
    let full = peaks[0] + per_group * (65_536.0 - 64.0);
    eprintln!(
        "image-webp: {per_group:.0} bytes a group; 65,536 groups ({} bytes of file) \
         extrapolate to {full:.0} bytes",
        bomb(65_536).len()
    );
    assert!(per_group > 80_000.0, "{per_group}");
    assert!(full > 5e9, "{full}");
}

/// The full bomb, 3.6 MB of file naming 65,536 groups, is refused while the groups are read,
/// under the default limits and under tight ones, having allocated next to nothing.
#[test]
fn sixty_five_thousand_groups_are_refused_within_the_bound() {
    let bytes = bomb(65_536);
    for config in [PreprocessConfig::default(), config(1 << 20)] {
        let bound = peak_bytes_bound(&config.limits);
        let (result, peak) = peak_during(|| preprocess(&bytes, &config));
        eprintln!(
            "max_pixels {}: peak {peak}, bound {bound}",
            config.limits.max_pixels
        );
        expect_refused(result, 65_536);
        assert!(peak as u64 <= bound);
        assert!(peak < 8 << 20, "allocated {peak} bytes before refusing");
    }
}

/// Under a bound of 112 MiB (a megapixel), the most groups accepted are decoded within the
/// bound, and one more is refused: the check's sum is an upper bound of image-webp's peak that
/// is not far from it.
#[test]
fn the_most_groups_accepted_stay_within_the_bound() {
    let config = config(1 << 20);
    let bound = peak_bytes_bound(&config.limits);
    let accepted = |groups: u32| preprocess(&bomb(groups), &config).is_ok();
    assert!(accepted(256));
    assert!(!accepted(2048));
    let (mut low, mut high) = (256, 2048);
    while high - low > 1 {
        let mid = (low + high) / 2;
        if accepted(mid) {
            low = mid;
        } else {
            high = mid;
        }
    }
    let (result, peak) = peak_during(|| preprocess(&bomb(low), &config));
    let pixels = result.unwrap();
    assert_eq!((pixels.width, pixels.height), (448, 448));
    let (_, alone) = image_webp_peak(&bomb(low));
    eprintln!("{low} groups accepted: peak {peak} (image-webp alone {alone}), bound {bound}");
    assert!(peak as u64 <= bound, "peak {peak} > bound {bound}");
    // Not wildly pessimistic: image-webp's own peak is most of the bound.
    assert!(alone as u64 > bound / 2, "{alone} of {bound}");
    let (result, peak) = peak_during(|| preprocess(&bomb(high), &config));
    expect_refused(result, high as usize);
    assert!(peak < 8 << 20, "allocated {peak} bytes before refusing");
}

/// The same file inside an animation's first frame (VP8X, ANIM, ANMF) is refused the same way.
#[test]
fn a_bomb_in_an_animation_frame_is_refused() {
    let simple = bomb(65_536);
    let vp8l = &simple[20..];
    let mut body = Vec::new();
    let mut chunk = |fourcc: &[u8; 4], data: &[u8]| {
        body.extend(fourcc);
        body.extend((data.len() as u32).to_le_bytes());
        body.extend(data);
        if data.len() % 2 == 1 {
            body.push(0);
        }
    };
    let side = 1023u32.to_le_bytes();
    let mut vp8x = vec![0b0001_0010, 0, 0, 0];
    vp8x.extend(&side[..3]);
    vp8x.extend(&side[..3]);
    chunk(b"VP8X", &vp8x);
    chunk(b"ANIM", &[0, 0, 0, 0, 0, 0]);
    let mut anmf = vec![0; 6];
    anmf.extend(&side[..3]);
    anmf.extend(&side[..3]);
    anmf.extend([100, 0, 0, 0]);
    anmf.extend(b"VP8L");
    anmf.extend((vp8l.len() as u32).to_le_bytes());
    anmf.extend(vp8l);
    chunk(b"ANMF", &anmf);
    let mut file = b"RIFF".to_vec();
    file.extend((4 + body.len() as u32).to_le_bytes());
    file.extend(b"WEBP");
    file.extend(&body);

    let config = PreprocessConfig::default();
    let (result, peak) = peak_during(|| preprocess(&file, &config));
    expect_refused(result, 65_536);
    assert!(peak < 8 << 20, "allocated {peak} bytes before refusing");
}

fn fixture(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/images")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Real files pass the check and decode exactly as image-webp decodes them alone: the
/// Pillow-made fixtures (lossless, an animation of lossy frames, lossy with a lossless alpha
/// plane) and files made with libwebp 1.2.4's cwebp and gif2webp from the PNG and GIF fixtures
/// (`cwebp -lossless -m M -q Q`, `-near_lossless 40`, `-q 80 -alpha_q 100 -alpha_filter best`,
/// `gif2webp`), which between them use every transform, colour caches of 2 to 256 entries and
/// up to four groups.
#[test]
fn real_files_pass_unchanged() {
    let images = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/images");
    let mut paths: Vec<_> = [
        "webp_lossless_200x300.webp",
        "webp_animated_90x60.webp",
        "webp_lossy_alpha_150x100.webp",
        "webp_lossy_300x200.webp",
    ]
    .iter()
    .map(|name| images.join(name))
    .collect();
    let made = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/webp_lossless");
    let mut more: Vec<_> = std::fs::read_dir(&made)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    more.sort();
    assert!(more.len() >= 8, "{}", made.display());
    paths.extend(more);
    for path in paths {
        let name = path.display();
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        let ours =
            decode_rgb(&bytes, &DecodeLimits::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut decoder = image::codecs::webp::WebPDecoder::new(std::io::Cursor::new(&bytes[..]))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        if decoder.has_animation() {
            decoder
                .set_background_color(image::Rgba([0, 0, 0, 0]))
                .unwrap();
        }
        let theirs = image::DynamicImage::from_decoder(decoder)
            .unwrap()
            .to_rgb8();
        assert_eq!(ours, theirs, "{name}");
    }
}

/// A lossy image's alpha plane is a headerless VP8L bitstream too (ALPH, compression 1), which
/// image-webp decodes with the same code: the same groups there are refused the same way.
#[test]
fn a_bomb_in_an_alpha_plane_is_refused() {
    let lossy = fixture("webp_lossy_300x200.webp");
    assert_eq!(&lossy[12..16], b"VP8 ");
    let with_alpha = |groups: u32| {
        let mut alph = vec![1];
        alph.extend(bitstream(300, 200, groups, false));
        let mut body = b"VP8X".to_vec();
        body.extend(10u32.to_le_bytes());
        body.extend([0b0001_0000, 0, 0, 0]);
        body.extend(&299u32.to_le_bytes()[..3]);
        body.extend(&199u32.to_le_bytes()[..3]);
        body.extend(b"ALPH");
        body.extend((alph.len() as u32).to_le_bytes());
        body.extend(&alph);
        if alph.len() % 2 == 1 {
            body.push(0);
        }
        body.extend(&lossy[12..]);
        let mut file = b"RIFF".to_vec();
        file.extend((4 + body.len() as u32).to_le_bytes());
        file.extend(b"WEBP");
        file.extend(&body);
        file
    };

    let config = PreprocessConfig::default();
    let file = with_alpha(65_536);
    let (result, peak) = peak_during(|| preprocess(&file, &config));
    expect_refused(result, 65_536);
    assert!(peak < 8 << 20, "allocated {peak} bytes before refusing");

    // The same plane naming 16 groups passes, and the colours are the lossy file's.
    let file = with_alpha(16);
    let rgb = decode_rgb(&file, &config.limits).unwrap();
    assert_eq!(rgb, decode_rgb(&lossy, &config.limits).unwrap());
}

/// Damaged lossless files, truncated anywhere or with bytes changed, never panic and never
/// pass the bound, whatever image-webp then makes of them.
#[test]
fn damaged_lossless_files_stay_within_the_bound() {
    let config = config(1 << 20);
    let bound = peak_bytes_bound(&config.limits);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut random = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for base in [
        fixture("webp_lossless_200x300.webp"),
        std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../tests/fixtures/webp_lossless/rgba_250x180_m6_q75.webp"),
        )
        .unwrap(),
        bomb(64),
    ] {
        let mut cases: Vec<Vec<u8>> = (21..base.len().min(400))
            .step_by(7)
            .map(|n| base[..n].to_vec())
            .collect();
        for _ in 0..300 {
            let mut bytes = base.clone();
            for _ in 0..1 + random() % 4 {
                let at = 21 + (random() as usize) % (bytes.len().min(4000) - 21);
                bytes[at] ^= 1 << (random() % 8);
            }
            cases.push(bytes);
        }
        for bytes in cases {
            let (result, peak) = peak_during(|| preprocess(&bytes, &config));
            if let Err(e) = &result {
                assert!(matches!(e, PreprocessError::Corrupt { .. }), "{e}");
            }
            assert!(peak as u64 <= bound, "peak {peak} > bound {bound}");
        }
    }
}
