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
    interoperable(&mut schema);
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

/// A year with a 29 February: divisible by 4, and by 400 when by 100.
const LEAP_YEAR: &str =
    "(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:[02468][048]|[13579][26])00)";

/// Patterns that hold llguidance's `date`, `date-time` and `time` formats to RFC 3339 where
/// they are looser: they allow 29 February in any year, and a leap second (60) at any time
/// of day, where RFC 3339 has them only in leap years and at 23:59:60 UTC. Intersected with
/// the format (and any pattern of the schema's own), each keeps a format's answers those a
/// validator takes; a real leap second is lost, which no answer needs.
fn calendar_pattern(format: &str) -> Option<String> {
    // Anchored at the start: the date comes first. Days past a month's end are the
    // format's to refuse.
    let date = format!(
        "(?:[0-9]{{4}}-(?:0[13-9]|1[0-2])-|[0-9]{{4}}-02-(?:[01][0-9]|2[0-8])|{LEAP_YEAR}-02-29)"
    );
    // Seconds 00 to 59.
    let time = "[0-9]{2}:[0-9]{2}:[0-5]";
    match format {
        "date" => Some(format!("^{date}")),
        "date-time" => Some(format!("^{date}.*[tT]{time}")),
        "time" => Some(format!("^{time}")),
        _ => None,
    }
}

/// The largest integer every JSON reader holds exactly: I-JSON's bound (RFC 7493 §2.2).
const I_JSON_MAX: i64 = (1 << 53) - 1;

/// Holds every subschema to what JSON's readers take, where llguidance's formats and numbers
/// are looser: [`calendar_pattern`] for dates and times, one more `allOf` branch; and the
/// I-JSON range for a `number` or `integer` with an open side (unbounded, llguidance writes
/// any number of digits and exponents like `5e1459`, past f64). A bound of the schema's own
/// that lies past the range is kept as it is. Values (`const`, `enum`, `default`,
/// `examples`) are data, not subschemas, and are left as they are.
pub(super) fn interoperable(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            for (key, value) in map.iter_mut() {
                if !matches!(key.as_str(), "const" | "enum" | "default" | "examples") {
                    interoperable(value);
                }
            }
            calendar(map);
            number_range(map);
        }
        Value::Array(items) => items.iter_mut().for_each(interoperable),
        _ => {}
    }
}

fn calendar(map: &mut serde_json::Map<String, Value>) {
    let Some(pattern) = map
        .get("format")
        .and_then(Value::as_str)
        .and_then(calendar_pattern)
    else {
        return;
    };
    let branch = serde_json::json!({"pattern": pattern});
    match map.get_mut("allOf") {
        Some(Value::Array(all)) => all.push(branch),
        // Not an array: llguidance refuses the schema as it stands.
        Some(_) => {}
        None => {
            map.insert("allOf".into(), Value::Array(vec![branch]));
        }
    }
}

fn number_range(map: &mut serde_json::Map<String, Value>) {
    let numeric = |t: &Value| matches!(t.as_str(), Some("number" | "integer"));
    let is_number = match map.get("type") {
        Some(Value::Array(types)) => types.iter().any(numeric),
        Some(t) => numeric(t),
        None => false,
    };
    if !is_number {
        return;
    }
    // `Some(None)`: a bound that is not a number (draft 4's boolean `exclusiveMinimum`).
    let bound = |keys: [&str; 2]| keys.iter().find_map(|k| map.get(*k)).map(Value::as_f64);
    let (min, max) = (
        bound(["minimum", "exclusiveMinimum"]),
        bound(["maximum", "exclusiveMaximum"]),
    );
    let limit = I_JSON_MAX as f64;
    if min.is_none() && max.flatten().is_none_or(|m| m >= -limit) {
        map.insert("minimum".into(), Value::from(-I_JSON_MAX));
    }
    if max.is_none() && min.flatten().is_none_or(|m| m <= limit) {
        map.insert("maximum".into(), Value::from(I_JSON_MAX));
    }
}
