//! Structured outputs: the grammar a chat request asks for, from OpenAI's `response_format`
//! or vLLM's `structured_outputs` and `guided_*` fields.
//!
//! Only what can be told without the tokenizer is checked here (shapes, names, one source at
//! most); whether a schema, regex or grammar compiles, and within llguidance's fuel, is the
//! compiler's to say, beside the prompt's tokenization.

use super::error::{echoed, ApiError};
use super::openai::{ChatCompletionRequest, ResponseFormat, StructuredOutputs};
use internvl_scheduler::GrammarSpec;
use serde_json::Value;

/// A request's grammar, with the field it came from (for the 400 when it does not compile).
#[derive(Debug, Clone, PartialEq)]
pub struct Constrained {
    pub spec: GrammarSpec,
    pub param: &'static str,
}

/// Most characters of a client's text (a field name, serde's message) a refusal echoes.
const ECHOED_CHARS: usize = 64;

/// The grammar `req` asks for, if any. One source at most: two would have to hold at once,
/// which no grammar here can express, so the second is refused by name rather than one of
/// them silently winning.
pub fn constraint(req: &ChatCompletionRequest) -> Result<Option<Constrained>, ApiError> {
    let sources = [
        (
            "response_format",
            req.response_format
                .as_ref()
                .map(response_format)
                .transpose()?
                .flatten(),
        ),
        (
            "structured_outputs",
            req.structured_outputs
                .as_ref()
                .map(structured_outputs)
                .transpose()?,
        ),
        (
            "guided_json",
            req.guided_json
                .as_ref()
                .map(|s| schema("guided_json", s))
                .transpose()?,
        ),
        (
            "guided_regex",
            req.guided_regex
                .as_deref()
                .map(|r| regex("guided_regex", r))
                .transpose()?,
        ),
        (
            "guided_choice",
            req.guided_choice
                .as_deref()
                .map(|c| choice("guided_choice", c))
                .transpose()?,
        ),
        (
            "guided_grammar",
            req.guided_grammar
                .as_deref()
                .map(|g| lark("guided_grammar", g))
                .transpose()?,
        ),
    ];
    let mut given = sources
        .into_iter()
        .filter_map(|(param, spec)| Some(Constrained { spec: spec?, param }));
    let first = given.next();
    if let (Some(first), Some(second)) = (&first, given.next()) {
        return Err(ApiError::invalid(
            second.param,
            format!(
                "`{}` cannot be combined with `{}`: a request takes one output constraint",
                second.param, first.param
            ),
        ));
    }
    Ok(first)
}

/// OpenAI's `response_format`; `text` constrains nothing.
fn response_format(format: &ResponseFormat) -> Result<Option<GrammarSpec>, ApiError> {
    Ok(match format {
        ResponseFormat::Text => None,
        ResponseFormat::JsonObject => Some(GrammarSpec::JsonObject),
        ResponseFormat::JsonSchema { json_schema } => {
            check_schema_name(&json_schema.name)?;
            // OpenAI lets the schema out for "any JSON".
            let schema = json_schema
                .schema
                .clone()
                .unwrap_or_else(|| Value::from(serde_json::Map::new()));
            Some(GrammarSpec::JsonSchema(schema))
        }
    })
}

/// `json_schema.name` as OpenAI requires it: 1 to 64 of a-z, A-Z, 0-9, `_` and `-`.
fn check_schema_name(name: &str) -> Result<(), ApiError> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    if (1..=64).contains(&name.len()) && name.chars().all(allowed) {
        return Ok(());
    }
    Err(ApiError::invalid(
        "response_format",
        format!(
            "response_format.json_schema.name `{}` must be 1 to 64 characters of a-z, A-Z, \
             0-9, `_` and `-`",
            echoed(name, ECHOED_CHARS)
        ),
    ))
}

