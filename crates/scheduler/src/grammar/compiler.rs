//! Compiling a request's [`GrammarSpec`] into a [`Grammar`], with bounded work.

use super::matcher::{plain, Grammar};
use super::spec::GrammarSpec;
use super::vocab::{token_env, VocabToken};
use llguidance::api::ParserLimits;
use llguidance::{Matcher, ParserFactory};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

/// What a grammar may cost. llguidance measures work in fuel, not time (about 50 units per
/// microsecond when building the lexer, 14 when computing a mask), so the same schema gets the
/// same answer on a loaded machine as on an idle one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrammarLimits {
    /// Fuel for building the lexer of a grammar: about 20 ms at 1,000,000.
    pub compile_fuel: u64,
    /// Fuel for one token's mask: about 15 ms at 200,000. A grammar that needs more fails
    /// its request at that token.
    pub step_fuel: u64,
    /// Symbols in the grammar's productions: 500,000 is a few megabytes of schema.
    pub max_grammar_size: usize,
}

impl Default for GrammarLimits {
    /// llguidance's own defaults, which pass the large real-world schemas of its test suite.
    fn default() -> Self {
        let d = ParserLimits::default();
        Self {
            compile_fuel: d.initial_lexer_fuel,
            step_fuel: d.step_lexer_fuel,
            max_grammar_size: d.max_grammar_size,
        }
    }
}

/// A grammar that cannot be used: the client's (a bad schema, regex or grammar, named in the
/// message) or the vocabulary's (at load).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GrammarError {
    #[error("{0}")]
    Invalid(String),
    #[error("the vocabulary cannot be used for grammars: {0}")]
    Vocab(String),
}

/// Compiles grammars for one model's vocabulary. Built once at load (building the token trie
/// takes a few milliseconds for 32k tokens); cheap to share across threads.
#[derive(Clone)]
pub struct GrammarCompiler {
    factory: Arc<ParserFactory>,
    vocab_size: usize,
}

impl std::fmt::Debug for GrammarCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarCompiler")
            .field("vocab_size", &self.vocab_size)
            .finish_non_exhaustive()
    }
}

impl GrammarCompiler {
    /// A compiler for a vocabulary of `tokens` (in id order) whose grammars end with `eos`,
    /// for logits `logits_width` wide.
    pub fn new(
        tokens: &[VocabToken],
        eos: u32,
        logits_width: usize,
        limits: GrammarLimits,
    ) -> Result<Self, GrammarError> {
        let env = token_env(tokens, eos, logits_width).map_err(GrammarError::Vocab)?;
        let mut factory =
            ParserFactory::new_simple(&env).map_err(|e| GrammarError::Vocab(e.to_string()))?;
        factory.quiet();
        let l = factory.limits_mut();
        l.initial_lexer_fuel = limits.compile_fuel;
        l.step_lexer_fuel = limits.step_fuel;
        l.max_grammar_size = limits.max_grammar_size;
        // Errors go to clients: the rule that failed, not the parser's state and the grammar.
        l.verbose_errors = false;
        Ok(Self {
            factory: Arc::new(factory),
            vocab_size: logits_width,
        })
    }

