//! The slow `LlamaTokenizer` of transformers 4.x in legacy mode, on the native SentencePiece
//! model: the tokenizer InternVL-Chat V1.1 was trained and is served with (`use_fast=False`).
//!
//! Encoding: BOS, then the text split on added tokens, each chunk encoded by SentencePiece on
//! its own (so each gets a dummy-prefix `▁`). Decoding reproduces `PreTrainedTokenizer._decode`
//! and `LlamaTokenizer.convert_tokens_to_string` of transformers 4.37.2, the version InternVL
//! pins, quirks included, because upstream's replies went through them:
//! - added tokens that are not special (`<img>`, `<ref>`, ...) are not dropped by
//!   `skip_special_tokens` and are joined to the text around them with spaces;
//! - a run of pieces loses one `▁` to transformers and then its first remaining `▁` to
//!   SentencePiece's dummy-prefix rule, so leading spaces vanish, and when the stripped string is
//!   no longer a piece (`▁▁▁▁` -> `▁▁▁`) SentencePiece passes it through verbatim, `▁` and all;
//! - BOS, EOS and UNK are put back with a space before them when text precedes them.
//!
//! transformers 4.57 additionally puts a space after a special token that opens a run when the
//! next piece has no `▁`; that only shows with `skip_special_tokens=False`.

use std::collections::HashSet;

use super::added_tokens::{AddedTokens, Chunk};
use super::config::CheckpointConfig;
use super::sentencepiece::{SentencePiece, SPACE_SYMBOL};

/// The tokenizer classes whose rules this reproduces.
const LLAMA_CLASSES: [&str; 2] = ["LlamaTokenizer", "LlamaTokenizerFast"];

#[derive(Debug, Clone)]
pub(crate) struct LlamaLegacy {
    sp: SentencePiece,
    added: AddedTokens,
    /// `all_special_tokens`: kept whole by `convert_tokens_to_string`.
    special_tokens: HashSet<String>,
    /// `all_special_ids`: what `skip_special_tokens` drops.
    special_ids: HashSet<u32>,
    /// transformers' `legacy_added_tokens`: decoded as their own space-separated sub-texts.
    decoded_apart: HashSet<String>,
    bos_prefix: Option<u32>,
    eos_suffix: Option<u32>,
    vocab_size: usize,
}

impl LlamaLegacy {
    /// Combines the model with the checkpoint's files; rejects settings that would make the
    /// reference tokenize differently from what is implemented here.
    pub(crate) fn new(sp: SentencePiece, config: &CheckpointConfig) -> Result<Self, String> {
        if let Some(class) = &config.tokenizer_class {
            if !LLAMA_CLASSES.contains(&class.as_str()) {
                return Err(format!(
                    "tokenizer_class {class:?} is not supported, only LlamaTokenizer"
                ));
            }
        }
        if config.legacy == Some(false) {
            return Err(
                "legacy: false is not supported; InternVL uses the legacy LlamaTokenizer"
                    .to_owned(),
            );
        }
        let mut added = AddedTokens::default();
        for entry in &config.added_tokens {
            if entry.strips_neighbours {
                return Err(format!(
                    "added token {:?}: lstrip, rstrip and single_word are not supported",
                    entry.content
                ));
            }
            added.insert(&entry.content, entry.id);
        }
        // PreTrainedTokenizer.__init__ adds the special tokens that are not added tokens yet,
        // with their SentencePiece ids.
        for token in &config.special_tokens {
            if added.id(token).is_none() {
                let id = sp.piece_to_id(token).ok_or_else(|| {
                    format!("special token {token:?} is neither a piece nor an added token")
                })?;
                added.insert(token, id);
            }
        }
        let token_to_id = |t: &str| added.id(t).or_else(|| sp.piece_to_id(t));
        let special_ids = config
            .special_tokens
            .iter()
            .filter_map(|t| token_to_id(t))
            .collect();
        let special_tokens: HashSet<String> = config.special_tokens.iter().cloned().collect();
        let mut decoded_apart: HashSet<String> = added
            .contents()
            .filter(|c| !special_tokens.contains(*c))
            .map(str::to_owned)
            .collect();
        decoded_apart.extend(
            config
                .additional_special_tokens
                .iter()
                .filter(|t| token_to_id(t).is_some_and(|id| id as usize >= sp.len()))
                .cloned(),
        );
        let required = |name: &str, token: &Option<String>| {
            let token = token
                .as_deref()
                .ok_or_else(|| format!("add_{name}_token is true but there is no {name}_token"))?;
            token_to_id(token)
                .ok_or_else(|| format!("{name}_token {token:?} is not in the vocabulary"))
        };
        let bos_prefix = if config.add_bos_token {
            Some(required("bos", &config.bos_token)?)
        } else {
            None
        };
        let eos_suffix = if config.add_eos_token {
            Some(required("eos", &config.eos_token)?)
        } else {
            None
        };
        let vocab_size = sp.len()
            + added
                .contents()
                .filter(|c| sp.piece_to_id(c).is_none())
                .count();
        Ok(LlamaLegacy {
            sp,
            added,
            special_tokens,
            special_ids,
            decoded_apart,
            bos_prefix,
            eos_suffix,
            vocab_size,
        })
    }

