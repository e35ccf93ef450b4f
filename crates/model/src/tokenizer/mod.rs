//! The tokenizer of InternVL-Chat V1.1, id for id equal to the upstream one.
//!
//! The published checkpoint has `tokenizer.model` (SentencePiece BPE with byte fallback) and no
//! `tokenizer.json`, and upstream runs the slow, legacy `LlamaTokenizer`. A fast tokenizer
//! converted from it gave the same ids on the test corpus, but nothing guarantees that (its merge
//! ranks stand in for SentencePiece's scores) and it decodes differently (it drops `<img>` with
//! `skip_special_tokens`, and keeps leading spaces). So by default this crate runs SentencePiece
//! natively (`sentencepiece`, `bpe`, with its own
//! protobuf reader in `proto`) under the slow tokenizer's rules (`llama_legacy`). A directory
//! that does ship a `tokenizer.json` is run by the `tokenizers` crate instead, as transformers
//! would pick the fast tokenizer there.
//!
//! The tests in `crates/model/tests/tokenizer.rs` compare both paths, string by string, with
//! ids and decodes recorded from transformers by `scripts/reference/make_tokenizer_corpus.py`.

mod added_tokens;
mod bpe;
mod config;
mod error;
mod llama_legacy;
mod proto;
mod sentencepiece;
mod tokenizer_json;

use std::path::Path;

pub use error::TokenizerError;

use config::CheckpointConfig;
use llama_legacy::LlamaLegacy;
use proto::ModelProto;
use sentencepiece::SentencePiece;
use tokenizer_json::{TokenizerJson, TOKENIZER_JSON};

/// The SentencePiece model file of a checkpoint.
pub const TOKENIZER_MODEL: &str = "tokenizer.model";

/// A loaded tokenizer. Cheap to share (`Send + Sync`); all methods take `&self`.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    backend: Backend,
    bos_id: u32,
    eos_id: u32,
    clean_up_tokenization_spaces: bool,
}

#[derive(Debug, Clone)]
enum Backend {
    /// `tokenizer.model` under the slow LlamaTokenizer's rules: the upstream behaviour.
    SentencePiece(LlamaLegacy),
    /// `tokenizer.json`, when the directory has one.
    TokenizerJson(TokenizerJson),
}

impl Tokenizer {
    /// Loads the tokenizer of a checkpoint directory: `tokenizer.json` if present, else
    /// `tokenizer.model`, with `tokenizer_config.json`, `special_tokens_map.json` and
    /// `added_tokens.json` resolved as transformers 4.x does. Errors name the offending file.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let config = CheckpointConfig::load(dir)?;
        let json_path = dir.join(TOKENIZER_JSON);
        let backend = if json_path.exists() {
            Backend::TokenizerJson(TokenizerJson::load(&json_path)?)
        } else {
            let path = dir.join(TOKENIZER_MODEL);
            let bytes = std::fs::read(&path).map_err(|source| TokenizerError::Io {
                path: path.clone(),
                source,
            })?;
            let model_error = |reason: String| TokenizerError::Model {
                path: path.clone(),
                reason,
            };
            let proto = ModelProto::parse(&bytes).map_err(|e| model_error(e.0))?;
            let sp = SentencePiece::from_proto(proto).map_err(model_error)?;
            let legacy =
                LlamaLegacy::new(sp, &config).map_err(|reason| TokenizerError::Config {
                    path: config.path.clone(),
                    reason,
                })?;
            Backend::SentencePiece(legacy)
        };
        let resolve = |name: &str, token: &Option<String>| {
            let token = token.as_deref().unwrap_or_default();
            let id = match &backend {
                Backend::SentencePiece(t) => t.token_to_id(token),
                Backend::TokenizerJson(t) => t.token_to_id(token),
            };
            id.ok_or_else(|| TokenizerError::Config {
                path: config.path.clone(),
                reason: format!("{name} {token:?} is not in the vocabulary"),
            })
        };
        let bos_id = resolve("bos_token", &config.bos_token)?;
        let eos_id = resolve("eos_token", &config.eos_token)?;
        Ok(Tokenizer {
            backend,
            bos_id,
            eos_id,
            clean_up_tokenization_spaces: config.clean_up_tokenization_spaces,
        })
    }

    /// Token ids of `text` as upstream's `tokenizer.encode(text)`: BOS first, added tokens
    /// (`<img>`, `<IMG_CONTEXT>`, `</s>`, ...) written in the text become their ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        match &self.backend {
            Backend::SentencePiece(t) => Ok(t.encode(text)),
            Backend::TokenizerJson(t) => t.encode(text),
        }
    }

    /// Text of `ids` as upstream's `tokenizer.decode(ids, skip_special_tokens=...)`. Ids outside
    /// the vocabulary are skipped. For incremental output build on [`Tokenizer::token_bytes`]:
    /// decoding a prefix of a sequence is not a prefix of decoding all of it.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> String {
        let text = match &self.backend {
            Backend::SentencePiece(t) => t.decode(ids, skip_special_tokens),
            Backend::TokenizerJson(t) => t.decode(ids, skip_special_tokens),
        };
        if self.clean_up_tokenization_spaces {
            config::clean_up_tokenization(&text)
        } else {
            text
        }
    }

    /// The raw bytes one token stands for, for a streaming detokenizer: `▁` is a space (the
    /// dummy-prefix space of a first token included), a `<0xXX>` piece is that single byte, so
    /// a character split over byte pieces completes only with its last piece. Special and added
    /// tokens give their text (`<s>`, `<img>`); check [`Tokenizer::is_special`] to skip them.
    /// `None` for an id outside the vocabulary.
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        match &self.backend {
            Backend::SentencePiece(t) => t.token_bytes(id),
            Backend::TokenizerJson(t) => t.token_bytes(id),
        }
    }

    /// Id of a piece or added token by its exact string (`"<IMG_CONTEXT>"`, `"▁the"`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match &self.backend {
            Backend::SentencePiece(t) => t.token_to_id(token),
            Backend::TokenizerJson(t) => t.token_to_id(token),
        }
    }

    /// Id of the BOS token (`<s>`), which `encode` puts first.
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// Id of the EOS token (`</s>`): generation stops on it.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Number of distinct tokens, added tokens included (`len(tokenizer)` upstream). The
    /// model's embedding table may be larger; it is never smaller.
    pub fn vocab_size(&self) -> usize {
        match &self.backend {
            Backend::SentencePiece(t) => t.vocab_size(),
            Backend::TokenizerJson(t) => t.vocab_size(),
        }
    }

    /// Whether `id` is markup rather than text: a special token, or an added token (`<img>`,
    /// `<IMG_CONTEXT>`, `<ref>`). Constrained decoding never produces these by accident.
    pub fn is_markup(&self, id: u32) -> bool {
        self.is_special(id)
            || match &self.backend {
                Backend::SentencePiece(t) => t.is_added(id),
                Backend::TokenizerJson(t) => t.is_added(id),
            }
    }

    /// Whether `decode(.., skip_special_tokens = true)` drops `id`. For the upstream slow
    /// tokenizer that is BOS, EOS, UNK and PAD only: `<img>` and the other added tokens are not
    /// special there and stay in decoded text.
    pub fn is_special(&self, id: u32) -> bool {
        match &self.backend {
            Backend::SentencePiece(t) => t.is_special(id),
            Backend::TokenizerJson(t) => t.is_special(id),
        }
    }
}
