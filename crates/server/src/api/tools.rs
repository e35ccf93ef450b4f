//! Tool calls by schema, as vLLM does for a named `tool_choice`: V1.1 has no tool-call syntax
//! to detect, so a call is asked for (a named function, or `"required"`) and the answer is
//! constrained to the functions' parameter schemas, then read back as OpenAI `tool_calls`.
//!
//! The model is told about the functions in a system block ([`prompt`]); earlier calls and
//! their results in the history are rendered as text the same way; the answer is read into
//! calls by [`calls`], for the whole answer and for a stream alike.

pub mod calls;
pub mod prompt;

use super::error::{echoed, ApiError};
use super::openai::{ChatCompletionRequest, Tool, ToolChoice};
use super::structured::Constrained;
use internvl_scheduler::GrammarSpec;
use prompt::Instruction;
use serde_json::{json, Map, Value};
use std::collections::HashSet;

/// How an answer is read into calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallFormat {
    /// The whole answer is the arguments object of this one function.
    Named(String),
    /// The answer is a JSON array of `{"name": ..., "parameters": {...}}`, one per call.
    List,
}

/// What `tools`, `tool_choice` and `parallel_tool_calls` ask for.
#[derive(Debug)]
pub struct ToolPlan {
    /// The system block that describes the functions to the model.
    pub block: String,
    /// The answer's grammar and how to read it; `None` for `tool_choice: "none"` (text).
    pub calls: Option<(Constrained, CallFormat)>,
}

/// Longest function name OpenAI accepts.
const MAX_NAME: usize = 64;

/// The answer's grammar and how to read it into calls: the tools' (when a call is asked
/// for) or the request's own structured output. Both together are refused, even for
/// `tool_choice: "none"`: an answer cannot follow two grammars.
pub fn answer_grammar(
    tools: Option<ToolPlan>,
    structured: Option<Constrained>,
) -> Result<(Option<Constrained>, Option<CallFormat>), ApiError> {
    match (tools, structured) {
        (Some(_), Some(other)) => Err(ApiError::invalid(
            other.param,
            format!(
                "`{}` cannot be combined with `tools`: a tool call's arguments already follow \
                 its function's parameters schema",
                other.param
            ),
        )),
        (Some(ToolPlan { calls, .. }), None) => Ok(calls
            .map_or((None, None), |(grammar, format)| {
                (Some(grammar), Some(format))
            })),
        (None, structured) => Ok((structured, None)),
    }
}

/// A request's tool fields: a chat's, or a `/tokenize` chat's (which counts the tokens the
/// same chat would have).
#[derive(Clone, Copy, Default)]
pub struct ToolFields<'a> {
    pub tools: Option<&'a [Tool]>,
    pub tool_choice: Option<&'a ToolChoice>,
    pub parallel_tool_calls: Option<bool>,
}

impl<'a> From<&'a ChatCompletionRequest> for ToolFields<'a> {
    fn from(req: &'a ChatCompletionRequest) -> Self {
        ToolFields {
            tools: req.tools.as_deref(),
            tool_choice: req.tool_choice.as_ref(),
            parallel_tool_calls: req.parallel_tool_calls,
        }
    }
}

/// Checks the tool fields and plans the answer; `None` when there are no `tools`.
pub fn plan_tools(req: ToolFields) -> Result<Option<ToolPlan>, ApiError> {
    let Some(tools) = req.tools else {
        if req.tool_choice.is_some() {
            return Err(ApiError::invalid(
                "tool_choice",
                "tool_choice is only allowed when tools are given",
            ));
        }
        if req.parallel_tool_calls.is_some() {
            return Err(ApiError::invalid(
                "parallel_tool_calls",
                "parallel_tool_calls is only allowed when tools are given",
            ));
        }
        return Ok(None);
    };
    check_tools(tools)?;
    let parallel = req.parallel_tool_calls.unwrap_or(true);
    let (instruction, calls) = match req.tool_choice {
        None => return Err(auto("tools without tool_choice mean \"auto\"")),
        Some(ToolChoice::Mode(mode)) => match mode.as_str() {
            "auto" => return Err(auto("tool_choice \"auto\" is not supported")),
            "none" => (Instruction::None, None),
            "required" => (
                Instruction::Required { parallel },
                Some((list_schema(tools, parallel)?, CallFormat::List)),
            ),
            other => {
                return Err(ApiError::invalid(
                    "tool_choice",
                    format!(
                        "tool_choice `{}` is not one of \"none\", \"auto\", \"required\" or a \
                         named function",
                        echoed(other, 64)
                    ),
                ))
            }
        },
        Some(ToolChoice::Named(named)) => {
            if named.kind != "function" {
                return Err(ApiError::invalid(
                    "tool_choice.type",
                    format!(
                        "tool_choice type `{}` is not supported (function)",
                        echoed(&named.kind, 64)
                    ),
                ));
            }
            let name = &named.function.name;
            let tool = tools
                .iter()
                .find(|t| &t.function.name == name)
                .ok_or_else(|| {
                    ApiError::invalid(
                        "tool_choice.function.name",
                        format!(
                            "tool_choice names `{}`, which is not one of the tools",
                            echoed(name, MAX_NAME)
                        ),
                    )
                })?;
            (
                Instruction::Named(name),
                Some((parameters(tool), CallFormat::Named(name.clone()))),
            )
        }
    };
    let calls = calls.map(|(schema, format)| {
        let constrained = Constrained {
            spec: GrammarSpec::JsonSchema(schema),
            param: "tools",
        };
        (constrained, format)
    });
    Ok(Some(ToolPlan {
        block: prompt::tool_block(tools, instruction),
        calls,
    }))
}