/// vLLM's `structured_outputs`: exactly one constraint, and none of its other settings.
fn structured_outputs(so: &StructuredOutputs) -> Result<GrammarSpec, ApiError> {
    const PARAM: &str = "structured_outputs";
    // Sorted, so that which of several is named does not depend on the map's order.
    let mut others: Vec<&String> = so
        .other
        .iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, _)| k)
        .collect();
    others.sort_unstable();
    if let Some(field) = others.first() {
        let field = echoed(field, ECHOED_CHARS);
        return Err(ApiError::invalid(
            &format!("{PARAM}.{field}"),
            format!(
                "`{PARAM}.{field}` is not supported by this server; it takes one of json, \
                 regex, choice, grammar or json_object"
            ),
        ));
    }
    let mut given = Vec::new();
    if let Some(s) = &so.json {
        given.push(("json", schema(PARAM, s)?));
    }
    if let Some(r) = &so.regex {
        given.push(("regex", regex(PARAM, r)?));
    }
    if let Some(c) = &so.choice {
        given.push(("choice", choice(PARAM, c)?));
    }
    if let Some(g) = &so.grammar {
        given.push(("grammar", lark(PARAM, g)?));
    }
    if so.json_object == Some(true) {
        given.push(("json_object", GrammarSpec::JsonObject));
    }
    match given.as_slice() {
        [] => Err(ApiError::invalid(
            PARAM,
            "structured_outputs must set one of json, regex, choice, grammar or json_object: true",
        )),
        [(_, spec)] => Ok(spec.clone()),
        [(a, _), (b, _), ..] => Err(ApiError::invalid(
            PARAM,
            format!("structured_outputs sets both `{a}` and `{b}`; it takes exactly one"),
        )),
    }
}

/// A JSON schema, given as JSON or as a string holding it (as vLLM's clients often send it).
/// Whether it is a schema at all is the compiler's to say.
fn schema(param: &str, schema: &Value) -> Result<GrammarSpec, ApiError> {
    let schema = match schema {
        Value::String(text) => serde_json::from_str(text).map_err(|e| {
            ApiError::invalid(
                param,
                format!(
                    "the schema in `{param}` is a string but not JSON: {}",
                    echoed(&e.to_string(), ECHOED_CHARS)
                ),
            )
        })?,
        other => other.clone(),
    };
    Ok(GrammarSpec::JsonSchema(schema))
}

/// A regex the whole answer must match. Empty, it would allow only the empty answer.
fn regex(param: &str, regex: &str) -> Result<GrammarSpec, ApiError> {
    if regex.is_empty() {
        return Err(ApiError::invalid(
            param,
            format!("the regex in `{param}` is empty"),
        ));
    }
    Ok(GrammarSpec::Regex(regex.to_string()))
}

fn choice(param: &str, choices: &[String]) -> Result<GrammarSpec, ApiError> {
    if choices.is_empty() {
        return Err(ApiError::invalid(
            param,
            format!("the list of choices in `{param}` is empty"),
        ));
    }
    Ok(GrammarSpec::Choice(choices.to_vec()))
}

