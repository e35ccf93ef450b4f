//! The grammar compiler for the model's vocabulary, built once at load.

use internvl_model::tokenizer::Tokenizer;
use internvl_scheduler::{GrammarCompiler, GrammarError, GrammarLimits, VocabToken};

/// The compiler of grammars over `tokenizer`'s tokens, for logits `logits_width` wide: each
/// token as the bytes it stands for (SentencePiece's `▁` a space, `<0xXX>` its byte), markup
/// (special and added tokens) marked special so that no grammar produces it.
pub fn compiler(
    tokenizer: &Tokenizer,
    logits_width: usize,
) -> Result<GrammarCompiler, GrammarError> {
    let tokens: Vec<VocabToken> = (0..tokenizer.vocab_size() as u32)
        .map(|id| {
            let bytes = tokenizer.token_bytes(id).unwrap_or_default();
            if tokenizer.is_markup(id) {
                VocabToken::Special(String::from_utf8_lossy(&bytes).into_owned())
            } else {
                VocabToken::Text(bytes)
            }
        })
        .collect();
    GrammarCompiler::new(
        &tokens,
        tokenizer.eos_id(),
        logits_width,
        GrammarLimits::default(),
    )
}
