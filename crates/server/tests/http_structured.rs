//! Structured outputs over HTTP on the demo checkpoint, judged by checkers that share nothing
//! with llguidance: OpenAI's `response_format` (`json_schema` answers validate with the
//! `jsonschema` crate and are laid out compactly, `json_object` answers are objects); vLLM's
//! `structured_outputs` and `guided_*` fields with a schema, a regex (matched whole with the
//! `regex` crate), a choice and a Lark grammar (recognized by hand); schemas, regexes and
//! grammars that do not compile, two sources in one request and a bad `json_schema.name` are
//! 400s whose `param` names the field; a hostile schema is refused within seconds while a plain
//! chat beside it gets exactly its tokens alone; a streamed answer is the whole one, and `n: 2`
//! gives two valid answers; under a grammar, `logprobs` report only tokens the grammar allows,
//! the sampled one first at temperature 0, all the constrained distribution's mass when fewer
//! than asked for are allowed, one entry per completion token; choice lists of tens of
//! thousands of labels are answered; and grammars past llguidance's limits are 400s in plain
//! words, never 500s or backtraces, whether found at compile time or while generating.
//!
//! The demo's random weights never write JSON by themselves and free strings may not end, so
//! the schemas here are bounded (enums, integer ranges, short strings, closed objects): every
//! answer can finish within `max_tokens`, and does, with `stop`.

mod common;

use common::{json_body, read_rest, sse_data, Server, Wait, MODEL};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

async fn start() -> Server {
    Server::spawn_and_wait(common::demo_args(), reqwest::Client::new(), Wait::Healthy).await
}

/// A greedy chat with room for every bounded answer here, with `extra`'s fields.
fn chat(extra: Value) -> Value {
    let mut body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Describe a person as JSON."}],
        "max_tokens": 200,
        "temperature": 0
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

async fn post(s: &Server, body: &Value) -> (u16, Value) {
    let r = s.send("/v1/chat/completions", body).await;
    let status = r.status().as_u16();
    (status, json_body(r).await)
}

/// The first choice's content of a 200 that finished with `stop`.
fn stopped_content(status: u16, body: &Value) -> String {
    assert_eq!(status, 200, "{body}");
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "stop", "{body}");
    choice["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no content: {body}"))
        .to_string()
}

/// A schema every field of which is bounded.
fn person() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "color": {"enum": ["red", "green", "blue"]},
            "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}
        },
        "required": ["name", "age", "color", "tags"],
        "additionalProperties": false
    })
}

fn json_schema_format(schema: Value) -> Value {
    json!({"type": "json_schema",
           "json_schema": {"name": "person", "strict": true, "schema": schema}})
}

/// `text` as JSON valid against `schema`, by the `jsonschema` crate.
fn check_schema(schema: &Value, text: &str) -> Value {
    let value: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    let validator = jsonschema::validator_for(schema).unwrap();
    if let Err(e) = validator.validate(&value) {
        panic!("{text:?} does not follow the schema: {e}");
    }
    value
}

/// The server's JSON layout: outside strings, exactly one space after each `:` and `,`, and
/// no other whitespace.
fn check_compact(text: &str) {
    let (mut in_string, mut escaped) = (false, false);
    let chars: Vec<char> = text.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            ':' | ',' => assert!(
                chars.get(i + 1) == Some(&' ')
                    && !chars.get(i + 2).is_some_and(|c| c.is_whitespace()),
                "one space after {c:?} at {i}: {text:?}"
            ),
            c if c.is_whitespace() => assert!(
                c == ' ' && i > 0 && matches!(chars[i - 1], ':' | ','),
                "whitespace at {i} not after `:` or `,`: {text:?}"
            ),
            _ => {}
        }
    }
    assert!(!in_string, "an unclosed string: {text:?}");
}

