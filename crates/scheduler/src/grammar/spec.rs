//! What a request constrains its output to, and the llguidance grammar it becomes.

use llguidance::api::TopLevelGrammar;
use llguidance::JsonCompileOptions;
use serde_json::Value;

/// The shape a request's output must have.
#[derive(Debug, Clone, PartialEq)]
pub enum GrammarSpec {
    /// JSON valid against this JSON Schema (OpenAI's `json_schema`, vLLM's `json`).
    JsonSchema(Value),
    /// Any JSON object (OpenAI's `json_object`).
    JsonObject,
    /// Text matching this regular expression, whole (vLLM's `regex`).
    Regex(String),
    /// Exactly one of these strings (vLLM's `choice`).
    Choice(Vec<String>),
    /// Text of this Lark grammar (vLLM's `grammar`, llguidance's Lark dialect).
    Lark(String),
}

impl GrammarSpec {
    /// The kind, for logs and metrics: `json_schema`, `json_object`, `regex`, `choice`, `lark`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::JsonSchema(_) => "json_schema",
            Self::JsonObject => "json_object",
            Self::Regex(_) => "regex",
            Self::Choice(_) => "choice",
            Self::Lark(_) => "lark",
        }
    }

    /// llguidance's grammar for the spec. JSON is written compactly with one space after `:`
    /// and `,` (as Python's `json.dumps`, and as OpenAI's structured outputs look), and no
    /// other whitespace: left free, whitespace is a place where a weak model can wander
    /// without end.
    pub(super) fn to_grammar(&self) -> Result<TopLevelGrammar, String> {
        Ok(match self {
            Self::JsonSchema(schema) => TopLevelGrammar::from_json_schema(json_schema(schema)?),
            Self::JsonObject => TopLevelGrammar::from_json_schema(json_schema(
                &serde_json::json!({"type": "object"}),
            )?),
            Self::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Self::Choice(choices) => {
                if choices.is_empty() {
                    return Err("the list of choices is empty".into());
                }
                // One regex of alternatives, not one grammar rule per choice: llguidance's
                // lexer takes a regex's alternatives as one token class, where thousands of
                // rules (a classifier's labels) each cost it every step.
                let alternatives: Vec<String> =
                    choices.iter().map(|c| regex_syntax::escape(c)).collect();
                TopLevelGrammar::from_regex(&format!("(?:{})", alternatives.join("|")))
            }
            Self::Lark(grammar) => TopLevelGrammar::from_lark(grammar.clone()),
        })
    }
}

/// The schema with this server's JSON layout, unless the schema sets llguidance's own
/// (`x-guidance`). `true` is the schema of any JSON value, `false` of none.
fn json_schema(schema: &Value) -> Result<Value, String> {
    let mut schema = match schema {
        Value::Bool(true) => serde_json::json!({}),
        Value::Bool(false) => return Err("the schema `false` accepts no value".into()),
        Value::Object(_) => schema.clone(),
        _ => return Err("a JSON schema must be an object or a boolean".into()),
    };
    if schema.get("x-guidance").is_none() {
        let options = JsonCompileOptions {
            item_separator: ", ".into(),
            key_separator: ": ".into(),
            whitespace_flexible: false,
            ..JsonCompileOptions::default()
        };
        options.apply_to(&mut schema);
    }
    Ok(schema)
}