/// A grammar in llguidance's Lark dialect.
fn lark(param: &str, grammar: &str) -> Result<GrammarSpec, ApiError> {
    if grammar.trim().is_empty() {
        return Err(ApiError::invalid(
            param,
            format!("the grammar in `{param}` is empty"),
        ));
    }
    Ok(GrammarSpec::Lark(grammar.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn with(extra: Value) -> Result<Option<Constrained>, ApiError> {
        let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        constraint(&serde_json::from_value(body).unwrap())
    }

    fn spec_of(extra: Value) -> (GrammarSpec, &'static str) {
        let c = with(extra.clone())
            .unwrap_or_else(|e| panic!("{extra}: {}", e.message))
            .unwrap_or_else(|| panic!("{extra}: no constraint"));
        (c.spec, c.param)
    }

    fn refused(extra: Value) -> ApiError {
        let err = with(extra.clone()).expect_err(&extra.to_string());
        assert_eq!(err.status.as_u16(), 400, "{extra}");
        err
    }

    #[test]
    fn no_constraint_without_a_source_or_with_text() {
        assert_eq!(with(json!({})).unwrap(), None);
        assert_eq!(
            with(json!({"response_format": {"type": "text"}})).unwrap(),
            None
        );
        let nulls = json!({"response_format": null, "structured_outputs": null,
            "guided_json": null, "guided_regex": null, "guided_choice": null,
            "guided_grammar": null});
        assert_eq!(with(nulls).unwrap(), None);
    }

    #[test]
    fn openai_response_format() {
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        let rf = json!({"type": "json_schema",
            "json_schema": {"name": "my-Schema_1", "schema": schema, "strict": true}});
        assert_eq!(
            spec_of(json!({"response_format": rf})),
            (GrammarSpec::JsonSchema(schema.clone()), "response_format")
        );
        let lax = json!({"type": "json_schema",
            "json_schema": {"name": "s", "schema": schema, "strict": false}});
        assert_eq!(
            spec_of(json!({"response_format": lax})).0,
            GrammarSpec::JsonSchema(schema)
        );
        let any = json!({"type": "json_schema", "json_schema": {"name": "s"}});
        assert_eq!(
            spec_of(json!({"response_format": any})).0,
            GrammarSpec::JsonSchema(json!({}))
        );
        assert_eq!(
            spec_of(json!({"response_format": {"type": "json_object"}})),
            (GrammarSpec::JsonObject, "response_format")
        );
    }

    #[test]
    fn schema_names_follow_openais_rule() {
        for name in [String::new(), "a b".into(), "é".into(), "x".repeat(65)] {
            let rf = json!({"type": "json_schema", "json_schema": {"name": name}});
            let err = refused(json!({"response_format": rf}));
            assert_eq!(err.param.as_deref(), Some("response_format"));
            assert!(err.message.contains("1 to 64"), "{}", err.message);
        }
        let rf = json!({"type": "json_schema", "json_schema": {"name": "x".repeat(64)}});
        assert!(with(json!({"response_format": rf})).is_ok());
        let rf = json!({"type": "json_schema", "json_schema": {"name": "y".repeat(10_000)}});
        assert!(refused(json!({"response_format": rf})).message.len() < 300);
    }

    #[test]
    fn vllm_structured_outputs() {
        let so = |v: Value| spec_of(json!({"structured_outputs": v}));
        let schema = json!({"type": "string"});
        assert_eq!(
            so(json!({"json": schema})),
            (
                GrammarSpec::JsonSchema(schema.clone()),
                "structured_outputs"
            )
        );
        assert_eq!(
            so(json!({"json": schema.to_string()})).0,
            GrammarSpec::JsonSchema(schema)
        );
        assert_eq!(
            so(json!({"json": true})).0,
            GrammarSpec::JsonSchema(json!(true))
        );
        assert_eq!(
            so(json!({"regex": "a+"})).0,
            GrammarSpec::Regex("a+".into())
        );
        assert_eq!(
            so(json!({"choice": ["x", "y"]})).0,
            GrammarSpec::Choice(vec!["x".into(), "y".into()])
        );
        assert_eq!(
            so(json!({"grammar": "start: \"a\""})).0,
            GrammarSpec::Lark("start: \"a\"".into())
        );
        assert_eq!(so(json!({"json_object": true})).0, GrammarSpec::JsonObject);
        assert_eq!(
            so(json!({"regex": "a", "json": null, "json_object": false, "whitespace_pattern": null}))
                .0,
            GrammarSpec::Regex("a".into()),
            "null and false set nothing"
        );
    }

    #[test]
    fn structured_outputs_takes_exactly_one_and_nothing_else() {
        for v in [
            json!({}),
            json!({"json_object": false}),
            json!({"json": null}),
        ] {
            let err = refused(json!({"structured_outputs": v}));
            assert_eq!(err.param.as_deref(), Some("structured_outputs"));
            assert!(err.message.contains("one of"), "{}", err.message);
        }
        let err = refused(json!({"structured_outputs": {"regex": "a", "choice": ["b"]}}));
        assert_eq!(err.param.as_deref(), Some("structured_outputs"));
        assert!(
            err.message.contains("`regex` and `choice`"),
            "{}",
            err.message
        );
        for field in [
            "structural_tag",
            "whitespace_pattern",
            "disable_any_whitespace",
            "disable_additional_properties",
            "disable_fallback",
            "backend",
        ] {
            let err = refused(json!({"structured_outputs": {"regex": "a", field: true}}));
            let param = format!("structured_outputs.{field}");
            assert_eq!(err.param.as_deref(), Some(param.as_str()));
            assert!(err.message.contains(&param), "{}", err.message);
        }
        let long = "k".repeat(10_000);
        let err = refused(json!({"structured_outputs": {"regex": "a", long: 1}}));
        assert!(err.param.unwrap().len() < 100);
        assert!(err.message.len() < 300);
    }

    #[test]
    fn vllm_guided_fields() {
        let schema = json!({"type": "object"});
        assert_eq!(
            spec_of(json!({"guided_json": schema})),
            (GrammarSpec::JsonSchema(schema.clone()), "guided_json")
        );
        assert_eq!(
            spec_of(json!({"guided_json": schema.to_string()})).0,
            GrammarSpec::JsonSchema(schema)
        );
        assert_eq!(
            spec_of(json!({"guided_regex": "[a-z]+"})),
            (GrammarSpec::Regex("[a-z]+".into()), "guided_regex")
        );
        assert_eq!(
            spec_of(json!({"guided_choice": ["a"]})),
            (GrammarSpec::Choice(vec!["a".into()]), "guided_choice")
        );
        assert_eq!(
            spec_of(json!({"guided_grammar": "start: \"a\""})),
            (GrammarSpec::Lark("start: \"a\"".into()), "guided_grammar")
        );
    }

    #[test]
    fn empty_and_unparsable_constraints_name_their_field() {
        let cases = [
            (json!({"guided_choice": []}), "guided_choice", "empty"),
            (json!({"guided_regex": ""}), "guided_regex", "empty"),
            (json!({"guided_grammar": " \n"}), "guided_grammar", "empty"),
            (
                json!({"guided_json": "{\"type\": "}),
                "guided_json",
                "not JSON",
            ),
            (
                json!({"structured_outputs": {"choice": []}}),
                "structured_outputs",
                "empty",
            ),
            (
                json!({"structured_outputs": {"regex": ""}}),
                "structured_outputs",
                "empty",
            ),
            (
                json!({"structured_outputs": {"grammar": ""}}),
                "structured_outputs",
                "empty",
            ),
            (
                json!({"structured_outputs": {"json": "not json"}}),
                "structured_outputs",
                "not JSON",
            ),
        ];
        for (extra, param, says) in cases {
            let err = refused(extra.clone());
            assert_eq!(err.param.as_deref(), Some(param), "{extra}");
            assert!(err.message.contains(says), "{extra}: {}", err.message);
        }
        let huge = format!("{{\"type\": \"{}", "x".repeat(100_000));
        assert!(refused(json!({"guided_json": huge})).message.len() < 300);
    }

    #[test]
    fn two_sources_refuse_the_second() {
        let rf = json!({"type": "json_schema", "json_schema": {"name": "s"}});
        let cases = [
            (
                json!({"response_format": rf, "guided_regex": "a"}),
                "guided_regex",
            ),
            (
                json!({"response_format": {"type": "json_object"},
                    "structured_outputs": {"regex": "a"}}),
                "structured_outputs",
            ),
            (
                json!({"structured_outputs": {"regex": "a"}, "guided_json": {}}),
                "guided_json",
            ),
            (
                json!({"guided_json": {}, "guided_choice": ["a"]}),
                "guided_choice",
            ),
            (
                json!({"guided_choice": ["a"], "guided_grammar": "start: \"a\""}),
                "guided_grammar",
            ),
        ];
        for (extra, second) in cases {
            let err = refused(extra.clone());
            assert_eq!(err.param.as_deref(), Some(second), "{extra}");
            assert!(
                err.message.contains("cannot be combined"),
                "{}",
                err.message
            );
        }
        // `text` is no constraint, so nothing to combine with.
        let text = json!({"response_format": {"type": "text"}, "guided_regex": "a"});
        assert_eq!(spec_of(text).1, "guided_regex");
    }
}