#[tokio::test]
async fn response_format_json_schema_and_json_object_are_followed() {
    let s = start().await;
    let schema = person();
    let (status, body) = post(
        &s,
        &chat(json!({"response_format": json_schema_format(schema.clone())})),
    )
    .await;
    let text = stopped_content(status, &body);
    let value = check_schema(&schema, &text);
    assert_eq!(value.as_object().unwrap().len(), 4, "{text}");
    check_compact(&text);
    // The schema's `strict: false` changes nothing: the answer still follows it.
    let mut lax = json_schema_format(schema.clone());
    lax["json_schema"]["strict"] = json!(false);
    let (status, body) = post(&s, &chat(json!({"response_format": lax}))).await;
    check_schema(&schema, &stopped_content(status, &body));

    let (status, body) = post(
        &s,
        &chat(json!({"response_format": {"type": "json_object"}})),
    )
    .await;
    let text = stopped_content(status, &body);
    let value: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    assert!(value.is_object(), "{text}");
    check_compact(&text);
    // `text` constrains nothing: the demo's free answer is not JSON.
    let (status, body) = post(&s, &chat(json!({"response_format": {"type": "text"}}))).await;
    assert_eq!(status, 200, "{body}");
    let free = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(serde_json::from_str::<Value>(free).is_err(), "{free}");
}

/// A tiny Lark grammar: `hi` or `hello`, a space, then one to five lowercase letters.
const LARK: &str = "start: greeting \" \" name\ngreeting: \"hi\" | \"hello\"\nname: /[a-z]{1,5}/\n";

/// Whether `text` is a sentence of [`LARK`], recognized by hand.
fn is_lark_sentence(text: &str) -> bool {
    let Some((greeting, name)) = text.split_once(' ') else {
        return false;
    };
    ["hi", "hello"].contains(&greeting)
        && (1..=5).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase())
}

const REGEX: &str = "[a-z]{2,6}-[0-9]{1,3}";
const CHOICES: [&str; 3] = ["alpha", "beta", "gamma"];

#[tokio::test]
async fn vllm_structured_outputs_and_guided_fields_are_followed() {
    let s = start().await;
    let schema = person();
    let whole = regex::Regex::new(&format!("^(?:{REGEX})$")).unwrap();
    // Each kind through `structured_outputs` and through its `guided_*` field; the schema of
    // `guided_json` as a string, as vLLM's clients often send it.
    let cases = [
        (json!({"structured_outputs": {"json": schema}}), "json"),
        (json!({"guided_json": schema.to_string()}), "json"),
        (json!({"structured_outputs": {"regex": REGEX}}), "regex"),
        (json!({"guided_regex": REGEX}), "regex"),
        (json!({"structured_outputs": {"choice": CHOICES}}), "choice"),
        (json!({"guided_choice": CHOICES}), "choice"),
        (json!({"structured_outputs": {"grammar": LARK}}), "grammar"),
        (json!({"guided_grammar": LARK}), "grammar"),
        (
            json!({"structured_outputs": {"json_object": true}}),
            "json_object",
        ),
    ];
    for (extra, kind) in cases {
        let (status, body) = post(&s, &chat(extra.clone())).await;
        let text = stopped_content(status, &body);
        match kind {
            "json" => {
                check_schema(&schema, &text);
                check_compact(&text);
            }
            "regex" => assert!(whole.is_match(&text), "{extra}: {text:?}"),
            "choice" => assert!(CHOICES.contains(&text.as_str()), "{extra}: {text:?}"),
            "grammar" => assert!(is_lark_sentence(&text), "{extra}: {text:?}"),
            _ => {
                let value: Value = serde_json::from_str(&text).unwrap();
                assert!(value.is_object(), "{extra}: {text:?}");
            }
        }
    }
}

/// A 400 of OpenAI's shape naming `param`, whose message includes `says`; its message.
fn refused(status: u16, body: &Value, param: &str, says: &str) -> String {
    assert_eq!(status, 400, "{body}");
    let error = &body["error"];
    assert_eq!(error["type"], "invalid_request_error", "{body}");
    assert_eq!(error["param"], param, "{body}");
    assert!(error["code"].is_null(), "{body}");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains(says), "{param}: {message}");
    // Plain words: neither llguidance's internals nor a wall of text.
    for internal in ["panic", "backtrace", "non-verbose", "Parser Error"] {
        assert!(!message.contains(internal), "{param}: {message}");
    }
    assert!(message.len() < 600, "{param}: {} bytes", message.len());
    message.to_string()
}

