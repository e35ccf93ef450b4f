//! The vocabulary as llguidance sees it: for each token id, the bytes it adds to the output.

use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};
use std::sync::Arc;

/// One token of the model's vocabulary, for the grammar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VocabToken {
    /// A token of text: the bytes it stands for (`▁` as a space, a `<0xXX>` piece as that
    /// byte).
    Text(Vec<u8>),
    /// A control or added token (`<s>`, `</s>`, `<img>`, `<IMG_CONTEXT>`): never produced by a
    /// grammar unless the grammar names it, so a constrained answer cannot open an image span.
    Special(String),
}

/// The token environment of `tokens` (ids in order), padded with unusable entries to the
/// model's `logits_width` (its embedding table may be larger than the tokenizer), with `eos`
/// as the token that ends a grammar.
pub(super) fn token_env(
    tokens: &[VocabToken],
    eos: u32,
    logits_width: usize,
) -> Result<TokEnv, String> {
    if tokens.len() > logits_width {
        return Err(format!(
            "the tokenizer has {} tokens, more than the model's {logits_width} logits",
            tokens.len()
        ));
    }
    if eos as usize >= tokens.len() {
        return Err(format!(
            "EOS token {eos} is outside the vocabulary of {} tokens",
            tokens.len()
        ));
    }
    let vocab_size = u32::try_from(logits_width).map_err(|_| "vocabulary too large")?;
    let mut words: Vec<Vec<u8>> = Vec::with_capacity(logits_width);
    for token in tokens {
        words.push(match token {
            VocabToken::Text(bytes) => bytes.clone(),
            VocabToken::Special(name) => marked(name),
        });
    }
    // Ids past the tokenizer: special, so that no grammar allows them.
    for id in tokens.len()..logits_width {
        words.push(marked(&format!("<unused{id}>")));
    }
    let info = TokRxInfo::new(vocab_size, eos);
    let trie = TokTrie::from(&info, &words);
    Ok(Arc::new(ApproximateTokEnv::new(trie)))
}

/// A special token as the trie marks it.
fn marked(name: &str) -> Vec<u8> {
    let mut bytes = vec![TokTrie::SPECIAL_TOKEN_MARKER];
    bytes.extend_from_slice(name.as_bytes());
    bytes
}