/// The 400 for `"auto"`, said or implied: `why`, then what works instead.
fn auto(why: &str) -> ApiError {
    ApiError::invalid(
        "tool_choice",
        format!(
            "{why}: InternVL-Chat V1.1 has no tool-call format, so whether an answer is a call \
             cannot be detected. Use tool_choice \"required\" or {{\"type\": \"function\", \
             \"function\": {{\"name\": ...}}}} for a call, or \"none\" for text"
        ),
    )
}

/// Every function is of type `function`, named 1 to 64 of `a-zA-Z0-9_-`, once, and its
/// `parameters` (if any) are an object schema.
fn check_tools(tools: &[Tool]) -> Result<(), ApiError> {
    if tools.is_empty() {
        return Err(ApiError::invalid(
            "tools",
            "tools must not be empty; leave it out for an answer without tools",
        ));
    }
    let mut names = HashSet::new();
    for (i, tool) in tools.iter().enumerate() {
        if tool.kind != "function" {
            return Err(ApiError::invalid(
                &format!("tools[{i}].type"),
                format!(
                    "tool type `{}` is not supported (function)",
                    echoed(&tool.kind, 64)
                ),
            ));
        }
        let name = &tool.function.name;
        let param = format!("tools[{i}].function.name");
        let valid = (1..=MAX_NAME).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !valid {
            return Err(ApiError::invalid(
                &param,
                format!(
                    "function name `{}` must be 1 to {MAX_NAME} characters of a-z, A-Z, 0-9, _ \
                     and -",
                    echoed(name, MAX_NAME)
                ),
            ));
        }
        if !names.insert(name.as_str()) {
            return Err(ApiError::invalid(
                &param,
                format!("function name `{name}` is given twice"),
            ));
        }
        if let Some(schema) = &tool.function.parameters {
            let object = schema
                .as_object()
                .is_some_and(|s| s.get("type").is_none_or(|t| t == "object"));
            if !object {
                return Err(ApiError::invalid(
                    &format!("tools[{i}].function.parameters"),
                    "parameters must be a JSON schema of an object ({\"type\": \"object\", ...})",
                ));
            }
        }
    }
    Ok(())
}

/// A function's parameters schema, always of an object: a missing one takes no arguments.
fn parameters(tool: &Tool) -> Value {
    match &tool.function.parameters {
        None => json!({"type": "object", "properties": {}, "additionalProperties": false}),
        Some(schema) => {
            let mut schema = schema.clone();
            if let Some(map) = schema.as_object_mut() {
                map.entry("type").or_insert_with(|| json!("object"));
            }
            schema
        }
    }
}

