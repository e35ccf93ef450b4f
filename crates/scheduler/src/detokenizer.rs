//! Turning a request's generated tokens into text as they arrive.
//!
//! Decoding token by token and concatenating does not work for SentencePiece/LLaMA tokenizers:
//! a token's text depends on its neighbours (the leading `▁` of a run is dropped, a character
//! may be split over several byte-fallback tokens `<0xE4><0xBD><0xA0>`, added tokens are joined
//! with spaces). Decoding the whole output at every step is right but costs O(length) per
//! token. [`Detokenizer`] uses the technique of vLLM and TGI instead: it decodes a short window
//! of recent tokens twice, without and with the newest token, and emits the difference. The
//! window starts at a token whose text was already emitted (vLLM's `prefix_offset`), so that
//! the decoder sees enough context; what was emitted of the window is `read`
//! (`read_offset`).
//!
//! # What the deltas add up to
//!
//! The concatenated deltas equal `decoder.decode(all generated ids, skip_special_tokens)`, the
//! text upstream InternVL's `chat()` decodes its answer from. In particular the first generated
//! piece's leading space is dropped, as the slow LlamaTokenizer drops it from any decode
//! (`▁Hello` alone decodes to `Hello`). vLLM and TGI instead start the window with the last
//! prompt tokens, so that their first delta keeps that space (` Hello`); an OpenAI client
//! expects no such space, and upstream's answers have none, so the window here starts empty.
//!
//! Exceptions:
//! - text ending in an incomplete (or invalid) UTF-8 sequence is held back while more byte
//!   tokens may complete it: the full decode shows U+FFFD there, the deltas show the character
//!   once complete, or U+FFFD once a later token proves the bytes invalid. If the output ends
//!   there, [`Detokenizer::flush`] gives the U+FFFD that the full decode ends with.
//! - With `skip_special_tokens = false` only: when `<s>`, `</s>` or `<unk>` follows text, the
//!   legacy LlamaTokenizer puts a space in front of the text that precedes it, back to the
//!   previous special or added token: `<img> ▁a` decodes to `<img> a`, `<img> ▁a </s>` to
//!   `<img>  a</s>`. That changes text already emitted, which cannot be taken back: the deltas
//!   lack the space, and the detokenizer restarts from the special token. With the default
//!   `skip_special_tokens = true` those tokens are dropped before decoding and the deltas are
//!   exact; and EOS ends a request anyway unless `ignore_eos`.

use std::sync::Arc;

/// What the detokenizer needs of a tokenizer. Kept to this one method so that this crate does
/// not depend on the model crate.
///
/// `internvl_model::tokenizer::Tokenizer` cannot implement it here or there without one crate
/// depending on the other, so the server wraps it: a closure
/// `move |ids: &[u32], skip: bool| tokenizer.decode(ids, skip)` is a `TokenDecoder` already,
/// or a newtype as in `tests/detokenizer.rs`.
pub trait TokenDecoder: Send + Sync {
    /// The text of `ids`, as `tokenizer.decode(ids, skip_special_tokens=...)` upstream;
    /// invalid UTF-8 as U+FFFD.
    fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> String;
}

impl<F> TokenDecoder for F
where
    F: Fn(&[u32], bool) -> String + Send + Sync,
{
    fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> String {
        self(ids, skip_special_tokens)
    }
}

/// One request's incremental detokenizer.
pub struct Detokenizer {
    decoder: Arc<dyn TokenDecoder>,
    skip_special_tokens: bool,
    /// The tokens from vLLM's `prefix_offset` on; earlier ones are forgotten.
    window: Vec<u32>,
    /// The text of `window[..read]` has been emitted.
    read: usize,
    /// `decode(window[..read])`: what the window's decode must start with.
    prefix_text: String,
}

impl std::fmt::Debug for Detokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Detokenizer")
            .field("skip_special_tokens", &self.skip_special_tokens)
            .field("window", &self.window)
            .field("read", &self.read)
            .field("prefix_text", &self.prefix_text)
            .finish_non_exhaustive()
    }
}

impl Detokenizer {
    /// A detokenizer for a request's output; `skip_special_tokens` as the API's (true by
    /// default in OpenAI-compatible servers: no `</s>` in the text).
    pub fn new(decoder: Arc<dyn TokenDecoder>, skip_special_tokens: bool) -> Self {
        Self {
            decoder,
            skip_special_tokens,
            window: Vec::new(),
            read: 0,
            prefix_text: String::new(),
        }
    }

    /// Takes the next generated token; returns the text it completes, often empty.
    ///
    /// Costs two or three decodes of the window, which is the tokens since the last one with
    /// visible text of its own (usually one or two tokens, longer across runs of bare `▁`,
    /// invalid bytes or special tokens).
    pub fn push(&mut self, token: u32) -> String {
        self.window.push(token);
        let mut text = self.decode(&self.window);
        let mut out = String::new();
        if !text.starts_with(&self.prefix_text) {
            // The new token changed text already sent (the legacy LlamaTokenizer puts a space
            // in front of the text before a special token when special tokens are kept). That
            // cannot be taken back: send what was held back before this token (it cannot be
            // completed any more), and go on from the new token alone, so as not to stall.
            let last = self.window.len() - 1;
            out = self.flush_upto(last);
            self.window.drain(..last);
            self.read = 0;
            self.prefix_text.clear();
            text = self.decode(&self.window);
        }
        let delta = &text[self.prefix_text.len()..];
        if delta.is_empty() {
            if self.is_skipped(token) {
                // Skipped tokens leave the text of their neighbours alone (the tokenizer
                // filters them before decoding), so dropping them keeps the window short
                // through, say, EOS after EOS with ignore_eos.
                self.window.pop();
            }
            return out;
        }
        if delta.ends_with(char::REPLACEMENT_CHARACTER) {
            // Most likely a character whose remaining bytes are still to come.
            return out;
        }
        out.push_str(delta);
        // Move the window's start to the tokens just read, unless their text alone is empty:
        // a window opening with a bare `▁` would lose the next piece's space as well (the
        // decoder drops a leading space as long as nothing else was output).
        let just_read = self.decode(&self.window[self.read..]);
        if just_read.is_empty() {
            self.prefix_text = text;
        } else {
            self.window.drain(..self.read);
            self.prefix_text = just_read;
        }
        self.read = self.window.len();
        out
    }

