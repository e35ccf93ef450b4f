//! The text the model sees of tools: the system block that lists the functions and says what
//! to answer, and the history's calls and results. V1.1's template has no tool syntax, so
//! these are plain text; README's "Tool calls" section shows them exactly.
//!
//! JSON is written as the constrained answers are, `, ` and `: ` between items and no other
//! whitespace, so that earlier calls in the history read like the model's own.

use super::super::openai::{Tool, ToolCall};
use serde::Serialize;
use serde_json::{json, Map, Value};
use std::io;

/// The line of the block that says what to answer now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Instruction<'a> {
    Named(&'a str),
    Required { parallel: bool },
    None,
}

/// The system block: each function as one JSON line (name, description, parameters), how a
/// call is written, and `instruction`.
pub fn tool_block(tools: &[Tool], instruction: Instruction) -> String {
    let mut block = String::from(
        "You can call these functions, each given as JSON with its name, description and the \
         JSON schema of its parameters:\n",
    );
    for tool in tools {
        let mut entry = Map::new();
        entry.insert("name".into(), json!(tool.function.name));
        if let Some(description) = &tool.function.description {
            entry.insert("description".into(), json!(description));
        }
        let parameters = tool
            .function
            .parameters
            .clone()
            .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
        entry.insert("parameters".into(), parameters);
        block.push_str(&spaced_json(&Value::Object(entry)));
        block.push('\n');
    }
    block.push_str(
        "A call is written as {\"name\": <function name>, \"parameters\": <its arguments as a \
         JSON object>}.\n",
    );
    block.push_str(&match instruction {
        Instruction::Named(name) => {
            format!("Now call {name}: answer with only its arguments, as a JSON object.")
        }
        Instruction::Required { parallel: true } => "Now call one or more of these functions: \
             answer with only a JSON array of calls."
            .to_string(),
        Instruction::Required { parallel: false } => "Now call exactly one of these functions: \
             answer with only a JSON array holding that one call."
            .to_string(),
        Instruction::None => "Now answer in plain text, without calling a function.".to_string(),
    });
    block
}

/// An assistant message's text: its content (if any), then its calls as the JSON array a
/// `"required"` answer is. Arguments that are not JSON are shown as a JSON string.
pub fn render_calls(content: &str, calls: &[ToolCall]) -> String {
    let calls: Vec<Value> = calls
        .iter()
        .map(|call| {
            let arguments = serde_json::from_str(&call.function.arguments)
                .unwrap_or_else(|_| json!(call.function.arguments));
            let mut entry = Map::new();
            entry.insert("name".into(), json!(call.function.name));
            entry.insert("parameters".into(), arguments);
            Value::Object(entry)
        })
        .collect();
    let calls = spaced_json(&Value::Array(calls));
    if content.is_empty() {
        calls
    } else {
        format!("{content}\n{calls}")
    }
}

/// A `tool` message's text, a user-side block: which call (and function, when known) it is
/// the result of, then the result.
pub fn render_result(call_id: &str, function: Option<&str>, content: &str) -> String {
    match function {
        Some(name) => format!("Result of call {call_id} ({name}):\n{content}"),
        None => format!("Result of call {call_id}:\n{content}"),
    }
}

/// `value` as JSON with `, ` and `: ` separators, as the grammar writes answers.
pub fn spaced_json(value: &Value) -> String {
    let mut out = Vec::new();
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, Spaced);
    // A `Value` into a `Vec` cannot fail: its keys are strings and a `Vec` takes every write.
    if value.serialize(&mut serializer).is_err() {
        return String::new();
    }
    String::from_utf8(out).unwrap_or_default()
}

/// serde_json's compact output with a space after each `,` and `:`.
struct Spaced;

impl serde_json::ser::Formatter for Spaced {
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        self.begin_array_value(w, first)
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::openai::FunctionCall;

    fn tools() -> Vec<Tool> {
        serde_json::from_value(json!([
            {"type": "function", "function": {"name": "get_weather",
             "description": "The weather in a city",
             "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                            "required": ["city"]}}},
            {"type": "function", "function": {"name": "get_time"}}
        ]))
        .unwrap()
    }

    #[test]
    fn the_block_lists_every_function_and_says_what_to_answer() {
        let head = "You can call these functions, each given as JSON with its name, description \
                    and the JSON schema of its parameters:\n\
                    {\"name\": \"get_weather\", \"description\": \"The weather in a city\", \
                    \"parameters\": {\"type\": \"object\", \"properties\": {\"city\": \
                    {\"type\": \"string\"}}, \"required\": [\"city\"]}}\n\
                    {\"name\": \"get_time\", \"parameters\": {\"type\": \"object\", \
                    \"properties\": {}}}\n\
                    A call is written as {\"name\": <function name>, \"parameters\": <its \
                    arguments as a JSON object>}.\n";
        let cases = [
            (
                Instruction::Named("get_time"),
                "Now call get_time: answer with only its arguments, as a JSON object.",
            ),
            (
                Instruction::Required { parallel: true },
                "Now call one or more of these functions: answer with only a JSON array of \
                 calls.",
            ),
            (
                Instruction::Required { parallel: false },
                "Now call exactly one of these functions: answer with only a JSON array \
                 holding that one call.",
            ),
            (
                Instruction::None,
                "Now answer in plain text, without calling a function.",
            ),
        ];
        for (instruction, last) in cases {
            assert_eq!(tool_block(&tools(), instruction), format!("{head}{last}"));
        }
    }

    #[test]
    fn history_calls_and_results_are_text() {
        let call = |name: &str, arguments: &str| ToolCall {
            id: "call_1".into(),
            kind: "function".into(),
            function: FunctionCall {
                name: name.into(),
                arguments: arguments.into(),
            },
        };
        let calls = [
            call("get_weather", r#"{"city":"Paris"}"#),
            call("get_time", "not json"),
        ];
        assert_eq!(
            render_calls("", &calls),
            r#"[{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "get_time", "parameters": "not json"}]"#
        );
        assert_eq!(
            render_calls("Let me look.", &calls[..1]),
            "Let me look.\n[{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}]"
        );
        assert_eq!(
            render_result("call_1", Some("get_weather"), "sunny"),
            "Result of call call_1 (get_weather):\nsunny"
        );
        assert_eq!(
            render_result("call_2", None, "12:00"),
            "Result of call call_2:\n12:00"
        );
    }

    #[test]
    fn json_is_spaced_as_the_grammar_writes_it() {
        let value = json!({"a": [1, {"b": "c, d: e"}], "f": {}, "g": []});
        assert_eq!(
            spaced_json(&value),
            r#"{"a": [1, {"b": "c, d: e"}], "f": {}, "g": []}"#
        );
    }
}