#[tokio::test]
async fn constraints_that_do_not_compile_are_400s_naming_their_field() {
    let s = start().await;
    let bad_schema = json!({"type": "nonsense"});
    let cases = [
        (
            json!({"response_format": json_schema_format(bad_schema.clone())}),
            "response_format",
            "nonsense",
        ),
        (
            json!({"structured_outputs": {"json": bad_schema}}),
            "structured_outputs",
            "nonsense",
        ),
        (
            json!({"guided_json": bad_schema}),
            "guided_json",
            "nonsense",
        ),
        (
            json!({"guided_json": {"type": "integer", "minimum": 5, "maximum": 2}}),
            "guided_json",
            "minimum",
        ),
        (
            json!({"guided_json": {"$ref": "#/$defs/missing"}}),
            "guided_json",
            "missing",
        ),
        (
            json!({"structured_outputs": {"regex": "(unclosed"}}),
            "structured_outputs",
            "unclosed group",
        ),
        (
            json!({"guided_regex": "(unclosed"}),
            "guided_regex",
            "unclosed group",
        ),
        (
            json!({"guided_regex": "[z-a]"}),
            "guided_regex",
            "invalid character class range",
        ),
        (
            json!({"structured_outputs": {"grammar": "start: foo"}}),
            "structured_outputs",
            "unknown name",
        ),
        (
            json!({"guided_grammar": "start: \"a\" undefined_rule"}),
            "guided_grammar",
            "undefined_rule",
        ),
    ];
    for (extra, param, says) in cases {
        let (status, body) = post(&s, &chat(extra.clone())).await;
        let message = refused(status, &body, param, says);
        assert!(
            message.starts_with(&format!("Invalid {param}: ")),
            "{extra}: {message}"
        );
    }
    // The server is unharmed: a constrained answer right after.
    let (status, body) = post(&s, &chat(json!({"guided_choice": CHOICES}))).await;
    assert!(CHOICES.contains(&stopped_content(status, &body).as_str()));
}

#[tokio::test]
async fn two_sources_and_bad_schema_names_are_refused() {
    let s = start().await;
    let rf = json_schema_format(person());
    let two = [
        (
            json!({"response_format": {"type": "json_object"}, "guided_choice": CHOICES}),
            "guided_choice",
        ),
        (
            json!({"response_format": rf, "structured_outputs": {"regex": REGEX}}),
            "structured_outputs",
        ),
        (
            json!({"structured_outputs": {"choice": CHOICES}, "guided_regex": REGEX}),
            "guided_regex",
        ),
        (
            json!({"guided_json": person(), "guided_grammar": LARK}),
            "guided_grammar",
        ),
    ];
    for (extra, second) in two {
        let (status, body) = post(&s, &chat(extra)).await;
        refused(status, &body, second, "cannot be combined");
    }
    let (status, body) = post(
        &s,
        &chat(json!({"structured_outputs": {"regex": REGEX, "choice": CHOICES}})),
    )
    .await;
    refused(status, &body, "structured_outputs", "`regex` and `choice`");

    for name in [json!("has space"), json!(""), json!("x".repeat(65))] {
        let mut rf = json_schema_format(person());
        rf["json_schema"]["name"] = name;
        let (status, body) = post(&s, &chat(json!({"response_format": rf}))).await;
        refused(status, &body, "response_format", "1 to 64");
    }
    let mut unnamed = json_schema_format(person());
    unnamed["json_schema"]
        .as_object_mut()
        .unwrap()
        .remove("name");
    let (status, body) = post(&s, &chat(json!({"response_format": unnamed}))).await;
    refused(status, &body, "response_format", "missing field `name`");
}

/// `allOf` of `anyOf`s: llguidance would compile each of the 10^6 combinations of branches.
fn combinatorial_schema() -> Value {
    let branches = |k: usize| {
        let one = |i: usize| {
            json!({"type": "object", "properties": {format!("p{i}"): {"type": "integer"}},
                   "required": [format!("p{i}")]})
        };
        json!({"anyOf": (0..k).map(one).collect::<Vec<_>>()})
    };
    json!({"allOf": (0..6).map(|_| branches(10)).collect::<Vec<_>>()})
}

/// Generous for a debug build on two busy cores: measured, tens of milliseconds for the
/// combinations and under half a second for the enum with optimised dependencies.
const HOSTILE_BOUND: Duration = Duration::from_secs(10);