    /// Emits what is held back, as the full decode has it: an incomplete character at the end
    /// as U+FFFD. For a request that ends with [`crate::FinishReason::Length`], if the engine
    /// wants the text to equal the full decode exactly; vLLM drops this text instead.
    pub fn flush(&mut self) -> String {
        self.flush_upto(self.window.len())
    }

    /// Marks `window[..end]` read and returns the text not sent yet of it.
    fn flush_upto(&mut self, end: usize) -> String {
        let text = self.decode(&self.window[..end]);
        let delta = text
            .strip_prefix(self.prefix_text.as_str())
            .unwrap_or_default()
            .to_owned();
        self.read = end;
        self.prefix_text = text;
        delta
    }

    fn decode(&self, ids: &[u32]) -> String {
        self.decoder.decode(ids, self.skip_special_tokens)
    }

    /// Whether `skip_special_tokens` removes `token` from decodes altogether.
    fn is_skipped(&self, token: u32) -> bool {
        self.skip_special_tokens
            && self.decoder.decode(&[token], true).is_empty()
            && !self.decoder.decode(&[token], false).is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pieces of a toy SentencePiece-like vocabulary: 0 and 1 special, 2..=4 bytes.
    const PIECES: [&str; 9] = [
        "<s>", "</s>", "<0xE4>", "<0xBD>", "<0xA0>", "▁", "▁Hello", "▁world", "!",
    ];
    const E4: u32 = 2;
    const BD: u32 = 3;
    const A0: u32 = 4;
    const SPACE: u32 = 5;
    const HELLO: u32 = 6;
    const WORLD: u32 = 7;
    const BANG: u32 = 8;
    const EOS: u32 = 1;

    /// Decodes like the legacy LlamaTokenizer, in miniature: special tokens skipped or kept,
    /// bytes joined (an invalid byte as U+FFFD), `▁` as a space, and up to two leading spaces
    /// dropped (one by transformers, one by SentencePiece's dummy prefix).
    fn toy_decode(ids: &[u32], skip_special_tokens: bool) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            let piece = PIECES[id as usize];
            match id {
                0 | 1 if skip_special_tokens => {}
                2..=4 => {
                    let hex = piece.trim_start_matches("<0x").trim_end_matches('>');
                    bytes.push(u8::from_str_radix(hex, 16).unwrap());
                }
                _ => bytes.extend(piece.replace('▁', " ").bytes()),
            }
        }
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let text = text.strip_prefix(' ').unwrap_or(&text);
        text.strip_prefix(' ').unwrap_or(text).to_owned()
    }

    fn detokenizer() -> Detokenizer {
        Detokenizer::new(Arc::new(toy_decode), true)
    }

    fn deltas(ids: &[u32]) -> Vec<String> {
        let mut d = detokenizer();
        ids.iter().map(|&id| d.push(id)).collect()
    }

    #[test]
    fn a_character_split_over_byte_tokens_comes_out_whole_once() {
        assert_eq!(
            deltas(&[HELLO, E4, BD, A0, BANG]),
            ["Hello", "", "", "你", "!"]
        );
    }

    #[test]
    fn invalid_bytes_come_out_as_replacement_once_proven_invalid() {
        assert_eq!(deltas(&[HELLO, E4, BANG]), ["Hello", "", "\u{fffd}!"]);
    }

    #[test]
    fn flush_gives_an_incomplete_tail_as_the_full_decode_has_it() {
        let mut d = detokenizer();
        assert_eq!(d.push(HELLO), "Hello");
        assert_eq!(d.push(E4), "");
        assert_eq!(d.push(BD), "");
        assert_eq!(d.flush(), "\u{fffd}");
        assert_eq!(toy_decode(&[HELLO, E4, BD], true), "Hello\u{fffd}");
    }

    #[test]
    fn the_first_pieces_leading_space_is_dropped_like_the_full_decode() {
        assert_eq!(deltas(&[HELLO, WORLD]), ["Hello", " world"]);
        assert_eq!(deltas(&[SPACE, HELLO]), ["", "Hello"]);
    }

    /// A window opening with a bare `▁` would drop the next piece's space too.
    #[test]
    fn a_bare_space_does_not_start_a_window() {
        let ids = [HELLO, SPACE, WORLD, SPACE, SPACE, BANG];
        let joined = deltas(&ids).concat();
        assert_eq!(joined, toy_decode(&ids, true));
        assert_eq!(joined, "Hello  world  !");
    }

    #[test]
    fn skipped_special_tokens_neither_show_nor_grow_the_window() {
        let mut d = detokenizer();
        assert_eq!(d.push(HELLO), "Hello");
        for _ in 0..100 {
            assert_eq!(d.push(EOS), "");
        }
        assert_eq!(d.window.len(), 1);
        assert_eq!(d.push(WORLD), " world");

        let mut kept = Detokenizer::new(Arc::new(toy_decode), false);
        assert_eq!(kept.push(HELLO), "Hello");
        assert_eq!(kept.push(EOS), "</s>");
    }
}
