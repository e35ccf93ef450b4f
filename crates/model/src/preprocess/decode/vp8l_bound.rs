//! What image-webp 0.2.4 holds at once while it builds a lossless (VP8L) bitstream's prefix-code
//! groups, found by reading the bitstream up to the end of those groups (RFC 9649, section 3).
//!
//! image-webp builds every group the meta prefix ("entropy") image names, up to 65,536 of them
//! and up to about 120 KB each, before it decodes a pixel, and has no limit on them: a file of a
//! few MB could make it allocate gigabytes. This reads the header, the transforms (decoding their
//! sub-images symbol by symbol, since the bit position after them depends on every code,
//! backward reference and cache index in them), the colour cache, the entropy image (whose
//! pixels it keeps, to find the largest group index) and then every group's code lengths, and
//! adds up what image-webp allocates for each of them, from `lossless.rs` and `huffman.rs`:
//!
//! * a tree of one symbol allocates nothing; the two-symbol simple code 3 nodes and 2 entries;
//! * any other code a table of 2^min(longest code, 10) `u32` and room for two nodes per symbol
//!   longer than 10 bits (`Vec::with_capacity`, never grown for a complete code);
//! * the groups themselves (five trees each) in a `Vec` grown by pushing.
//!
//! The parse follows image-webp's (same checks, same order), so an error here is one image-webp
//! meets too, its reader being if anything stricter near the end of the data; the one place it
//! does not follow is a prefix code whose lengths oversubscribe the code space, which image-webp's
//! 16-bit arithmetic can let through (and which no valid file has). Either way a stream this
//! cannot follow is refused, never handed on unchecked.

mod bits;
mod prefix_code;

use bits::Bits;
use prefix_code::{read_code, Decoder};

/// Alphabet sizes of a group's five codes: green with length prefixes (plus the colour cache),
/// red, blue, alpha, distance prefixes.
const ALPHABET: [usize; 5] = [256 + 24, 256, 256, 256, 40];
/// image-webp's `MAX_TABLE_BITS`: codes longer than this go to the tree.
const MAX_TABLE_BITS: u32 = 10;
/// `HuffmanTreeNode`: a `usize` payload and a tag.
const NODE_BYTES: u64 = 16;
/// `HuffmanTree`, 56 bytes on 64-bit targets, rounded up.
const TREE_STRUCT_BYTES: u64 = 64;
/// What the figures below do not itemise: a tree's code lengths while it is built (at most
/// 2,328 `u16`), the code-length code, the sub-images' own groups and caches (freed before the
/// main groups are built), the decoder's structs.
const SLACK_BYTES: u64 = 1 << 20;
/// Order in which the code-length code's lengths are stored.
const CODE_LENGTH_ORDER: [usize; 19] = [
    17, 18, 0, 1, 2, 3, 4, 5, 16, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
];
/// Most symbols of any alphabet: green with an 11-bit colour cache.
const MAX_ALPHABET: usize = 256 + 24 + (1 << 11);

/// How the bitstream starts.
#[derive(Debug, Clone, Copy)]
pub(super) enum Header {
    /// A `VP8L` chunk: signature, 14-bit sides, alpha hint and version, the sides having to be
    /// these (the container's), as image-webp checks.
    Explicit { width: u32, height: u32 },
    /// An `ALPH` chunk's lossless alpha plane: no header, the sides are the frame's.
    Implicit { width: u32, height: u32 },
}

/// Why a bitstream is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Refusal {
    /// The bitstream breaks the format where image-webp's parse fails too.
    Invalid(&'static str),
    /// Decoding would hold at least `needed` bytes at once, more than `limit`; `groups` is how
    /// many prefix-code groups the bitstream declares.
    TooCostly {
        groups: usize,
        needed: u64,
        limit: u64,
    },
}