/// `"required"`: an array of one or more calls (exactly one unless `parallel`), each an
/// object of a function's name and its parameters. `name` comes first, so that a streamed
/// call is announced before its arguments. The functions' definitions (`$defs`,
/// `definitions`) move to the root, where their `#/$defs/...` references now point; two
/// functions may not define one name differently.
fn list_schema(tools: &[Tool], parallel: bool) -> Result<Value, ApiError> {
    let mut defs: [(&str, Map<String, Value>); 2] =
        [("$defs", Map::new()), ("definitions", Map::new())];
    let mut branches = Vec::with_capacity(tools.len());
    for (i, tool) in tools.iter().enumerate() {
        let mut schema = parameters(tool);
        for (key, merged) in &mut defs {
            let Some(Value::Object(own)) = schema.as_object_mut().and_then(|s| s.remove(*key))
            else {
                continue;
            };
            for (name, def) in own {
                if merged.get(&name).is_some_and(|d| *d != def) {
                    return Err(ApiError::invalid(
                        &format!("tools[{i}].function.parameters"),
                        format!(
                            "`{key}` entry `{}` is defined differently by an earlier function; \
                             with tool_choice \"required\" all functions share one set of \
                             definitions",
                            echoed(&name, 64)
                        ),
                    ));
                }
                merged.insert(name, def);
            }
        }
        branches.push(json!({
            "type": "object",
            "properties": {"name": {"const": tool.function.name}, "parameters": schema},
            "required": ["name", "parameters"],
            "additionalProperties": false
        }));
    }
    let mut root = json!({"type": "array", "minItems": 1, "items": {"anyOf": branches}});
    if !parallel {
        root["maxItems"] = json!(1);
    }
    for (key, merged) in defs {
        if !merged.is_empty() {
            root[key] = Value::Object(merged);
        }
    }
    Ok(root)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::openai::ChatCompletionRequest;

    fn weather() -> Value {
        json!({"type": "function", "function": {
            "name": "get_weather", "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]}}})
    }

    fn time() -> Value {
        json!({"type": "function", "function": {"name": "get_time"}})
    }

    fn request(extra: Value) -> ChatCompletionRequest {
        let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        serde_json::from_value(body).unwrap()
    }

    fn plan(extra: Value) -> Result<Option<ToolPlan>, ApiError> {
        plan_tools((&request(extra)).into())
    }

    fn grammar(plan: &ToolPlan) -> (&Value, &CallFormat) {
        let (constrained, format) = plan.calls.as_ref().unwrap();
        assert_eq!(constrained.param, "tools");
        let GrammarSpec::JsonSchema(schema) = &constrained.spec else {
            panic!("not a JSON schema: {:?}", constrained.spec)
        };
        (schema, format)
    }

    #[test]
    fn a_named_function_constrains_to_its_parameters() {
        let p = plan(json!({"tools": [weather(), time()], "tool_choice":
            {"type": "function", "function": {"name": "get_weather"}}}))
        .unwrap()
        .unwrap();
        let (schema, format) = grammar(&p);
        assert_eq!(schema, &weather()["function"]["parameters"]);
        assert_eq!(format, &CallFormat::Named("get_weather".into()));

        let p = plan(json!({"tools": [time()], "tool_choice":
            {"type": "function", "function": {"name": "get_time"}}}))
        .unwrap()
        .unwrap();
        assert_eq!(
            grammar(&p).0,
            &json!({"type": "object", "properties": {}, "additionalProperties": false}),
            "no parameters: no arguments"
        );
    }

    #[test]
    fn required_is_an_array_of_calls_of_the_listed_functions() {
        let p = plan(json!({"tools": [weather(), time()], "tool_choice": "required"}))
            .unwrap()
            .unwrap();
        let (schema, format) = grammar(&p);
        assert_eq!(format, &CallFormat::List);
        assert_eq!(schema["type"], "array");
        assert_eq!(schema["minItems"], 1);
        assert!(schema.get("maxItems").is_none(), "parallel by default");
        let branches = schema["items"]["anyOf"].as_array().unwrap();
        assert_eq!(branches.len(), 2);
        assert_eq!(branches[0]["properties"]["name"]["const"], "get_weather");
        assert_eq!(
            branches[0]["properties"]["parameters"],
            weather()["function"]["parameters"]
        );
        assert_eq!(branches[1]["properties"]["name"]["const"], "get_time");
        assert_eq!(branches[1]["required"], json!(["name", "parameters"]));
        assert_eq!(branches[1]["additionalProperties"], false);

        let p = plan(json!({"tools": [weather()], "tool_choice": "required",
                            "parallel_tool_calls": false}))
        .unwrap()
        .unwrap();
        assert_eq!(grammar(&p).0["maxItems"], 1, "exactly one call");
    }

    #[test]
    fn definitions_move_to_the_root_of_a_required_schema() {
        let with_defs = |name: &str, def: Value| {
            json!({"type": "function", "function": {"name": name, "parameters": {
                "type": "object", "properties": {"at": {"$ref": "#/$defs/place"}},
                "$defs": {"place": def}}}})
        };
        let place = json!({"type": "string"});
        let p = plan(
            json!({"tools": [with_defs("a", place.clone()), with_defs("b", place)],
                            "tool_choice": "required"}),
        )
        .unwrap()
        .unwrap();
        let (schema, _) = grammar(&p);
        assert_eq!(schema["$defs"]["place"]["type"], "string");
        let branch = &schema["items"]["anyOf"][0]["properties"]["parameters"];
        assert!(branch.get("$defs").is_none());
        assert_eq!(branch["properties"]["at"]["$ref"], "#/$defs/place");

        let clash = plan(json!({"tools": [with_defs("a", json!({"type": "string"})),
                                          with_defs("b", json!({"type": "integer"}))],
                                "tool_choice": "required"}))
        .unwrap_err();
        assert_eq!(clash.param.as_deref(), Some("tools[1].function.parameters"));
    }

    #[test]
    fn none_shows_the_functions_and_constrains_nothing() {
        let p = plan(json!({"tools": [weather()], "tool_choice": "none"}))
            .unwrap()
            .unwrap();
        assert!(p.calls.is_none());
        assert!(p.block.contains("get_weather"), "{}", p.block);
        assert!(plan(json!({})).unwrap().is_none());
    }

    #[test]
    fn every_refusal_names_its_field() {
        let named = |name: &str| json!({"type": "function", "function": {"name": name}});
        let tool_with = |function: Value| json!({"type": "function", "function": function});
        let cases = [
            (json!({"tools": []}), "tools"),
            (json!({"tools": [weather()]}), "tool_choice"),
            (
                json!({"tools": [weather()], "tool_choice": "auto"}),
                "tool_choice",
            ),
            (
                json!({"tools": [weather()], "tool_choice": "sometimes"}),
                "tool_choice",
            ),
            (json!({"tool_choice": "none"}), "tool_choice"),
            (json!({"parallel_tool_calls": true}), "parallel_tool_calls"),
            (
                json!({"tools": [{"type": "retrieval", "function": {"name": "f"}}],
                       "tool_choice": "required"}),
                "tools[0].type",
            ),
            (
                json!({"tools": [weather(), named("")], "tool_choice": "required"}),
                "tools[1].function.name",
            ),
            (
                json!({"tools": [named(&"f".repeat(65))], "tool_choice": "required"}),
                "tools[0].function.name",
            ),
            (
                json!({"tools": [named("a b")], "tool_choice": "required"}),
                "tools[0].function.name",
            ),
            (
                json!({"tools": [weather(), weather()], "tool_choice": "required"}),
                "tools[1].function.name",
            ),
            (
                json!({"tools": [tool_with(json!({"name": "f", "parameters": []}))],
                       "tool_choice": "required"}),
                "tools[0].function.parameters",
            ),
            (
                json!({"tools": [tool_with(json!({"name": "f",
                                                  "parameters": {"type": "string"}}))],
                       "tool_choice": "required"}),
                "tools[0].function.parameters",
            ),
            (
                json!({"tools": [weather()], "tool_choice": named("get_time")}),
                "tool_choice.function.name",
            ),
            (
                json!({"tools": [weather()],
                       "tool_choice": {"type": "custom", "function": {"name": "get_weather"}}}),
                "tool_choice.type",
            ),
        ];
        for (extra, param) in cases {
            let err = plan(extra.clone()).unwrap_err();
            assert_eq!(err.status.as_u16(), 400, "{extra}");
            assert_eq!(
                err.param.as_deref(),
                Some(param),
                "{extra}: {}",
                err.message
            );
        }
        let auto = plan(json!({"tools": [weather()], "tool_choice": "auto"})).unwrap_err();
        assert!(
            auto.message.contains("no tool-call format") && auto.message.contains("required"),
            "{}",
            auto.message
        );
        let long = "é".repeat(10_000);
        let echoed = plan(json!({"tools": [weather()], "tool_choice": long})).unwrap_err();
        assert!(echoed.message.len() < 400, "{}", echoed.message);
    }

    #[test]
    fn structured_outputs_are_refused_beside_tools() {
        let structured = Constrained {
            spec: GrammarSpec::JsonObject,
            param: "response_format",
        };
        for choice in ["required", "none"] {
            let tools = plan(json!({"tools": [weather()], "tool_choice": choice})).unwrap();
            let err = answer_grammar(tools, Some(structured.clone())).unwrap_err();
            assert_eq!(err.param.as_deref(), Some("response_format"));
            assert!(err.message.contains("tools"), "{}", err.message);
        }
        let (grammar, format) = answer_grammar(None, Some(structured.clone())).unwrap();
        assert_eq!((grammar, format), (Some(structured), None));
        let tools = plan(json!({"tools": [weather()], "tool_choice": "required"})).unwrap();
        let (grammar, format) = answer_grammar(tools, None).unwrap();
        assert_eq!(grammar.unwrap().param, "tools");
        assert_eq!(format, Some(CallFormat::List));
    }
}
