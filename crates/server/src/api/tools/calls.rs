//! Reading a constrained answer into tool calls as it is generated, so that a stream sends
//! each call's name once and then its arguments as they come, and a whole answer is read by
//! the same code (its arguments are the very text a stream sends).
//!
//! A call's arguments are the answer's own text of its `parameters` value, not re-encoded.
//! When the answer is cut (`max_tokens`), the calls whose name was complete are kept, their
//! arguments as far as they got.

use super::super::openai::{FunctionCall, FunctionCallDelta, ToolCall, ToolCallDelta};
use super::super::request_id::random_id;
use super::CallFormat;

/// What a stream sends of a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallDelta {
    /// The call's first delta: its id and name, arguments `""`.
    Start {
        index: usize,
        id: String,
        name: String,
    },
    /// More of its arguments.
    Arguments { index: usize, fragment: String },
}

impl CallDelta {
    /// As OpenAI's `delta.tool_calls[]` entry.
    pub fn into_wire(self) -> ToolCallDelta {
        match self {
            CallDelta::Start { index, id, name } => ToolCallDelta {
                index,
                id: Some(id),
                kind: Some("function"),
                function: FunctionCallDelta {
                    name: Some(name),
                    arguments: String::new(),
                },
            },
            CallDelta::Arguments { index, fragment } => ToolCallDelta {
                index,
                id: None,
                kind: None,
                function: FunctionCallDelta {
                    name: None,
                    arguments: fragment,
                },
            },
        }
    }
}

/// One call as read so far.
#[derive(Debug)]
struct Call {
    id: String,
    name: Option<String>,
    arguments: String,
    /// Its `Start` was sent: arguments read before the name (if ever) wait until then.
    announced: bool,
}

impl Call {
    fn new(name: Option<String>) -> Call {
        Call {
            id: format!("call_{}", &random_id()[..24]),
            name,
            arguments: String::new(),
            announced: false,
        }
    }
}

/// Where the next character of a `"required"` answer goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    /// Structure: brackets, commas, colons, whitespace.
    Outside,
    /// A key of a call object, into `key`.
    Key,
    /// The call's name string, into `name`.
    Name,
    /// After `"parameters":`, before its value.
    BeforeParameters,
    /// The `parameters` value, into the call's arguments.
    Parameters,
}

/// Reads one choice's answer into calls, `feed` by `feed`.
#[derive(Debug)]
pub struct CallParser {
    format: CallFormat,
    calls: Vec<Call>,
    field: Field,
    /// JSON nesting: 1 inside the array, 2 inside a call object.
    depth: usize,
    in_string: bool,
    escaped: bool,
    /// A call object's next string is a key (not a value).
    expect_key: bool,
    key: String,
    name: String,
    /// The array has closed: the answer is complete.
    closed: bool,
}

impl CallParser {
    pub fn new(format: CallFormat) -> CallParser {
        let calls = match &format {
            CallFormat::Named(name) => vec![Call::new(Some(name.clone()))],
            CallFormat::List => Vec::new(),
        };
        CallParser {
            format,
            calls,
            field: Field::Outside,
            depth: 0,
            in_string: false,
            escaped: false,
            expect_key: false,
            key: String::new(),
            name: String::new(),
            closed: false,
        }
    }

    /// Reads `text`, the answer's next piece; returns what a stream sends of it (a named
    /// call's `Start` on the first feed, empty `text` included).
    pub fn feed(&mut self, text: &str) -> Vec<CallDelta> {
        let mut out = Vec::new();
        match self.format {
            CallFormat::Named(_) => {
                self.announce(0, &mut out);
                self.calls[0].arguments.push_str(text);
                push_fragment(&mut out, 0, text);
            }
            CallFormat::List => {
                for c in text.chars() {
                    self.step(c, &mut out);
                }
            }
        }
        out
    }

    /// Whether the answer is whole: a named call's arguments are one JSON value, a list has
    /// closed. An answer cut by `max_tokens` or a stop string is not.
    pub fn complete(&self) -> bool {
        match self.format {
            CallFormat::Named(_) => {
                serde_json::from_str::<serde_json::Value>(&self.calls[0].arguments).is_ok()
            }
            CallFormat::List => self.closed,
        }
    }

    /// The calls whose name was read, as OpenAI's `message.tool_calls`.
    pub fn into_calls(self) -> Vec<ToolCall> {
        self.calls
            .into_iter()
            .filter_map(|call| {
                Some(ToolCall {
                    id: call.id,
                    kind: "function".into(),
                    function: FunctionCall {
                        name: call.name?,
                        arguments: call.arguments,
                    },
                })
            })
            .collect()
    }