/// Checks that image-webp can build the prefix codes of `data` within `limit` bytes, counting
/// `held` bytes that the caller knows are live meanwhile (the pixel buffers).
///
/// Allocates at most the entropy image (4 bytes per pixel, at most a sixteenth of the image),
/// checked against `limit` first, and a few prefix-code tables of at most 4 KB each.
pub(super) fn check(data: &[u8], header: Header, held: u64, limit: u64) -> Result<(), Refusal> {
    let mut bits = Bits::new(data);
    let (width, height) = match header {
        Header::Explicit { width, height } => {
            if bits.read(8)? != 0x2f {
                return Err(Refusal::Invalid("bad signature"));
            }
            let w = bits.read(14)? + 1;
            let h = bits.read(14)? + 1;
            if (w, h) != (width, height) {
                return Err(Refusal::Invalid("size differs from the container's"));
            }
            let _alpha = bits.read(1)?;
            if bits.read(3)? != 0 {
                return Err(Refusal::Invalid("unknown version"));
            }
            (w as usize, h as usize)
        }
        // image-webp takes them as u16.
        Header::Implicit { width, height } => {
            (usize::from(width as u16), usize::from(height as u16))
        }
    };
    let mut scratch = Scratch::default();
    let mut held = held.saturating_add(SLACK_BYTES);
    let too_costly = |groups: usize, needed: u64| Refusal::TooCostly {
        groups,
        needed,
        limit,
    };

    // Transforms, each kept by image-webp until the image is decoded.
    let mut xsize = width;
    let mut seen = [false; 4];
    while bits.read(1)? == 1 {
        let kind = bits.read(2)? as usize;
        if std::mem::replace(&mut seen[kind], true) {
            return Err(Refusal::Invalid("transform repeated"));
        }
        match kind {
            0 | 1 => {
                let size_bits = bits.read(3)? + 2;
                let bw = subsample(xsize, size_bits);
                let bh = subsample(height, size_bits);
                sub_image(&mut bits, bw, bh, None, &mut scratch)?;
                held = held.saturating_add(4 * (bw * bh) as u64);
            }
            2 => {}
            _ => {
                let colours = bits.read(8)? as usize + 1;
                sub_image(&mut bits, colours, 1, None, &mut scratch)?;
                held = held.saturating_add(4 * colours as u64);
                let pack = match colours {
                    1..=2 => 3,
                    3..=4 => 2,
                    5..=16 => 1,
                    _ => 0,
                };
                xsize = subsample(xsize, pack);
            }
        }
    }

    let cache_bits = read_cache_bits(&mut bits)?;
    let cache_size = cache_bits.map_or(0, |b| 1usize << b);
    held = held.saturating_add(4 * cache_size as u64);

    let mut groups = 1;
    if bits.read(1)? == 1 {
        let huffman_bits = bits.read(3)? + 2;
        let ew = subsample(xsize, huffman_bits);
        let eh = subsample(height, huffman_bits);
        let pixels = ew * eh;
        // Ours (4 bytes a pixel) before image-webp runs; image-webp's: the decoded sub-image
        // (4) and, while it is converted, its group indices (2), which stay.
        let own = 4 * pixels as u64;
        if own.saturating_add(SLACK_BYTES) > limit {
            return Err(too_costly(0, own));
        }
        let mut image = Vec::with_capacity(pixels);
        sub_image(&mut bits, ew, eh, Some(&mut image), &mut scratch)?;
        groups = image
            .iter()
            .map(|&p| ((p >> 8) & 0xffff) as usize)
            .max()
            .unwrap_or(0)
            + 1;
        held = held.saturating_add(6 * pixels as u64);
    }

    // The groups' Vec, grown by pushing: while it moves from capacity c to 2c (c < groups) both
    // blocks are live.
    let group_struct = 5 * TREE_STRUCT_BYTES;
    let mut needed = held.saturating_add(3 * group_struct * groups.max(4) as u64);
    if needed > limit {
        return Err(too_costly(groups, needed));
    }
    for _ in 0..groups {
        for (j, &size) in ALPHABET.iter().enumerate() {
            let alphabet = if j == 0 { size + cache_size } else { size };
            let code = read_code(&mut bits, alphabet, &mut scratch)?;
            needed = needed.saturating_add(code.heap_bytes());
        }
        if needed > limit {
            return Err(too_costly(groups, needed));
        }
    }
    Ok(())
}

