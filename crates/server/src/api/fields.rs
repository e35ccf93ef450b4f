//! The request fields [`ChatCompletionRequest`](super::openai::ChatCompletionRequest) does not
//! read (its `other`): those of OpenAI's or vLLM's chat API that this server does not
//! implement are refused by name, since a client that sets one expects an effect it would
//! silently not get; a few harmless ones are ignored; unknown ones are ignored with a warning,
//! as OpenAI-compatible servers do (clients send vendor extensions), so a typo at least shows
//! in the log.

use super::error::{echoed, ApiError};
use serde_json::Value;
use std::collections::HashMap;

/// The value of an unimplemented field that asks for what this server does anyway: accepted
/// (as is null, which is the field left out), since some clients send every field with its
/// default.
#[derive(Debug, Clone, Copy)]
enum Inert {
    /// Only null.
    Nothing,
    Bool(bool),
    Number(f64),
    EmptyList,
    /// One of these strings.
    OneOf(&'static [&'static str]),
}

impl Inert {
    fn accepts(self, value: &Value) -> bool {
        match (self, value) {
            (_, Value::Null) => true,
            (Inert::Bool(b), Value::Bool(v)) => b == *v,
            (Inert::Number(n), Value::Number(v)) => v.as_f64() == Some(n),
            (Inert::EmptyList, Value::Array(v)) => v.is_empty(),
            (Inert::OneOf(names), Value::String(s)) => names.contains(&s.as_str()),
            _ => false,
        }
    }

    /// The accepted value, as the refusal states it.
    fn describe(self) -> Option<String> {
        match self {
            Inert::Nothing => None,
            Inert::Bool(b) => Some(b.to_string()),
            Inert::Number(n) => Some(n.to_string()),
            Inert::EmptyList => Some("[]".into()),
            Inert::OneOf(names) => Some(
                names
                    .iter()
                    .map(|n| format!("\"{n}\""))
                    .collect::<Vec<_>>()
                    .join(" or "),
            ),
        }
    }
}

/// Fields of OpenAI's and vLLM's chat-completions APIs that this server does not implement,
/// each with the value that asks for nothing more than this server does. `stop_token_ids`,
/// `min_tokens`, `ignore_eos`, `top_k`, `min_p`, `repetition_penalty` and the structured
/// outputs are implemented (read by `ChatCompletionRequest`); so are `tools`, `tool_choice`
/// and `parallel_tool_calls`, which have their own checks.
const UNIMPLEMENTED: &[(&str, Inert)] = &[
    // OpenAI: the legacy function calling (`tools` replaces it), outputs and tools this model
    // does not have, and reasoning controls of reasoning models.
    ("functions", Inert::Nothing),
    ("function_call", Inert::Nothing),
    ("audio", Inert::Nothing),
    ("modalities", Inert::Nothing),
    ("prediction", Inert::Nothing),
    ("web_search_options", Inert::Nothing),
    ("reasoning_effort", Inert::Nothing),
    ("verbosity", Inert::Nothing),
    // vLLM's sampling extras.
    ("best_of", Inert::Nothing),
    ("use_beam_search", Inert::Bool(false)),
    ("length_penalty", Inert::Number(1.0)),
    ("include_stop_str_in_output", Inert::Bool(false)),
    ("prompt_logprobs", Inert::Nothing),
    ("allowed_token_ids", Inert::Nothing),
    ("bad_words", Inert::EmptyList),
    ("logits_processors", Inert::Nothing),
    ("truncate_prompt_tokens", Inert::Nothing),
    ("priority", Inert::Number(0.0)),
    // vLLM's output shape: special tokens are always left out of the text.
    ("skip_special_tokens", Inert::Bool(true)),
    ("spaces_between_special_tokens", Inert::Bool(true)),
    ("return_tokens_as_token_ids", Inert::Bool(false)),
    ("return_token_ids", Inert::Bool(false)),
    ("echo", Inert::Bool(false)),
    // vLLM's prompt building: the model's own template, a generation prompt after the last
    // message, no special tokens added beyond the template's.
    ("add_generation_prompt", Inert::Bool(true)),
    ("continue_final_message", Inert::Bool(false)),
    ("add_special_tokens", Inert::Bool(false)),
    ("documents", Inert::Nothing),
    ("chat_template", Inert::Nothing),
    ("chat_template_kwargs", Inert::Nothing),
    ("mm_processor_kwargs", Inert::Nothing),
    ("media_io_kwargs", Inert::Nothing),
    // vLLM's serving: request ids are this server's, the prefix cache is shared by all.
    ("request_id", Inert::Nothing),
    ("cache_salt", Inert::Nothing),
    ("kv_transfer_params", Inert::Nothing),
    ("vllm_xargs", Inert::Nothing),
    // vLLM's older structured-output settings: llguidance is the only backend, and JSON is
    // written without free whitespace.
    (
        "guided_decoding_backend",
        Inert::OneOf(&["auto", "guidance", "llguidance"]),
    ),
    ("guided_whitespace_pattern", Inert::Nothing),
];

/// OpenAI fields accepted and ignored: they concern OpenAI's own services (storing
/// completions and their metadata, service tiers, abuse monitoring, prompt-cache routing),
/// not what is generated.
const IGNORED: [&str; 6] = [
    "store",
    "metadata",
    "service_tier",
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
];

/// Most unknown field names one warning lists, and characters of each.
const WARNED_NAMES: usize = 8;
const WARNED_CHARS: usize = 64;

