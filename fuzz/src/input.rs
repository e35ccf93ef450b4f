//! Reading a fuzz input as a little structured record: simple enough that seed files can be
//! written by hand or by a short script, and every byte string still means something.

/// Reads fields from the front of the input; past its end every field reads as zero, so no
/// input is rejected for being short.
pub struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    pub fn u8(&mut self) -> u8 {
        let (&first, rest) = self.data.split_first().unwrap_or((&0, &[]));
        self.data = rest;
        first
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    /// Up to `len` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, len: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(len.min(self.data.len()));
        self.data = rest;
        head
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The rest of the input as token ids, two bytes each (see [`token_id`]).
    pub fn token_ids(&mut self, vocab_size: usize) -> Vec<u32> {
        let mut ids = Vec::with_capacity(self.data.len() / 2);
        while self.data.len() >= 2 {
            ids.push(token_id(self.u16(), vocab_size));
        }
        ids
    }
}

/// Maps two input bytes to a token id: mostly inside the vocabulary, where the code paths are;
/// 1 in 16 just past it (a model's embedding table may be larger than its tokenizer's
/// vocabulary, so a sampler can return such ids), and a few at the top of the `u32` range.
pub fn token_id(raw: u16, vocab_size: usize) -> u32 {
    let vocab = vocab_size as u32;
    match raw {
        0xfff0.. => u32::MAX - u32::from(raw & 0xf),
        0xf000.. => vocab + u32::from(raw & 0xfff),
        _ => u32::from(raw) % vocab,
    }
}