/// `ceil(size / 2^bits)`.
fn subsample(size: usize, bits: u32) -> usize {
    (size + (1 << bits) - 1) >> bits
}

fn read_cache_bits(bits: &mut Bits<'_>) -> Result<Option<u32>, Refusal> {
    if bits.read(1)? == 0 {
        return Ok(None);
    }
    let cache_bits = bits.read(4)?;
    if !(1..=11).contains(&cache_bits) {
        return Err(Refusal::Invalid("colour cache bits out of range"));
    }
    Ok(Some(cache_bits))
}

/// Buffers reused from code to code.
struct Scratch {
    lengths: Vec<u8>,
}

impl Default for Scratch {
    fn default() -> Self {
        Self {
            lengths: vec![0; MAX_ALPHABET],
        }
    }
}

/// A sub-image (transform data, colour table or entropy image): one group of codes, an optional
/// colour cache, no meta codes. Decoded only to find where it ends, unless `store` asks for its
/// ARGB pixels.
fn sub_image(
    bits: &mut Bits<'_>,
    xsize: usize,
    ysize: usize,
    mut store: Option<&mut Vec<u32>>,
    scratch: &mut Scratch,
) -> Result<(), Refusal> {
    let cache_bits = read_cache_bits(bits)?;
    let cache_size = cache_bits.map_or(0, |b| 1usize << b);
    let mut codes = Vec::with_capacity(5);
    for (j, &size) in ALPHABET.iter().enumerate() {
        let alphabet = if j == 0 { size + cache_size } else { size };
        codes.push(read_code(bits, alphabet, scratch)?.decoder(&scratch.lengths[..alphabet]));
    }
    let [green, red, blue, alpha, distance] = &codes[..] else {
        unreachable!("five codes were pushed")
    };
    let total = xsize * ysize;

    // Every pixel a literal costing no bits: image-webp fills the image with it.
    if let (Decoder::Single(g), Decoder::Single(r), Decoder::Single(b), Decoder::Single(a)) =
        (green, red, blue, alpha)
    {
        if *g < 256 {
            if let Some(out) = store {
                let argb = u32::from(*a) << 24 | u32::from(*r) << 16 | u32::from(*g) << 8;
                out.resize(total, argb | u32::from(*b));
            }
            return Ok(());
        }
    }

    let mut cache = match (&store, cache_bits) {
        (Some(_), Some(b)) => vec![0u32; 1 << b],
        _ => Vec::new(),
    };
    let insert = |cache: &mut Vec<u32>, argb: u32| {
        if let Some(b) = cache_bits {
            cache[(0x1e35_a7bd_u32.wrapping_mul(argb) >> (32 - b)) as usize] = argb;
        }
    };
    let mut index = 0;
    while index < total {
        let symbol = green.read(bits)?;
        if symbol < 256 {
            let r = red.read(bits)?;
            let b = blue.read(bits)?;
            let a = alpha.read(bits)?;
            if let Some(out) = store.as_deref_mut() {
                let argb = u32::from(a as u8) << 24
                    | u32::from(r as u8) << 16
                    | u32::from(symbol as u8) << 8
                    | u32::from(b as u8);
                out.push(argb);
                if cache_bits.is_some() {
                    insert(&mut cache, argb);
                }
            }
            index += 1;
        } else if symbol < 256 + 24 {
            let length = prefix_value(bits, symbol - 256)?;
            let distance_symbol = distance.read(bits)?;
            let distance = plane_distance(xsize, prefix_value(bits, distance_symbol)?);
            if index < distance || total - index < length {
                return Err(Refusal::Invalid("backward reference out of the image"));
            }
            if let Some(out) = store.as_deref_mut() {
                for i in index..index + length {
                    let argb = out[i - distance];
                    out.push(argb);
                    // image-webp leaves the cache alone for a run of the previous pixel.
                    if cache_bits.is_some() && distance != 1 {
                        insert(&mut cache, argb);
                    }
                }
            }
            index += length;
        } else {
            if cache_bits.is_none() {
                return Err(Refusal::Invalid("colour cache symbol without a cache"));
            }
            if let Some(out) = store.as_deref_mut() {
                // The symbol is within the alphabet, so within the cache; inserting the colour
                // looked up writes the slot it came from, so it is left out.
                out.push(cache[usize::from(symbol - 280)]);
            }
            index += 1;
        }
    }
    Ok(())
}