    /// Sends call `index`'s `Start`, then what was read of its arguments before its name.
    fn announce(&mut self, index: usize, out: &mut Vec<CallDelta>) {
        let call = &mut self.calls[index];
        let Some(name) = call.name.clone().filter(|_| !call.announced) else {
            return;
        };
        call.announced = true;
        out.push(CallDelta::Start {
            index,
            id: call.id.clone(),
            name,
        });
        let waiting = call.arguments.clone();
        push_fragment(out, index, &waiting);
    }

    /// One character of a `"required"` answer: `[{"name": "f", "parameters": {...}}, ...]`.
    fn step(&mut self, c: char, out: &mut Vec<CallDelta>) {
        if self.field == Field::BeforeParameters && !c.is_whitespace() {
            self.field = Field::Parameters;
        }
        let in_string = self.in_string;
        self.lex(c);
        if self.field == Field::Parameters {
            let index = self.calls.len() - 1;
            let call = &mut self.calls[index];
            call.arguments.push(c);
            if call.announced {
                push_fragment(out, index, &c.to_string());
            }
            if !self.in_string && self.depth == 2 {
                self.field = Field::Outside;
            }
            return;
        }
        if in_string {
            // Inside a string; its closing quote ends a key or the name.
            let closed = !self.in_string;
            match (self.field, closed) {
                (Field::Key, false) => self.key.push(c),
                (Field::Name, false) => self.name.push(c),
                (Field::Key, true) => {
                    self.field = Field::Outside;
                    self.expect_key = false;
                }
                (Field::Name, true) => {
                    self.field = Field::Outside;
                    let index = self.calls.len() - 1;
                    self.calls[index].name = Some(std::mem::take(&mut self.name));
                    self.announce(index, out);
                }
                _ => {}
            }
            return;
        }
        match c {
            '"' if self.depth == 2 && self.expect_key => {
                self.field = Field::Key;
                self.key.clear();
            }
            '"' if self.depth == 2 && self.key == "name" => {
                self.field = Field::Name;
                self.name.clear();
            }
            ':' if self.depth == 2 && self.key == "parameters" => {
                self.field = Field::BeforeParameters;
            }
            ',' if self.depth == 2 => self.expect_key = true,
            '{' if self.depth == 2 => {
                self.calls.push(Call::new(None));
                self.expect_key = true;
                self.key.clear();
            }
            _ if self.depth == 0 && c == ']' => self.closed = true,
            _ => {}
        }
    }

    /// Tracks strings and nesting; `depth` is after `c`, and a bracket's depth names what
    /// it opened into (`{` at depth 1 makes 2, a call object).
    fn lex(&mut self, c: char) {
        if self.in_string {
            match c {
                _ if self.escaped => self.escaped = false,
                '\\' => self.escaped = true,
                '"' => self.in_string = false,
                _ => {}
            }
            return;
        }
        match c {
            '"' => self.in_string = true,
            '[' | '{' => self.depth += 1,
            ']' | '}' => self.depth = self.depth.saturating_sub(1),
            _ => {}
        }
    }
}