    /// The width of the masks it makes: the model's logits.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Compiles `spec`. CPU-bound for up to the compile fuel (tens of milliseconds): call it
    /// off the async runtime and off the engine's step thread.
    pub fn compile(&self, spec: &GrammarSpec) -> Result<Grammar, GrammarError> {
        let grammar = spec.to_grammar().map_err(GrammarError::Invalid)?;
        // llguidance returns errors for bad grammars; a panic would be its bug, and must still
        // cost only this request.
        let parser = catch_unwind(AssertUnwindSafe(|| self.factory.create_parser(grammar)))
            .map_err(|_| GrammarError::Invalid(TOO_LARGE.into()))?
            .map_err(|e| invalid(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(error) = matcher.get_error() {
            return Err(invalid(error));
        }
        // A grammar that allows nothing at all would fail at its first token: refuse it now.
        // The first mask is kept, so the first step does not compute it again.
        let mut grammar = Grammar::new(matcher, spec.kind(), self.vocab_size);
        grammar.compute_mask().map_err(GrammarError::Invalid)?;
        Ok(grammar)
    }
}

/// What a client is told of a grammar that broke one of llguidance's own assertions.
const TOO_LARGE: &str = "the grammar is too large or complex to compile";

fn invalid(message: String) -> GrammarError {
    GrammarError::Invalid(plain(message).unwrap_or_else(|| TOO_LARGE.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const EOS: u32 = 0;

    /// EOS, an added token, then one token per printable ASCII character, then "yes" whole.
    fn vocab() -> Vec<VocabToken> {
        let mut tokens = vec![
            VocabToken::Special("</s>".into()),
            VocabToken::Special("<img>".into()),
        ];
        tokens.extend((b' '..=b'~').map(|b| VocabToken::Text(vec![b])));
        tokens.push(VocabToken::Text(b"yes".to_vec()));
        tokens
    }

    fn id_of(tokens: &[VocabToken], text: &[u8]) -> u32 {
        tokens
            .iter()
            .position(|t| *t == VocabToken::Text(text.to_vec()))
            .unwrap() as u32
    }

    fn compiler(width: usize) -> GrammarCompiler {
        GrammarCompiler::new(&vocab(), EOS, width, GrammarLimits::default()).unwrap()
    }

    #[test]
    fn a_choice_allows_only_its_strings_then_ends() {
        let tokens = vocab();
        // Wider than the tokenizer, as the model's logits may be.
        let c = compiler(tokens.len() + 5);
        let spec = GrammarSpec::Choice(vec!["yes".into(), "no".into()]);
        let mut g = c.compile(&spec).unwrap();
        assert_eq!(g.vocab_size(), tokens.len() + 5);
        g.compute_mask().unwrap();
        let mask = g.mask().unwrap();
        for (text, allowed) in [
            (&b"y"[..], true),
            (b"n", true),
            (b"yes", true),
            (b"x", false),
        ] {
            assert_eq!(mask.allows(id_of(&tokens, text)), allowed, "{text:?}");
        }
        assert!(!mask.allows(EOS) && !mask.allows(1));
        assert!(
            !mask.allows(tokens.len() as u32 + 2),
            "padding is never allowed"
        );
        let mut logits = vec![1.0f32; tokens.len() + 5];
        mask.apply(&mut logits);
        let finite = logits.iter().filter(|l| l.is_finite()).count();
        assert_eq!(finite, 3, "y, n and yes");
        g.consume(id_of(&tokens, b"yes")).unwrap();
        // Nothing may follow "yes" but the end.
        assert!(g.mask().is_none());
        let finished = g.is_finished() || {
            g.compute_mask().unwrap();
            let m = g.mask().unwrap();
            m.allows(EOS) && (0..tokens.len() as u32).filter(|&t| m.allows(t)).count() == 1
        };
        assert!(finished);
    }

    #[test]
    fn bad_grammars_are_refused_with_the_reason() {
        let c = compiler(vocab().len());
        let err = c
            .compile(&GrammarSpec::Regex("(unclosed".into()))
            .unwrap_err();
        assert!(matches!(err, GrammarError::Invalid(_)), "{err:?}");
        let err = c
            .compile(&GrammarSpec::JsonSchema(
                serde_json::json!({"type": "nonsense"}),
            ))
            .unwrap_err();
        assert!(err.to_string().contains("nonsense"), "{err}");
        let err = c
            .compile(&GrammarSpec::JsonSchema(serde_json::json!(false)))
            .unwrap_err();
        assert!(err.to_string().contains("false"), "{err}");
        let err = c.compile(&GrammarSpec::Choice(Vec::new())).unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
        let err = c
            .compile(&GrammarSpec::Lark("start: foo".into()))
            .unwrap_err();
        assert!(matches!(err, GrammarError::Invalid(_)), "{err:?}");
    }

    /// Whether the grammar takes `prefix` (byte by byte) and then allows `next`.
    fn allows_after(
        c: &GrammarCompiler,
        schema: serde_json::Value,
        prefix: &str,
        next: &str,
    ) -> bool {
        let tokens = vocab();
        let mut g = c.compile(&GrammarSpec::JsonSchema(schema)).unwrap();
        for b in prefix.bytes() {
            g.compute_mask().unwrap();
            let id = id_of(&tokens, &[b]);
            assert!(
                g.mask().unwrap().allows(id),
                "{prefix:?} at {:?}",
                b as char
            );
            g.consume(id).unwrap();
        }
        g.compute_mask().unwrap();
        g.mask().unwrap().allows(id_of(&tokens, next.as_bytes()))
    }

    #[test]
    fn calendar_formats_are_those_of_rfc_3339() {
        let c = compiler(vocab().len());
        let format = |f: &str| serde_json::json!({"type": "string", "format": f});
        // No leap second off 23:59 UTC, nor anywhere: a validator takes only 23:59:60Z.
        assert!(!allows_after(&c, format("time"), "\"14:45:", "6"));
        assert!(allows_after(&c, format("time"), "\"14:45:", "5"));
        assert!(!allows_after(
            &c,
            format("date-time"),
            "\"2024-01-01T23:59:",
            "6"
        ));
        // 29 February only in leap years.
        assert!(!allows_after(&c, format("date"), "\"2023-02-2", "9"));
        assert!(allows_after(&c, format("date"), "\"2024-02-2", "9"));
        assert!(allows_after(&c, format("date"), "\"2000-02-2", "9"));
        assert!(!allows_after(&c, format("date"), "\"1900-02-2", "9"));
        assert!(!allows_after(&c, format("date-time"), "\"2023-02-2", "9"));
        assert!(allows_after(&c, format("date"), "\"2023-03-2", "9"));
        // Within a schema's own pattern and nested, and never in values.
        let nested = serde_json::json!({"type": "object", "properties": {"at": {
            "type": "string", "format": "time", "pattern": "^1"}},
            "required": ["at"], "additionalProperties": false});
        assert!(!allows_after(&c, nested.clone(), "{\"at\": \"14:45:", "6"));
        assert!(
            !allows_after(&c, nested, "{\"at\": \"", "2"),
            "its own pattern holds"
        );
    }

    #[test]
    fn open_numbers_are_held_to_the_i_json_range() {
        use serde_json::json;
        let held = |schema: serde_json::Value| {
            let mut schema = schema;
            super::super::spec::interoperable(&mut schema);
            schema
        };
        let max = (1i64 << 53) - 1;
        assert_eq!(
            held(json!({"type": "number"})),
            json!({"type": "number", "minimum": -max, "maximum": max})
        );
        assert_eq!(
            held(json!({"type": "integer", "minimum": 0})),
            json!({"type": "integer", "minimum": 0, "maximum": max})
        );
        assert_eq!(
            held(json!({"type": ["string", "number"], "exclusiveMaximum": 5})),
            json!({"type": ["string", "number"], "exclusiveMaximum": 5, "minimum": -max})
        );
        // A bound of the schema's own past the range stays alone.
        assert_eq!(
            held(json!({"type": "number", "minimum": 1e20})),
            json!({"type": "number", "minimum": 1e20})
        );
        // Values are data.
        let values = json!({"const": {"type": "number", "format": "time"},
                            "enum": [{"type": "integer"}]});
        assert_eq!(held(values.clone()), values);

        let c = compiler(vocab().len());
        let number = json!({"type": "number"});
        assert!(!allows_after(&c, number.clone(), "12", "e"), "no exponents");
        assert!(allows_after(&c, number.clone(), "12", "."));
        assert!(allows_after(&c, number.clone(), "900719925474099", "1"));
        assert!(!allows_after(&c, number, "9007199254740991", "0"));
    }

    #[test]
    fn json_is_compact_with_a_space_after_colons_and_commas() {
        let tokens = vocab();
        let c = compiler(tokens.len());
        let schema = serde_json::json!({
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "boolean"}},
            "required": ["a", "b"],
            "additionalProperties": false
        });
        let mut g = c.compile(&GrammarSpec::JsonSchema(schema)).unwrap();
        let mut out = Vec::new();
        // Greedy on a fixed preference: the lowest allowed printable token, except that
        // digits are preferred so the integer ends.
        for _ in 0..40 {
            if g.is_finished() {
                break;
            }
            g.compute_mask().unwrap();
            let m = g.mask().unwrap();
            if m.allows(EOS) {
                break;
            }
            let pick = (0..tokens.len() as u32).find(|&t| m.allows(t)).unwrap();
            if let VocabToken::Text(b) = &tokens[pick as usize] {
                out.extend_from_slice(b);
            }
            g.consume(pick).unwrap();
        }
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("{\"a\": "), "{text}");
        assert!(text.contains(", \"b\": "), "{text}");
    }
}
