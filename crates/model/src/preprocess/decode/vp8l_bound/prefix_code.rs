//! The prefix codes of a VP8L bitstream (RFC 9649, 3.7.2): reading one, what image-webp
//! allocates for it, and decoding symbols with it.

use super::bits::Bits;
use super::{Refusal, Scratch, CODE_LENGTH_ORDER, MAX_TABLE_BITS, NODE_BYTES};

/// A prefix code as read, before any table is built.
pub(super) enum Code {
    /// One symbol, read with no bits.
    Single(u16),
    /// The simple code's two symbols, one bit each.
    Two(u16, u16),
    /// Code lengths in the scratch buffer, checked complete, with their longest length and the
    /// number of symbols longer than [`MAX_TABLE_BITS`].
    Lengths { max_length: u32, long: usize },
}

impl Code {
    /// What image-webp's `HuffmanTree` for this code allocates.
    pub(super) fn heap_bytes(&self) -> u64 {
        match *self {
            Self::Single(_) => 0,
            Self::Two(..) => 3 * NODE_BYTES + 2 * 4,
            Self::Lengths { max_length, long } => {
                (4u64 << max_length.min(MAX_TABLE_BITS)) + 2 * NODE_BYTES * long as u64
            }
        }
    }

    pub(super) fn decoder(&self, lengths: &[u8]) -> Decoder {
        match *self {
            Self::Single(symbol) => Decoder::Single(symbol),
            Self::Two(zero, one) => Decoder::Table {
                table: vec![1 << 16 | u32::from(zero), 1 << 16 | u32::from(one)],
                mask: 1,
                long: None,
            },
            Self::Lengths { max_length, .. } => Decoder::from_lengths(lengths, max_length),
        }
    }
}

/// Reads one prefix code of `alphabet` symbols (RFC 9649, 3.7.2.1), leaving a normal code's
/// lengths in `scratch.lengths[..alphabet]`.
pub(super) fn read_code(
    bits: &mut Bits<'_>,
    alphabet: usize,
    scratch: &mut Scratch,
) -> Result<Code, Refusal> {
    if bits.read(1)? == 1 {
        let two = bits.read(1)? == 1;
        let first_bits = if bits.read(1)? == 1 { 8 } else { 1 };
        let zero = bits.read(first_bits)? as u16;
        if usize::from(zero) >= alphabet {
            return Err(Refusal::Invalid("simple code symbol out of the alphabet"));
        }
        if !two {
            return Ok(Code::Single(zero));
        }
        let one = bits.read(8)? as u16;
        if usize::from(one) >= alphabet {
            return Err(Refusal::Invalid("simple code symbol out of the alphabet"));
        }
        return Ok(Code::Two(zero, one));
    }

    let mut code_length_lengths = [0u8; 19];
    let count = 4 + bits.read(4)? as usize;
    for &at in &CODE_LENGTH_ORDER[..count] {
        code_length_lengths[at] = bits.read(3)? as u8;
    }
    let length_code = match shape(&code_length_lengths)? {
        Shape::Single(symbol) => Decoder::Single(symbol),
        Shape::Lengths { max_length, .. } => {
            Decoder::from_lengths(&code_length_lengths, max_length)
        }
    };

    let mut max_symbol = if bits.read(1)? == 1 {
        let length_bits = 2 + 2 * bits.read(3)?;
        let max_minus_two = bits.read(length_bits)? as usize;
        if max_minus_two > alphabet - 2 {
            return Err(Refusal::Invalid("code length count out of the alphabet"));
        }
        2 + max_minus_two
    } else {
        alphabet
    };

    let lengths = &mut scratch.lengths[..alphabet];
    lengths.fill(0);
    let mut previous = 8;
    let mut symbol = 0;
    while symbol < alphabet {
        if max_symbol == 0 {
            break;
        }
        max_symbol -= 1;
        let length = length_code.read(bits)?;
        if length < 16 {
            lengths[symbol] = length as u8;
            symbol += 1;
            if length != 0 {
                previous = length as u8;
            }
        } else {
            let (extra, offset, value) = match length {
                16 => (2, 3, previous),
                17 => (3, 3, 0),
                _ => (7, 11, 0),
            };
            let repeat = bits.read(extra)? as usize + offset;
            if symbol + repeat > alphabet {
                return Err(Refusal::Invalid("code length repeat past the alphabet"));
            }
            lengths[symbol..symbol + repeat].fill(value);
            symbol += repeat;
        }
    }
    Ok(match shape(lengths)? {
        Shape::Single(symbol) => Code::Single(symbol),
        Shape::Lengths { max_length, long } => Code::Lengths { max_length, long },
    })
}

