//! One sequence's grammar state: which tokens it allows next, and what it consumed.

use llguidance::toktrie::SimpleVob;
use llguidance::Matcher;
use std::time::{Duration, Instant};

/// A compiled grammar, ready for a sequence: made by
/// [`GrammarCompiler::compile`](super::GrammarCompiler::compile), moved into the request.
pub struct Grammar {
    /// Boxed: 1.5 KB, moved between threads at every step.
    matcher: Box<Matcher>,
    kind: &'static str,
    /// The width of its masks: the logits of the model it was compiled for.
    vocab_size: usize,
    /// The mask for the next token, once computed; cleared by each consumed token.
    mask: Option<TokenMask>,
}

impl std::fmt::Debug for Grammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammar")
            .field("kind", &self.kind)
            .field("has_mask", &self.mask.is_some())
            .finish_non_exhaustive()
    }
}

impl Clone for Grammar {
    /// An independent copy (its own lexer caches), for another completion of the same
    /// request, which may run on another thread at the same time.
    fn clone(&self) -> Self {
        Self {
            matcher: Box::new(self.matcher.deep_clone()),
            kind: self.kind,
            vocab_size: self.vocab_size,
            mask: self.mask.clone(),
        }
    }
}

impl Grammar {
    pub(super) fn new(matcher: Matcher, kind: &'static str, vocab_size: usize) -> Self {
        Self {
            matcher: Box::new(matcher),
            kind,
            vocab_size,
            mask: None,
        }
    }

    /// The width of the logits it masks.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// `json_schema`, `json_object`, `regex`, `choice` or `lark`.
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// Computes the mask of the next token unless it is computed already; returns how long
    /// that took (`None` when it was, so that only real work is timed). An error (the
    /// grammar's step fuel ran out, or no token can continue it) ends the sequence.
    pub fn compute_mask(&mut self) -> Result<Option<Duration>, String> {
        if self.mask.is_some() {
            return Ok(None);
        }
        let started = Instant::now();
        let mask = self.matcher.compute_mask().map_err(while_generating)?;
        if mask.is_zero() {
            return Err("the grammar allows no next token".into());
        }
        self.mask = Some(TokenMask(mask));
        Ok(Some(started.elapsed()))
    }

    /// The mask computed for the next token.
    pub fn mask(&self) -> Option<&TokenMask> {
        self.mask.as_ref()
    }

    /// Advances past a sampled token (one the mask allowed).
    pub fn consume(&mut self, token: u32) -> Result<(), String> {
        self.mask = None;
        self.matcher.consume_token(token).map_err(while_generating)
    }

    /// Whether the grammar is complete and nothing may follow: the output is over.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}

/// llguidance's error in plain words for a client: its message without the marker it appends
/// when verbose errors are off, nor its "Parser Error" heading; `None` for a panic it caught,
/// whose message is an assertion and a backtrace (its internals, not the client's mistake).
pub(super) fn plain(message: String) -> Option<String> {
    if message.starts_with("panic") || message.contains("<backtrace>") {
        return None;
    }
    let message = message.replace("<non-verbose/>", "");
    let message = message.trim();
    Some(
        message
            .strip_prefix("Parser Error: ")
            .unwrap_or(message)
            .to_string(),
    )
}

/// A grammar's failure after compilation, for its client: the step fuel ran out, or a rule
/// outgrew one of llguidance's limits.
fn while_generating(error: impl std::fmt::Display) -> String {
    match plain(error.to_string()) {
        Some(message) => format!("the grammar failed while generating: {message}"),
        None => "the grammar failed while generating: it is too large or complex".into(),
    }
}

/// The tokens a grammar allows next: a bit per token of the model's logits.
#[derive(Debug, Clone)]
pub struct TokenMask(SimpleVob);

impl TokenMask {
    /// Makes every token the mask does not allow impossible (-inf). `logits` is as wide as
    /// the vocabulary the grammar was compiled for; the engine checks that at submission.
    pub fn apply(&self, logits: &mut [f32]) {
        for (word, chunk) in self.0.as_slice().iter().zip(logits.chunks_mut(32)) {
            if *word == u32::MAX {
                continue;
            }
            for (bit, logit) in chunk.iter_mut().enumerate() {
                if word & (1 << bit) == 0 {
                    *logit = f32::NEG_INFINITY;
                }
            }
        }
    }

    /// Whether `token` is allowed.
    pub fn allows(&self, token: u32) -> bool {
        self.0.is_allowed(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llguidance_errors_reach_clients_in_plain_words() {
        assert_eq!(
            plain("Parser Error: Current row has 2501 items; max is 2000\n<non-verbose/>".into()),
            Some("Current row has 2501 items; max is 2000".into())
        );
        assert_eq!(
            plain("unknown name: foo".into()),
            Some("unknown name: foo".into())
        );
        assert_eq!(
            plain("panic: assertion failed: x\n<backtrace>\n 0: f".into()),
            None
        );
        assert_eq!(
            while_generating("panic: assertion failed"),
            "the grammar failed while generating: it is too large or complex"
        );
    }
}