/// For the grammar too large to compile, which llguidance works on until its own limit trips:
/// measured about 6 s alone on two cores, and 12.4 s beside this file's other tests on a host
/// with 10-30 % of its CPU stolen. Still a bound: it fails if the refusal ever hangs.
const HUGE_GRAMMAR_BOUND: Duration = Duration::from_secs(30);

#[tokio::test]
async fn a_hostile_schema_is_refused_quickly_while_a_plain_chat_runs() {
    let s = start().await;
    let plain = chat(
        json!({"messages": [{"role": "user", "content": "Tell me a story."}],
                            "max_tokens": 1000}),
    );
    let (status, alone) = post(&s, &plain).await;
    assert_eq!(status, 200, "{alone}");
    let expected = alone["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let expected_finish = alone["choices"][0]["finish_reason"].clone();
    assert!(
        alone["usage"]["completion_tokens"].as_u64().unwrap() > 100,
        "long enough to run beside the hostile requests: {alone}"
    );

    let mut streamed = plain.clone();
    streamed["stream"] = json!(true);
    let mut r = s.send("/v1/chat/completions", &streamed).await;
    assert_eq!(r.status(), 200);
    // The plain answer has started when the hostile requests come.
    let mut text = String::from_utf8_lossy(&r.chunk().await.unwrap().unwrap()).into_owned();
    let beside = async {
        read_rest(&mut r, &mut text).await;
        (text, Instant::now())
    };
    let enum_values: Vec<String> = (0..100_000).map(|i| format!("v{i}")).collect();
    let hostile = async {
        let mut answers = Vec::new();
        for (extra, says) in [
            (
                json!({"guided_json": combinatorial_schema()}),
                "schema too large",
            ),
            (
                json!({"response_format": json_schema_format(json!({"enum": enum_values}))}),
                "too big",
            ),
        ] {
            let started = Instant::now();
            let (status, body) = post(&s, &chat(extra.clone())).await;
            answers.push((extra, says, started, Instant::now(), status, body));
        }
        answers
    };
    let ((text, plain_done), answers) = tokio::join!(beside, hostile);
    for (extra, says, started, answered, status, body) in &answers {
        let param = extra.as_object().unwrap().keys().next().unwrap().clone();
        refused(*status, body, &param, says);
        let took = *answered - *started;
        assert!(took < HOSTILE_BOUND, "{param}: answered in {took:?}");
    }
    // Tens of milliseconds against the plain answer's hundreds: refused while it ran.
    assert!(
        answers[0].3 < plain_done,
        "the first hostile request was answered after the plain chat ended"
    );
    let events: Vec<&str> = sse_data(&text).collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{text}");
    let mut content = String::new();
    let mut finish = Value::Null;
    for event in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(event).unwrap();
        assert!(chunk.get("error").is_none(), "{chunk}");
        let choice = &chunk["choices"][0];
        content.push_str(choice["delta"]["content"].as_str().unwrap_or(""));
        if !choice["finish_reason"].is_null() {
            finish = choice["finish_reason"].clone();
        }
    }
    assert_eq!(content, expected, "the plain chat's tokens, as alone");
    assert_eq!(finish, expected_finish);
}

/// The content and finish reason of a streamed answer (one choice).
async fn streamed(s: &Server, body: &Value) -> (String, Value) {
    let mut body = body.clone();
    body["stream"] = json!(true);
    let mut r = s.send("/v1/chat/completions", &body).await;
    assert_eq!(r.status(), 200);
    let mut text = String::new();
    read_rest(&mut r, &mut text).await;
    let events: Vec<&str> = sse_data(&text).collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{text}");
    let mut content = String::new();
    let mut finish = Value::Null;
    for event in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(event).unwrap();
        let choice = &chunk["choices"][0];
        assert_eq!(choice["index"], 0, "{chunk}");
        content.push_str(choice["delta"]["content"].as_str().unwrap_or(""));
        if !choice["finish_reason"].is_null() {
            assert!(finish.is_null(), "one finish_reason: {text}");
            finish = choice["finish_reason"].clone();
        }
    }
    (content, finish)
}