pub(super) enum Shape {
    Single(u16),
    Lengths { max_length: u32, long: usize },
}

/// Checks code lengths as image-webp's `build_implicit` does: no symbol is an error, one symbol
/// a single-node tree, more must fill the code space exactly (checked here without image-webp's
/// 16-bit wrap-around, which lets some oversubscribed codes through).
pub(super) fn shape(lengths: &[u8]) -> Result<Shape, Refusal> {
    let mut histogram = [0u32; 16];
    let mut first = None;
    for (symbol, &length) in lengths.iter().enumerate() {
        if length != 0 {
            histogram[usize::from(length)] += 1;
            first.get_or_insert(symbol);
        }
    }
    let count: u32 = histogram[1..].iter().sum();
    match (count, first) {
        (0, _) | (_, None) => return Err(Refusal::Invalid("prefix code without symbols")),
        (1, Some(symbol)) => return Ok(Shape::Single(symbol as u16)),
        _ => {}
    }
    let space: u32 = (1..16).map(|l| histogram[l] << (15 - l)).sum();
    if space != 1 << 15 {
        return Err(Refusal::Invalid(
            "prefix code lengths do not fill the code space",
        ));
    }
    let max_length = (1..16).rev().find(|&l| histogram[l] != 0).unwrap_or(0) as u32;
    let long = histogram[MAX_TABLE_BITS as usize + 1..].iter().sum::<u32>() as usize;
    Ok(Shape::Lengths { max_length, long })
}

/// A prefix code ready to read symbols with.
pub(super) enum Decoder {
    Single(u16),
    /// Entries `length << 16 | symbol` indexed by the next `log2(mask + 1)` bits (at most
    /// [`MAX_TABLE_BITS`]); an entry of 0 is a longer code, found in `long`.
    Table {
        table: Vec<u32>,
        mask: u64,
        long: Option<Box<Long>>,
    },
}

/// The canonical code's symbols by length, for codes longer than the table.
pub(super) struct Long {
    counts: [u32; 16],
    symbols: Vec<u16>,
    max_length: u32,
}

impl Decoder {
    /// A table of 2^min(max_length, 10) entries for complete code lengths.
    pub(super) fn from_lengths(lengths: &[u8], max_length: u32) -> Self {
        let table_bits = max_length.min(MAX_TABLE_BITS);
        let size = 1usize << table_bits;
        let mut table = vec![0u32; size];
        let mut counts = [0u32; 16];
        for &length in lengths {
            counts[usize::from(length)] += 1;
        }
        counts[0] = 0;
        let mut next = [0u32; 16];
        let mut code = 0;
        for length in 1..16 {
            code = (code + counts[length - 1]) << 1;
            next[length] = code;
        }
        for (symbol, &length) in lengths.iter().enumerate() {
            let length = u32::from(length);
            if length == 0 || length > table_bits {
                continue;
            }
            let code = next[length as usize];
            next[length as usize] += 1;
            let entry = length << 16 | symbol as u32;
            let mut j = (code.reverse_bits() >> (32 - length)) as usize;
            while j < size {
                table[j] = entry;
                j += 1 << length;
            }
        }
        let long = (max_length > table_bits).then(|| {
            let mut symbols = Vec::with_capacity(lengths.len());
            for length in 1..=max_length as u8 {
                for (symbol, &l) in lengths.iter().enumerate() {
                    if l == length {
                        symbols.push(symbol as u16);
                    }
                }
            }
            Box::new(Long {
                counts,
                symbols,
                max_length,
            })
        });
        Self::Table {
            table,
            mask: size as u64 - 1,
            long,
        }
    }

    pub(super) fn read(&self, bits: &mut Bits<'_>) -> Result<u16, Refusal> {
        match self {
            Self::Single(symbol) => Ok(*symbol),
            Self::Table { table, mask, long } => {
                let peeked = bits.peek();
                let entry = table[(peeked & mask) as usize];
                if entry != 0 {
                    bits.consume(entry >> 16)?;
                    return Ok(entry as u16);
                }
                let long = long
                    .as_ref()
                    .ok_or(Refusal::Invalid("prefix code without this code"))?;
                // Canonical decoding a bit at a time: codes of each length are consecutive.
                let (mut code, mut first, mut index) = (0u32, 0u32, 0u32);
                for length in 1..=long.max_length {
                    code |= ((peeked >> (length - 1)) & 1) as u32;
                    let count = long.counts[length as usize];
                    if code < first + count {
                        bits.consume(length)?;
                        return Ok(long.symbols[(index + code - first) as usize]);
                    }
                    index += count;
                    first = (first + count) << 1;
                    code <<= 1;
                }
                Err(Refusal::Invalid("prefix code without this code"))
            }
        }
    }
}