/// Adds `text` to call `index`'s arguments in `out`, in the delta already there for it.
fn push_fragment(out: &mut Vec<CallDelta>, index: usize, text: &str) {
    if text.is_empty() {
        return;
    }
    if let Some(CallDelta::Arguments {
        index: last,
        fragment,
    }) = out.last_mut()
    {
        if *last == index {
            fragment.push_str(text);
            return;
        }
    }
    out.push(CallDelta::Arguments {
        index,
        fragment: text.to_string(),
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `pieces` and returns the deltas, the calls, and whether it was complete.
    fn read(format: CallFormat, pieces: &[&str]) -> (Vec<CallDelta>, Vec<ToolCall>, bool) {
        let mut parser = CallParser::new(format);
        let deltas = pieces.iter().flat_map(|p| parser.feed(p)).collect();
        let complete = parser.complete();
        (deltas, parser.into_calls(), complete)
    }

    /// The streamed deltas put back together as the SDKs do: names and arguments by index.
    fn reassemble(deltas: &[CallDelta]) -> Vec<(String, String)> {
        let mut calls: Vec<(String, String)> = Vec::new();
        for delta in deltas {
            match delta {
                CallDelta::Start { index, name, .. } => {
                    assert_eq!(*index, calls.len(), "calls start in order");
                    calls.push((name.clone(), String::new()));
                }
                CallDelta::Arguments { index, fragment } => calls[*index].1.push_str(fragment),
            }
        }
        calls
    }

    fn pairs(calls: &[ToolCall]) -> Vec<(String, String)> {
        calls
            .iter()
            .map(|c| (c.function.name.clone(), c.function.arguments.clone()))
            .collect()
    }

    #[test]
    fn a_named_answer_is_one_calls_arguments() {
        let (deltas, calls, complete) = read(
            CallFormat::Named("f".into()),
            &["", "{\"city\"", ": \"Paris\"}"],
        );
        assert!(complete);
        assert_eq!(pairs(&calls), [("f".into(), r#"{"city": "Paris"}"#.into())]);
        assert!(calls[0].id.starts_with("call_") && calls[0].id.len() == 29);
        assert!(matches!(&deltas[0], CallDelta::Start { index: 0, id, .. } if *id == calls[0].id));
        assert_eq!(reassemble(&deltas), pairs(&calls));
        assert_eq!(deltas.len(), 3, "a start, then one fragment per piece");

        let (_, cut, complete) = read(CallFormat::Named("f".into()), &["{\"city\": \"Pa"]);
        assert!(!complete, "cut by max_tokens");
        assert_eq!(cut[0].function.arguments, "{\"city\": \"Pa");
    }

    #[test]
    fn a_list_is_read_call_by_call_in_any_pieces() {
        let answer = r#"[{"name": "get_weather", "parameters": {"city": "a]\"}{b", "n": [1, {"x": {}}]}}, {"name": "get_time", "parameters": {}}]"#;
        let expected = vec![
            (
                "get_weather".to_string(),
                r#"{"city": "a]\"}{b", "n": [1, {"x": {}}]}"#.to_string(),
            ),
            ("get_time".to_string(), "{}".to_string()),
        ];
        let whole = read(CallFormat::List, &[answer]);
        assert!(whole.2);
        assert_eq!(pairs(&whole.1), expected);
        // Character by character, as tokens may split it anywhere.
        let chars: Vec<String> = answer.chars().map(String::from).collect();
        let pieces: Vec<&str> = chars.iter().map(String::as_str).collect();
        let (deltas, calls, complete) = read(CallFormat::List, &pieces);
        assert!(complete);
        assert_eq!(pairs(&calls), expected);
        assert_eq!(reassemble(&deltas), expected);
        assert_ne!(calls[0].id, calls[1].id);
    }

    #[test]
    fn arguments_before_the_name_wait_for_it() {
        let (deltas, calls, _) = read(
            CallFormat::List,
            &[r#"[{"parameters": {"a": 1}, "#, r#""name": "f"}]"#],
        );
        assert_eq!(pairs(&calls), [("f".into(), r#"{"a": 1}"#.into())]);
        assert_eq!(reassemble(&deltas), pairs(&calls));
    }

    #[test]
    fn a_cut_list_keeps_the_calls_whose_name_is_whole() {
        let (deltas, calls, complete) = read(
            CallFormat::List,
            &[r#"[{"name": "f", "parameters": {"a": 1}}, {"name": "g", "parameters": {"b"#],
        );
        assert!(!complete);
        assert_eq!(
            pairs(&calls),
            [
                ("f".into(), r#"{"a": 1}"#.into()),
                ("g".into(), r#"{"b"#.into())
            ]
        );
        assert_eq!(reassemble(&deltas), pairs(&calls));
        let (_, calls, complete) = read(CallFormat::List, &[r#"[{"name": "ge"#]);
        assert!(calls.is_empty() && !complete);
    }

    #[test]
    fn deltas_are_openai_tool_call_deltas() {
        let start = CallDelta::Start {
            index: 1,
            id: "call_x".into(),
            name: "f".into(),
        };
        assert_eq!(
            serde_json::to_value(start.into_wire()).unwrap(),
            serde_json::json!({"index": 1, "id": "call_x", "type": "function",
                               "function": {"name": "f", "arguments": ""}})
        );
        let more = CallDelta::Arguments {
            index: 1,
            fragment: "{}".into(),
        };
        assert_eq!(
            serde_json::to_value(more.into_wire()).unwrap(),
            serde_json::json!({"index": 1, "function": {"arguments": "{}"}})
        );
    }
}
