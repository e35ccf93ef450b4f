//! Tool calls over HTTP on the demo checkpoint: a named function, `"required"` with and
//! without parallel calls, streamed deltas equal to the whole answer, `"none"` and `"auto"`,
//! and a history of calls and results rendered into the prompt.

mod common;

use common::{json_body, read_rest, sse_data, Server, Wait, MODEL};
use serde_json::{json, Value};

async fn start() -> Server {
    Server::spawn_and_wait(common::demo_args(), reqwest::Client::new(), Wait::Healthy).await
}

/// Arguments the demo's random weights can finish within the budget: bounded fields only.
fn weather() -> Value {
    json!({"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 6},
            "unit": {"enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
          "required": ["city", "unit", "days"], "additionalProperties": false}}})
}

fn time() -> Value {
    json!({"type": "function", "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}},
                       "required": ["zone"], "additionalProperties": false}}})
}

fn chat(extra: Value) -> Value {
    let mut body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "tools": [weather(), time()],
        "max_tokens": 200,
        "temperature": 0
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

async fn post(s: &Server, path: &str, body: Value) -> (u16, Value) {
    let r = s.send(path, &body).await;
    let status = r.status().as_u16();
    (status, json_body(r).await)
}

/// The arguments of a call, parsed, checked against `get_weather`'s schema by hand.
fn check_weather(arguments: &str) {
    let args: Value =
        serde_json::from_str(arguments).unwrap_or_else(|e| panic!("{arguments}: {e}"));
    let args = args.as_object().unwrap();
    assert!(
        args["city"].as_str().unwrap().chars().count() <= 6,
        "{arguments}"
    );
    assert!(["celsius", "fahrenheit"].contains(&args["unit"].as_str().unwrap()));
    assert!(
        (1..=7).contains(&args["days"].as_i64().unwrap()),
        "{arguments}"
    );
    assert_eq!(args.len(), 3, "no other fields: {arguments}");
}

fn check_call(call: &Value) {
    assert!(call["id"].as_str().unwrap().starts_with("call_"), "{call}");
    assert_eq!(call["type"], "function");
    let arguments = call["function"]["arguments"].as_str().unwrap();
    match call["function"]["name"].as_str().unwrap() {
        "get_weather" => check_weather(arguments),
        "get_time" => {
            let args: Value = serde_json::from_str(arguments).unwrap();
            assert!(
                ["utc", "cet"].contains(&args["zone"].as_str().unwrap()),
                "{args}"
            );
        }
        other => panic!("a call of {other}, not one of the tools"),
    }
}

const NAMED: &str = "get_weather";

fn named() -> Value {
    json!({"tool_choice": {"type": "function", "function": {"name": NAMED}}})
}

#[tokio::test]
async fn a_named_function_is_called_with_arguments_of_its_schema() {
    let s = start().await;
    let (status, body) = post(&s, "/v1/chat/completions", chat(named())).await;
    assert_eq!(status, 200, "{body}");
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{body}");
    assert!(choice["message"]["content"].is_null(), "{body}");
    let calls = choice["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["function"]["name"], NAMED);
    check_call(&calls[0]);
}

#[tokio::test]
async fn required_calls_listed_functions_and_parallel_false_calls_one() {
    let s = start().await;
    let (status, body) = post(
        &s,
        "/v1/chat/completions",
        chat(json!({"tool_choice": "required"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{body}");
    assert!(choice["message"]["content"].is_null());
    let calls = choice["message"]["tool_calls"].as_array().unwrap();
    assert!(!calls.is_empty());
    calls.iter().for_each(check_call);

    let (status, body) = post(
        &s,
        "/v1/chat/completions",
        chat(
            json!({"tool_choice": "required", "parallel_tool_calls": false, "seed": 3,
                    "temperature": 1}),
        ),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["finish_reason"], "tool_calls", "{body}");
    let calls = body["choices"][0]["message"]["tool_calls"]
        .as_array()
        .unwrap();
    assert_eq!(calls.len(), 1, "{body}");
    check_call(&calls[0]);
}

#[tokio::test]
async fn streamed_calls_reassemble_to_the_whole_answer() {
    let s = start().await;
    for choice in [named(), json!({"tool_choice": "required"})] {
        let (_, whole) = post(&s, "/v1/chat/completions", chat(choice.clone())).await;
        let expected: Vec<(Value, Value)> = whole["choices"][0]["message"]["tool_calls"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["function"]["name"].clone(),
                    c["function"]["arguments"].clone(),
                )
            })
            .collect();
        let mut body = chat(choice);
        body["stream"] = json!(true);
        let mut r = s.send("/v1/chat/completions", &body).await;
        assert_eq!(r.status(), 200);
        let mut text = String::new();
        read_rest(&mut r, &mut text).await;
        let events: Vec<&str> = sse_data(&text).collect();
        assert_eq!(events.last(), Some(&"[DONE]"));
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        // Put together as the SDKs do: by index, the first delta naming the call.
        let mut calls: Vec<(Value, String)> = Vec::new();
        let mut finish = Value::Null;
        for chunk in &chunks {
            let choice = &chunk["choices"][0];
            assert!(
                choice["delta"].get("content").is_none_or(Value::is_null),
                "{chunk}"
            );
            if !choice["finish_reason"].is_null() {
                finish = choice["finish_reason"].clone();
            }
            for delta in choice["delta"]["tool_calls"]
                .as_array()
                .into_iter()
                .flatten()
            {
                let index = delta["index"].as_u64().unwrap() as usize;
                if index == calls.len() {
                    assert!(delta["id"].as_str().unwrap().starts_with("call_"));
                    assert_eq!(delta["type"], "function");
                    assert_eq!(delta["function"]["arguments"], "");
                    calls.push((delta["function"]["name"].clone(), String::new()));
                } else {
                    assert!(delta.get("id").is_none(), "the id comes once: {delta}");
                }
                calls[index]
                    .1
                    .push_str(delta["function"]["arguments"].as_str().unwrap());
            }
        }
        let streamed: Vec<(Value, Value)> = calls.into_iter().map(|(n, a)| (n, json!(a))).collect();
        assert_eq!(streamed, expected);
        assert_eq!(finish, "tool_calls");
    }
}

#[tokio::test]
async fn a_cut_call_finishes_with_length_and_keeps_its_start() {
    let s = start().await;
    let (status, body) = post(
        &s,
        "/v1/chat/completions",
        chat(json!({
        "tool_choice": {"type": "function", "function": {"name": NAMED}}, "max_tokens": 3})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "length");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], NAMED);
    let arguments = call["function"]["arguments"].as_str().unwrap();
    assert!(arguments.starts_with('{'), "{arguments}");
    assert!(
        serde_json::from_str::<Value>(arguments).is_err(),
        "cut: {arguments}"
    );
}

#[tokio::test]
async fn none_answers_text_and_auto_is_refused_saying_why() {
    let s = start().await;
    let (status, body) = post(
        &s,
        "/v1/chat/completions",
        chat(json!({"tool_choice": "none", "max_tokens": 8})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let message = &body["choices"][0]["message"];
    assert!(message["content"].is_string(), "{body}");
    assert!(message.get("tool_calls").is_none(), "{body}");
    for extra in [json!({"tool_choice": "auto"}), json!({})] {
        let (status, body) = post(&s, "/v1/chat/completions", chat(extra)).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["param"], "tool_choice");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("no tool-call format") && message.contains("\"required\""),
            "{message}"
        );
    }
    let (status, body) = post(
        &s,
        "/v1/chat/completions",
        chat(json!({"tools": [], "tool_choice": "none"})),
    )
    .await;
    assert_eq!(
        (status, body["error"]["param"].clone()),
        (400, json!("tools"))
    );
}

#[tokio::test]
async fn a_history_of_calls_and_results_is_rendered() {
    let s = start().await;
    let history = |result: &str| {
        json!([
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"celsius\", \"days\": 1}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": result},
            {"role": "user", "content": "And tomorrow?"}
        ])
    };
    let (status, body) = post(
        &s,
        "/v1/chat/completions",
        chat(json!({"messages": history("sunny, 21 degrees"), "tool_choice": "none", "max_tokens": 4})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let count = |messages: Value| {
        let s = &s;
        async move {
            let (status, body) = post(s, "/tokenize", json!({"messages": messages})).await;
            assert_eq!(status, 200, "{body}");
            body["count"].as_u64().unwrap()
        }
    };
    let short = count(history("sunny")).await;
    let long = count(history(
        "sunny, with a light breeze from the west all afternoon",
    ))
    .await;
    assert!(
        long > short + 5,
        "{short} -> {long}: the tool result is in the prompt"
    );
    let (status, body) = post(
        &s,
        "/v1/chat/completions",
        chat(json!({"messages": [{"role": "tool", "content": "x"}], "tool_choice": "none"})),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "messages[0].tool_call_id");
}

/// `/tokenize` with `tools` counts the prompt a chat with those tools has: the functions'
/// system block included, under the same rules (`tool_choice` needed, as in a chat).
#[tokio::test]
async fn tokenize_counts_the_tools_block_as_a_chat_does() {
    let s = start().await;
    let named = json!({"type": "function", "function": {"name": "get_weather"}});
    let body = chat(json!({"tool_choice": named}));
    let (status, reply) = post(&s, "/v1/chat/completions", body.clone()).await;
    assert_eq!(status, 200, "{reply}");
    let prompt_tokens = reply["usage"]["prompt_tokens"].as_u64().unwrap();

    let tokenize = |extra: Value| {
        let mut req = json!({"model": MODEL, "messages": body["messages"]});
        for (k, v) in extra.as_object().unwrap() {
            req[k] = v.clone();
        }
        req
    };
    let (status, counted) = post(
        &s,
        "/tokenize",
        tokenize(json!({"tools": body["tools"], "tool_choice": named})),
    )
    .await;
    assert_eq!(status, 200, "{counted}");
    assert_eq!(counted["count"].as_u64().unwrap(), prompt_tokens);
    let (_, plain) = post(&s, "/tokenize", tokenize(json!({}))).await;
    assert!(
        plain["count"].as_u64().unwrap() + 50 < prompt_tokens,
        "the block is counted: {plain} vs {prompt_tokens}"
    );

    let (status, refused) = post(&s, "/tokenize", tokenize(json!({"tools": body["tools"]}))).await;
    assert_eq!(status, 400, "{refused}");
    assert_eq!(refused["error"]["param"], "tool_choice", "{refused}");
    let (status, refused) = post(
        &s,
        "/tokenize",
        json!({"model": MODEL, "prompt": "hi", "tools": body["tools"], "tool_choice": named}),
    )
    .await;
    assert_eq!(status, 400, "{refused}");
    assert_eq!(refused["error"]["param"], "tools", "{refused}");
}