#[tokio::test]
async fn a_streamed_answer_is_the_whole_one_and_n_2_gives_two_valid_answers() {
    let s = start().await;
    let schema = person();
    let cases = [
        (
            chat(json!({"response_format": json_schema_format(schema.clone())})),
            "stop",
        ),
        // Cut by max_tokens: the same prefix, not yet JSON, and `length` both ways.
        (
            chat(json!({"response_format": json_schema_format(schema.clone()), "max_tokens": 5})),
            "length",
        ),
        (chat(json!({"guided_grammar": LARK})), "stop"),
    ];
    for (body, reason) in cases {
        let (status, whole) = post(&s, &body).await;
        assert_eq!(status, 200, "{whole}");
        let expected = whole["choices"][0]["message"]["content"].as_str().unwrap();
        assert_eq!(whole["choices"][0]["finish_reason"], reason, "{whole}");
        let (content, finish) = streamed(&s, &body).await;
        assert_eq!(content, expected, "{body}");
        assert_eq!(finish, reason, "{body}");
        if reason == "length" {
            assert!(
                serde_json::from_str::<Value>(&content).is_err(),
                "cut: {content}"
            );
        } else {
            assert!(!content.is_empty());
        }
    }

    let (status, body) = post(
        &s,
        &chat(
            json!({"response_format": json_schema_format(schema.clone()), "n": 2,
                     "temperature": 1, "seed": 11}),
        ),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let choices = body["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2, "{body}");
    for (i, choice) in choices.iter().enumerate() {
        assert_eq!(choice["index"], i);
        assert_eq!(choice["finish_reason"], "stop", "{body}");
        let text = choice["message"]["content"].as_str().unwrap();
        check_schema(&schema, text);
        check_compact(text);
    }
}

/// Every answer a finite JSON schema allows: 2 colors × 10 digits, in either key order.
fn finite_language() -> (Value, Vec<String>) {
    let schema = json!({
        "type": "object",
        "properties": {"c": {"enum": ["red", "green"]},
                       "n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["c", "n"],
        "additionalProperties": false
    });
    let mut sentences = Vec::new();
    for c in ["red", "green"] {
        for n in 0..10 {
            sentences.push(format!("{{\"c\": \"{c}\", \"n\": {n}}}"));
            sentences.push(format!("{{\"n\": {n}, \"c\": \"{c}\"}}"));
        }
    }
    (schema, sentences)
}

#[tokio::test]
async fn logprobs_under_a_grammar_report_only_allowed_tokens() {
    let s = start().await;
    let (schema, sentences) = finite_language();
    let choices: Vec<String> = CHOICES.iter().map(|c| c.to_string()).collect();
    for (extra, language) in [
        (json!({"guided_choice": CHOICES}), choices),
        (json!({"guided_json": schema.clone()}), sentences),
    ] {
        let mut body = chat(extra.clone());
        body["logprobs"] = json!(true);
        body["top_logprobs"] = json!(3);
        let (status, whole) = post(&s, &body).await;
        let text = stopped_content(status, &whole);
        assert!(language.contains(&text), "{extra}: {text:?}");
        let entries = whole["choices"][0]["logprobs"]["content"]
            .as_array()
            .unwrap_or_else(|| panic!("no logprobs: {whole}"));
        assert_eq!(
            entries.len() as u64,
            whole["usage"]["completion_tokens"].as_u64().unwrap(),
            "one entry per completion token: {whole}"
        );
        let is_prefix = |bytes: &[u8]| language.iter().any(|s| s.as_bytes().starts_with(bytes));
        let is_sentence = |bytes: &[u8]| language.iter().any(|s| s.as_bytes() == bytes);
        let mut so_far: Vec<u8> = Vec::new();
        for entry in entries {
            let top = entry["top_logprobs"].as_array().unwrap();
            assert!(!top.is_empty() && top.len() <= 3, "{entry}");
            // Greedy: the sampled token is the most likely of the allowed ones.
            assert_eq!(top[0]["token"], entry["token"], "{entry}");
            assert_eq!(top[0]["logprob"], entry["logprob"], "{entry}");
            let mut last = f64::INFINITY;
            let mut mass = 0.0;
            for t in top {
                let logprob = t["logprob"].as_f64().unwrap_or_else(|| panic!("{entry}"));
                assert!(logprob <= last && logprob <= 0.0, "{entry}");
                last = logprob;
                mass += logprob.exp();
                let bytes: Vec<u8> = t["bytes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|b| b.as_u64().unwrap() as u8)
                    .collect();
                let allowed = if t["token"] == "</s>" {
                    is_sentence(&so_far)
                } else {
                    is_prefix(&[so_far.as_slice(), &bytes].concat())
                };
                assert!(
                    allowed,
                    "{extra}: after {:?}, {t} is not allowed",
                    String::from_utf8_lossy(&so_far)
                );
            }
            assert!(mass <= 1.0 + 1e-4, "{entry}");
            // Fewer than asked for: these are all the grammar allows, and the logprobs are
            // of the constrained distribution, so they hold all of its mass.
            if top.len() < 3 {
                assert!((mass - 1.0).abs() < 1e-3, "{extra}: {entry}");
            }
            if entry["token"] != "</s>" {
                so_far.extend(
                    entry["bytes"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|b| b.as_u64().unwrap() as u8),
                );
            }
        }
        assert_eq!(so_far, text.as_bytes(), "{extra}");
    }
}

/// `v0`, `v1`, ... `n` choices.
fn many(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("v{i}")).collect()
}

/// A choice among thousands of labels (a classifier's) is a client's request, not a server
/// failure: answered with one of them, quickly, whatever their number.
#[tokio::test]
async fn a_long_choice_list_is_answered() {
    let s = start().await;
    for n in [1_999, 2_000, 5_000, 66_000] {
        let labels = many(n);
        for extra in [
            json!({"guided_choice": labels}),
            json!({"structured_outputs": {"choice": labels}}),
        ] {
            let started = Instant::now();
            let (status, body) = post(&s, &chat(extra.clone())).await;
            let took = started.elapsed();
            let text = stopped_content(status, &body);
            assert!(labels.contains(&text), "{n} choices: {text:?}");
            assert!(took < HOSTILE_BOUND, "{n} choices answered in {took:?}");
        }
    }
}

/// A Lark grammar of `n` literal alternatives.
fn alternatives(n: usize) -> String {
    let literals: Vec<String> = many(n).iter().map(|l| format!("{l:?}")).collect();
    format!("start: {}", literals.join(" | "))
}

/// A grammar past llguidance's own limits is the client's problem, told in plain words and
/// quickly, never a 500: one too large to compile (llguidance's caught panic, whose text and
/// backtrace stay in the log) is refused before anything runs; one that compiles but breaks
/// a limit while generating (a rule of more than 2,000 alternatives) ends its request with a
/// 400 (an error event when streamed).
#[tokio::test]
async fn a_grammar_past_llguidance_limits_is_the_clients_error() {
    let s = start().await;
    let started = Instant::now();
    let (status, body) = post(&s, &chat(json!({"guided_grammar": alternatives(66_000)}))).await;
    let took = started.elapsed();
    refused(
        status,
        &body,
        "guided_grammar",
        "too large or complex to compile",
    );
    assert!(took < HUGE_GRAMMAR_BOUND, "answered in {took:?}");

    let grammar = alternatives(2_500);
    let (status, body) = post(&s, &chat(json!({"guided_grammar": grammar}))).await;
    refused(status, &body, "guided_grammar", "while generating");
    let mut streamed = s
        .send(
            "/v1/chat/completions",
            &chat(json!({"guided_grammar": grammar, "stream": true})),
        )
        .await;
    assert_eq!(streamed.status(), 200);
    let mut text = String::new();
    read_rest(&mut streamed, &mut text).await;
    let events: Vec<Value> = sse_data(&text)
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let error = &events.last().unwrap()["error"];
    assert_eq!(error["type"], "invalid_request_error", "{text}");
    assert_eq!(error["param"], "guided_grammar", "{text}");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("while generating"),
        "{text}"
    );
    // The server serves on.
    let (status, body) = post(&s, &chat(json!({"guided_choice": ["yes", "no"]}))).await;
    let text = stopped_content(status, &body);
    assert!(["yes", "no"].contains(&text.as_str()), "{text}");
}