/// Refuses the first unimplemented field of `other` (in [`UNIMPLEMENTED`]'s order, so the
/// answer does not depend on the map's) set to more than its inert value; logs one warning
/// naming the unknown ones.
pub fn check_other_fields(other: &HashMap<String, Value>) -> Result<(), ApiError> {
    for (field, inert) in UNIMPLEMENTED {
        let Some(value) = other.get(*field) else {
            continue;
        };
        if inert.accepts(value) {
            continue;
        }
        let message = match inert.describe() {
            Some(accepted) => format!(
                "`{field}` is not supported by this server; only {accepted} (what it does \
                 anyway) is accepted"
            ),
            None => format!("`{field}` is not supported by this server"),
        };
        return Err(ApiError::invalid(field, message));
    }
    if let Some(names) = unknown_fields(other) {
        tracing::warn!(fields = %names, "ignoring unknown request fields");
    }
    Ok(())
}

/// The unknown fields of `other`, sorted and bounded for a log line: at most
/// [`WARNED_NAMES`] names of at most [`WARNED_CHARS`] characters, and how many more.
fn unknown_fields(other: &HashMap<String, Value>) -> Option<String> {
    let mut unknown: Vec<&str> = other
        .keys()
        .map(String::as_str)
        .filter(|k| !IGNORED.contains(k) && !UNIMPLEMENTED.iter().any(|(f, _)| f == k))
        .collect();
    if unknown.is_empty() {
        return None;
    }
    unknown.sort_unstable();
    let mut names: Vec<String> = unknown
        .iter()
        .take(WARNED_NAMES)
        .map(|k| format!("`{}`", echoed(k, WARNED_CHARS)))
        .collect();
    if unknown.len() > WARNED_NAMES {
        names.push(format!("and {} more", unknown.len() - WARNED_NAMES));
    }
    Some(names.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(body: Value) -> HashMap<String, Value> {
        serde_json::from_value(body).unwrap()
    }

    #[test]
    fn unimplemented_fields_are_refused_by_name() {
        for (body, param) in [
            (json!({"functions": []}), "functions"),
            (json!({"audio": {"voice": "x"}}), "audio"),
            (json!({"reasoning_effort": "low"}), "reasoning_effort"),
            (json!({"best_of": 2}), "best_of"),
            (json!({"use_beam_search": true}), "use_beam_search"),
            (json!({"length_penalty": 0.5}), "length_penalty"),
            (json!({"bad_words": ["x"]}), "bad_words"),
            (json!({"skip_special_tokens": false}), "skip_special_tokens"),
            (json!({"echo": true}), "echo"),
            (
                json!({"add_generation_prompt": false}),
                "add_generation_prompt",
            ),
            (json!({"chat_template": "{{ x }}"}), "chat_template"),
            (json!({"priority": 1}), "priority"),
            (json!({"priority": "0"}), "priority"),
            (
                json!({"guided_decoding_backend": "xgrammar"}),
                "guided_decoding_backend",
            ),
            (
                json!({"guided_whitespace_pattern": " "}),
                "guided_whitespace_pattern",
            ),
        ] {
            let err = check_other_fields(&fields(body.clone())).unwrap_err();
            assert_eq!(err.status.as_u16(), 400, "{body}");
            assert_eq!(err.param.as_deref(), Some(param), "{body}");
            assert!(
                err.message.contains(&format!("`{param}`")),
                "{}",
                err.message
            );
        }
        let err = check_other_fields(&fields(json!({"echo": true}))).unwrap_err();
        assert!(err.message.contains("only false"), "{}", err.message);
    }

    #[test]
    fn the_first_refused_field_is_the_tables_first() {
        let body = json!({"vllm_xargs": {}, "audio": {}, "echo": true});
        for _ in 0..8 {
            let err = check_other_fields(&fields(body.clone())).unwrap_err();
            assert_eq!(err.param.as_deref(), Some("audio"));
        }
    }

    #[test]
    fn inert_values_null_harmless_and_unknown_fields_pass() {
        let body = json!({
            "functions": null, "use_beam_search": false, "length_penalty": 1,
            "priority": 0.0, "bad_words": [], "skip_special_tokens": true,
            "add_generation_prompt": true, "guided_decoding_backend": "llguidance",
            "store": true, "metadata": {"a": "b"}, "service_tier": "flex",
            "safety_identifier": "s", "prompt_cache_key": "k", "something_new": 1
        });
        assert!(check_other_fields(&fields(body)).is_ok());
    }

    #[test]
    fn unknown_fields_are_named_bounded() {
        assert_eq!(
            unknown_fields(&fields(json!({"store": true, "echo": false}))),
            None
        );
        assert_eq!(
            unknown_fields(&fields(json!({"b": 1, "a": 2, "store": 3}))).as_deref(),
            Some("`a`, `b`")
        );
        let mut many: HashMap<String, Value> =
            (0..20).map(|i| (format!("f{i:02}"), json!(i))).collect();
        many.insert("z".repeat(100_000), json!(0));
        let line = unknown_fields(&many).unwrap();
        assert!(line.starts_with("`f00`, `f01`"), "{line}");
        assert!(line.ends_with("and 13 more"), "{line}");
        assert!(line.len() < 200, "{line}");
        let long = fields(json!({"y".repeat(1000): 1}));
        let line = unknown_fields(&long).unwrap();
        assert_eq!(line, format!("`{}…`", "y".repeat(WARNED_CHARS)));
    }
}
