//! Added tokens (`<s>`, `</s>`, `<img>`, `<IMG_CONTEXT>`, ...) and the split of a text on them.
//!
//! The slow tokenizer never lets SentencePiece see an added token: it cuts the text at every
//! occurrence (transformers' `Trie.split`), emits the token's id, and encodes the text between
//! occurrences chunk by chunk. That is why `</s>` in a multi-turn prompt is one EOS id and why
//! the text after `</img>` starts with its own dummy-prefix `▁`.

use std::collections::HashMap;

/// A piece of text after splitting on added tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chunk<'a> {
    /// Text between added tokens, never empty.
    Text(&'a str),
    /// An added token, by id.
    Token(u32),
}

/// The table of added tokens: content <-> id.
#[derive(Debug, Clone, Default)]
pub(crate) struct AddedTokens {
    by_content: HashMap<String, u32>,
    by_id: HashMap<u32, String>,
    /// Contents, longest first, so that the first match at a position is the longest.
    longest_first: Vec<String>,
}

impl AddedTokens {
    /// Adds a token; a later entry for the same content or id replaces the earlier one, as
    /// assigning into transformers' `_added_tokens_decoder` does.
    pub(crate) fn insert(&mut self, content: &str, id: u32) {
        if let Some(old) = self.by_id.insert(id, content.to_owned()) {
            if old != content {
                self.by_content.remove(&old);
            }
        }
        if let Some(old) = self.by_content.insert(content.to_owned(), id) {
            if old != id {
                self.by_id.remove(&old);
            }
        }
        self.longest_first = self.by_content.keys().cloned().collect();
        self.longest_first
            .sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
    }

    pub(crate) fn id(&self, content: &str) -> Option<u32> {
        self.by_content.get(content).copied()
    }

    pub(crate) fn content(&self, id: u32) -> Option<&str> {
        self.by_id.get(&id).map(String::as_str)
    }

    /// All contents, in no particular order.
    pub(crate) fn contents(&self) -> impl Iterator<Item = &str> {
        self.by_content.keys().map(String::as_str)
    }

    /// Splits `text` at added tokens, taking the leftmost occurrence and, among tokens starting
    /// there, the longest: what transformers' trie does. Empty text chunks are dropped.
    pub(crate) fn split<'a>(&self, text: &'a str) -> Vec<Chunk<'a>> {
        let mut chunks = Vec::new();
        let mut chunk_start = 0;
        let mut pos = 0;
        while pos < text.len() {
            let rest = &text[pos..];
            match self
                .longest_first
                .iter()
                .find(|t| rest.starts_with(t.as_str()))
            {
                Some(token) => {
                    if chunk_start < pos {
                        chunks.push(Chunk::Text(&text[chunk_start..pos]));
                    }
                    chunks.push(Chunk::Token(self.by_content[token]));
                    pos += token.len();
                    chunk_start = pos;
                }
                None => pos += rest.chars().next().map_or(1, char::len_utf8),
            }
        }
        if chunk_start < text.len() {
            chunks.push(Chunk::Text(&text[chunk_start..]));
        }
        chunks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> AddedTokens {
        let mut t = AddedTokens::default();
        for (content, id) in [
            ("<s>", 1),
            ("</s>", 2),
            ("<img>", 10),
            ("</img>", 11),
            ("<IMG_CONTEXT>", 12),
            ("ab", 20),
            ("abc", 21),
        ] {
            t.insert(content, id);
        }
        t
    }

    #[test]
    fn splits_on_tokens_and_keeps_text_between() {
        use Chunk::*;
        let t = table();
        assert_eq!(t.split(""), []);
        assert_eq!(t.split("plain"), [Text("plain")]);
        assert_eq!(
            t.split("<img><IMG_CONTEXT></img>\n描述"),
            [Token(10), Token(12), Token(11), Text("\n描述")]
        );
        assert_eq!(
            t.split(" x</s><s>y "),
            [Text(" x"), Token(2), Token(1), Text("y ")]
        );
        assert_eq!(t.split("<<img>>"), [Text("<"), Token(10), Text(">")]);
        assert_eq!(t.split("<img"), [Text("<img")]);
    }

    #[test]
    fn prefers_the_longest_token_at_the_leftmost_position() {
        use Chunk::*;
        let t = table();
        assert_eq!(t.split("xabcd"), [Text("x"), Token(21), Text("d")]);
        assert_eq!(t.split("xabd"), [Text("x"), Token(20), Text("d")]);
    }

    #[test]
    fn later_entries_replace_earlier_ones() {
        let mut t = table();
        t.insert("<img>", 30);
        assert_eq!(t.id("<img>"), Some(30));
        assert_eq!(t.content(10), None);
        assert_eq!(t.content(30), Some("<img>"));
    }
}
