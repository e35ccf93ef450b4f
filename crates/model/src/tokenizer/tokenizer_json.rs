//! A checkpoint that ships `tokenizer.json`: run by the `tokenizers` crate, as transformers'
//! fast tokenizer would. Encoding, decoding and which added tokens are special all follow the
//! file (its post-processor adds BOS); only the BOS/EOS names and the clean-up flag come from
//! `tokenizer_config.json`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::sentencepiece::SPACE_SYMBOL;
use super::TokenizerError;

pub(crate) const TOKENIZER_JSON: &str = "tokenizer.json";

#[derive(Debug, Clone)]
pub(crate) struct TokenizerJson {
    path: PathBuf,
    inner: tokenizers::Tokenizer,
    /// Added tokens flagged special: what `skip_special_tokens` drops here.
    special_ids: HashSet<u32>,
    /// Every added token, special or not.
    added_ids: HashSet<u32>,
}

impl TokenizerJson {
    pub(crate) fn load(path: &Path) -> Result<Self, TokenizerError> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|source| {
            TokenizerError::TokenizerJson {
                path: path.to_owned(),
                source,
            }
        })?;
        let added = inner.get_added_tokens_decoder();
        let special_ids = added
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(&id, _)| id)
            .collect();
        let added_ids = added.keys().copied().collect();
        Ok(TokenizerJson {
            path: path.to_owned(),
            inner,
            special_ids,
            added_ids,
        })
    }

    pub(crate) fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .inner
            .encode(text, true)
            .map_err(|source| TokenizerError::Encode {
                path: self.path.clone(),
                source,
            })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The decoders a converted SentencePiece tokenizer uses cannot fail; should another one,
    /// the failure is logged and the text is empty rather than the stream aborted.
    pub(crate) fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> String {
        self.inner.decode(ids, skip_special_tokens).unwrap_or_else(|e| {
            tracing::warn!(path = %self.path.display(), error = %e, "tokenizer.json decode failed");
            String::new()
        })
    }

    pub(crate) fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token's string with SentencePiece conventions applied: `▁` as a space, `<0xXX>` as
    /// that byte (the vocabulary of a converted LLaMA tokenizer uses both).
    pub(crate) fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        let token = self.inner.id_to_token(id)?;
        let byte = token
            .strip_prefix("<0x")
            .and_then(|t| t.strip_suffix('>'))
            .filter(|hex| hex.len() == 2)
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        Some(match byte {
            Some(b) => vec![b],
            None => token.replace(SPACE_SYMBOL, " ").into_bytes(),
        })
    }

    pub(crate) fn is_special(&self, id: u32) -> bool {
        self.special_ids.contains(&id)
    }

    pub(crate) fn is_added(&self, id: u32) -> bool {
        self.added_ids.contains(&id)
    }

    pub(crate) fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
