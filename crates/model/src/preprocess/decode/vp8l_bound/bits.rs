//! The VP8L bit reader: least significant bit first, refusing reads past the data.

use super::Refusal;

/// Least significant bit first, as VP8L packs them.
pub(super) struct Bits<'a> {
    data: &'a [u8],
    /// Bits read; never more than `8 * data.len()`.
    pos: usize,
}

impl<'a> Bits<'a> {
    pub(super) fn new(data: &'a [u8]) -> Self {
        Self { data, pos: 0 }
    }

    /// The next 57 bits at least, zeros past the end.
    pub(super) fn peek(&self) -> u64 {
        let byte = self.pos / 8;
        let mut word = [0u8; 8];
        match self.data.get(byte..byte + 8) {
            Some(bytes) => word.copy_from_slice(bytes),
            None => {
                let rest = self.data.get(byte..).unwrap_or(&[]);
                word[..rest.len()].copy_from_slice(rest);
            }
        }
        u64::from_le_bytes(word) >> (self.pos % 8)
    }

    pub(super) fn consume(&mut self, n: u32) -> Result<(), Refusal> {
        if self.data.len() * 8 - self.pos < n as usize {
            return Err(Refusal::Invalid("truncated"));
        }
        self.pos += n as usize;
        Ok(())
    }

    /// The next `n` (at most 32) bits.
    pub(super) fn read(&mut self, n: u32) -> Result<u32, Refusal> {
        let value = (self.peek() & ((1u64 << n) - 1)) as u32;
        self.consume(n)?;
        Ok(value)
    }
}