/// A length or distance from its prefix symbol and extra bits.
fn prefix_value(bits: &mut Bits<'_>, symbol: u16) -> Result<usize, Refusal> {
    if symbol < 4 {
        return Ok(usize::from(symbol) + 1);
    }
    let extra = u32::from((symbol - 2) >> 1);
    let offset = (2 + (usize::from(symbol) & 1)) << extra;
    Ok(offset + bits.read(extra)? as usize + 1)
}

#[rustfmt::skip]
const DISTANCE_MAP: [(i8, i8); 120] = [
    (0, 1),  (1, 0),  (1, 1),  (-1, 1), (0, 2),  (2, 0),  (1, 2),  (-1, 2),
    (2, 1),  (-2, 1), (2, 2),  (-2, 2), (0, 3),  (3, 0),  (1, 3),  (-1, 3),
    (3, 1),  (-3, 1), (2, 3),  (-2, 3), (3, 2),  (-3, 2), (0, 4),  (4, 0),
    (1, 4),  (-1, 4), (4, 1),  (-4, 1), (3, 3),  (-3, 3), (2, 4),  (-2, 4),
    (4, 2),  (-4, 2), (0, 5),  (3, 4),  (-3, 4), (4, 3),  (-4, 3), (5, 0),
    (1, 5),  (-1, 5), (5, 1),  (-5, 1), (2, 5),  (-2, 5), (5, 2),  (-5, 2),
    (4, 4),  (-4, 4), (3, 5),  (-3, 5), (5, 3),  (-5, 3), (0, 6),  (6, 0),
    (1, 6),  (-1, 6), (6, 1),  (-6, 1), (2, 6),  (-2, 6), (6, 2),  (-6, 2),
    (4, 5),  (-4, 5), (5, 4),  (-5, 4), (3, 6),  (-3, 6), (6, 3),  (-6, 3),
    (0, 7),  (7, 0),  (1, 7),  (-1, 7), (5, 5),  (-5, 5), (7, 1),  (-7, 1),
    (4, 6),  (-4, 6), (6, 4),  (-6, 4), (2, 7),  (-2, 7), (7, 2),  (-7, 2),
    (3, 7),  (-3, 7), (7, 3),  (-7, 3), (5, 6),  (-5, 6), (6, 5),  (-6, 5),
    (8, 0),  (4, 7),  (-4, 7), (7, 4),  (-7, 4), (8, 1),  (8, 2),  (6, 6),
    (-6, 6), (8, 3),  (5, 7),  (-5, 7), (7, 5),  (-7, 5), (8, 4),  (6, 7),
    (-6, 7), (7, 6),  (-7, 6), (8, 5),  (7, 7),  (-7, 7), (8, 6),  (8, 7),
];

/// A distance code to a distance in pixels, as image-webp maps it (at least 1).
fn plane_distance(xsize: usize, code: usize) -> usize {
    if code > 120 {
        return code - 120;
    }
    let (dx, dy) = DISTANCE_MAP[code - 1];
    let distance = i64::from(dx) + i64::from(dy) * xsize as i64;
    distance.max(1) as usize
}