    pub(crate) fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids: Vec<u32> = self.bos_prefix.into_iter().collect();
        for chunk in self.added.split(text) {
            match chunk {
                Chunk::Token(id) => ids.push(id),
                // The slow tokenizer maps SentencePiece's piece strings back to ids with added
                // tokens first; the same here, though no piece of a sane model is an added token.
                Chunk::Text(text) => ids.extend(self.sp.encode(text).into_iter().map(|id| {
                    self.sp
                        .id_to_piece(id)
                        .and_then(|piece| self.added.id(piece))
                        .unwrap_or(id)
                })),
            }
        }
        ids.extend(self.eos_suffix);
        ids
    }

    /// `PreTrainedTokenizer._decode` with `spaces_between_special_tokens=True` (the default) and
    /// without clean-up. Ids outside the vocabulary are skipped (Python raises).
    pub(crate) fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> String {
        let mut sub_texts: Vec<String> = Vec::new();
        let mut current: Vec<&str> = Vec::new();
        for &id in ids {
            if skip_special_tokens && self.special_ids.contains(&id) {
                continue;
            }
            let Some(token) = self.added.content(id).or_else(|| self.sp.id_to_piece(id)) else {
                continue;
            };
            if self.decoded_apart.contains(token) {
                if !current.is_empty() {
                    let text = self.convert_tokens_to_string(&current);
                    if !text.is_empty() {
                        sub_texts.push(text);
                    }
                    current.clear();
                }
                sub_texts.push(token.to_owned());
            } else {
                current.push(token);
            }
        }
        if !current.is_empty() {
            sub_texts.push(self.convert_tokens_to_string(&current));
        }
        sub_texts.join(" ")
    }

    /// `LlamaTokenizer.convert_tokens_to_string` (legacy): strip one `▁` from the first token,
    /// decode runs between special tokens with SentencePiece, a space before each special token
    /// that follows text.
    fn convert_tokens_to_string(&self, tokens: &[&str]) -> String {
        let mut tokens = tokens.to_vec();
        if let Some(first) = tokens.first_mut() {
            if let Some(stripped) = first.strip_prefix(SPACE_SYMBOL) {
                *first = stripped;
            }
        }
        let mut out = String::new();
        let mut run: Vec<&str> = Vec::new();
        let mut prev_is_special = false;
        for (i, &token) in tokens.iter().enumerate() {
            if self.special_tokens.contains(token) {
                if !prev_is_special && i != 0 {
                    out.push(' ');
                }
                out.push_str(&self.sp.decode_pieces(&run));
                out.push_str(token);
                run.clear();
                prev_is_special = true;
            } else {
                run.push(token);
                prev_is_special = false;
            }
        }
        out.push_str(&self.sp.decode_pieces(&run));
        out
    }

    /// Added tokens first, then pieces, as `convert_tokens_to_ids` looks them up.
    pub(crate) fn token_to_id(&self, token: &str) -> Option<u32> {
        self.added.id(token).or_else(|| self.sp.piece_to_id(token))
    }

    /// An added token's text, else the piece's bytes.
    pub(crate) fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        match self.added.content(id) {
            Some(content) => Some(content.as_bytes().to_vec()),
            None => self.sp.piece_bytes(id),
        }
    }

    pub(crate) fn is_special(&self, id: u32) -> bool {
        self.special_ids.contains(&id)
    }

    pub(crate) fn is_added(&self, id: u32) -> bool {
        self.added.content(id).is_some()
    }

    /// `len(tokenizer)`: pieces plus the added tokens that are not pieces.
    pub(crate) fn vocab_size(&self) -> usize {
        self.vocab_size
    }
}
