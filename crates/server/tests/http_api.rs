//! The server over real HTTP on the demo checkpoint: every response field, every error
//! status, streaming equal to non-streaming, cancellation, the queue bound.

mod common;

use common::{demo_model, fixture_data_url, root, sse_data, Server, Wait, MODEL};
use internvl_server::settings::ServeArgs;
use serde_json::{json, Value};
use std::sync::LazyLock;
use std::time::Duration;

/// The conversation the test chat sends: case `one_image` of the reference fixtures, written
/// by `scripts/reference/generate_model.py` (transformers and SentencePiece), with the prompt
/// ids the reference made of it.
static REFERENCE: LazyLock<Value> = LazyLock::new(|| {
    let path = root().join("tests/fixtures/reference/model_cases.json");
    let fixtures: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    fixtures["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|case| case["name"] == "one_image")
        .expect("the reference has case one_image")
        .clone()
});

/// The reference's prompt ids of the test chat.
fn reference_ids() -> &'static [Value] {
    REFERENCE["input_ids"].as_array().unwrap()
}

/// The test chat's prompt length, as the reference counts it.
fn prompt_tokens() -> u64 {
    reference_ids().len() as u64
}

/// The reference conversation as OpenAI messages, each image as `url(its fixture file)`.
fn reference_messages(url: impl Fn(&str) -> String) -> Value {
    let mut messages = REFERENCE["messages"].clone();
    for message in messages.as_array_mut().unwrap() {
        let Some(parts) = message["content"].as_array_mut() else {
            continue;
        };
        for part in parts {
            if part["type"] == "image" {
                let file = part["file"].as_str().unwrap();
                *part =
                    json!({"type": "image_url", "image_url": {"url": url(file), "detail": "low"}});
            }
        }
    }
    messages
}

fn image_url(file: &str) -> String {
    fixture_data_url(file, "image/png")
}

impl Server {
    /// A server on 127.0.0.1 with a small KV cache, `edit`ed, once its model has loaded or
    /// failed to load; dropped, it shuts down.
    async fn start(edit: impl FnOnce(&mut ServeArgs)) -> Server {
        let mut args = common::demo_args();
        edit(&mut args);
        Server::spawn_and_wait(args, reqwest::Client::new(), Wait::HealthyOrLoadFailed).await
    }

    async fn post_raw(&self, path: &str, body: Vec<u8>, key: Option<&str>) -> reqwest::Response {
        let mut req = self
            .client
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body);
        if let Some(key) = key {
            req = req.header("authorization", format!("Bearer {key}"));
        }
        req.send().await.unwrap()
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .post_raw(path, body.to_string().into_bytes(), None)
            .await;
        let status = r.status().as_u16();
        (
            status,
            serde_json::from_slice(&r.bytes().await.unwrap()).unwrap_or(Value::Null),
        )
    }

    /// The `data:` payloads of a streamed answer.
    async fn stream(&self, body: Value) -> Vec<String> {
        let mut r = self
            .post_raw("/v1/chat/completions", body.to_string().into_bytes(), None)
            .await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "text/event-stream");
        let mut text = String::new();
        common::read_rest(&mut r, &mut text).await;
        sse_data(&text).map(str::to_string).collect()
    }
}

fn chat(extra: Value) -> Value {
    let mut body = json!({
        "model": MODEL,
        "messages": reference_messages(image_url),
        "max_tokens": 8,
        "temperature": 0
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// The SDKs send unset options as `null`: read as their defaults (no stream, no usage chunk,
/// EOS honoured), as OpenAI does.
#[tokio::test]
async fn null_options_mean_their_defaults() {
    let s = Server::start(|_| {}).await;
    let (status, plain) = s.post("/v1/chat/completions", chat(json!({}))).await;
    assert_eq!(status, 200, "{plain}");
    let (status, nulls) = s
        .post(
            "/v1/chat/completions",
            chat(json!({"stream": null, "ignore_eos": null})),
        )
        .await;
    assert_eq!(status, 200, "{nulls}");
    assert_eq!(nulls["object"], "chat.completion", "not a stream");
    assert_eq!(nulls["choices"], plain["choices"]);
    for count in ["prompt_tokens", "completion_tokens"] {
        assert_eq!(nulls["usage"][count], plain["usage"][count], "{count}");
    }
    let streamed = s.stream(chat(json!({"stream": true}))).await;
    let null_usage = s
        .stream(chat(
            json!({"stream": true, "stream_options": {"include_usage": null}}),
        ))
        .await;
    assert_eq!(null_usage.len(), streamed.len(), "no usage chunk");
    assert!(!null_usage.iter().any(|c| c.contains("\"prompt_tokens\"")));
}

#[tokio::test]
async fn non_streamed_answer_has_every_field() {
    let s = Server::start(|_| {}).await;
    let (status, body) = s
        .post(
            "/v1/chat/completions",
            chat(json!({"logprobs": true, "top_logprobs": 3, "n": 2, "seed": 1})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["object"], "chat.completion");
    assert!(body["created"].as_u64().unwrap() > 1_700_000_000);
    assert_eq!(body["model"], MODEL);
    let choices = body["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    for (i, choice) in choices.iter().enumerate() {
        assert_eq!(choice["index"], i);
        assert_eq!(choice["message"]["role"], "assistant");
        assert!(choice["message"]["content"].is_string());
        assert!(["stop", "length"].contains(&choice["finish_reason"].as_str().unwrap()));
        let content = choice["logprobs"]["content"].as_array().unwrap();
        assert!(!content.is_empty());
        let first = &content[0];
        assert!(first["token"].is_string() && first["logprob"].as_f64().unwrap() <= 0.0);
        assert!(first["bytes"].is_array());
        assert_eq!(first["top_logprobs"].as_array().unwrap().len(), 3);
    }
    let usage = &body["usage"];
    assert_eq!(usage["prompt_tokens"], prompt_tokens());
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );
    assert!(usage["prompt_tokens_details"]["cached_tokens"].is_u64());
    assert_eq!(usage["completion_tokens_details"]["reasoning_tokens"], 0);
}

/// An answer that ends on EOS counts the EOS as a completion token; its logprobs have an
/// entry for it too (the token's text is empty), streamed or not.
#[tokio::test]
async fn logprobs_cover_the_eos_that_ends_an_answer() {
    let s = Server::start(|_| {}).await;
    let eos = internvl_model::tokenizer::Tokenizer::from_dir(&demo_model())
        .unwrap()
        .eos_id();
    let mut bias = serde_json::Map::new();
    bias.insert(eos.to_string(), json!(100));
    let body = chat(json!({"logprobs": true, "top_logprobs": 2, "logit_bias": bias}));
    let (status, whole) = s.post("/v1/chat/completions", body.clone()).await;
    assert_eq!(status, 200, "{whole}");
    let choice = &whole["choices"][0];
    assert_eq!(choice["finish_reason"], "stop", "{whole}");
    let completion_tokens = whole["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    assert!(completion_tokens < 8, "EOS ended it: {whole}");
    let content = choice["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), completion_tokens, "{whole}");
    let last = &content[completion_tokens - 1];
    assert_eq!(last["token"], "</s>");
    assert_eq!(last["top_logprobs"].as_array().unwrap().len(), 2);
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let chunks: Vec<Value> = s
        .stream(streamed)
        .await
        .iter()
        .filter(|c| *c != "[DONE]")
        .map(|c| serde_json::from_str(c).unwrap())
        .collect();
    let entries: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array())
        .flatten()
        .collect();
    assert_eq!(entries.len(), completion_tokens, "{chunks:?}");
    assert_eq!(entries[completion_tokens - 1]["logprob"], last["logprob"]);
}

#[tokio::test]
async fn streaming_equals_non_streaming_for_greedy() {
    let s = Server::start(|_| {}).await;
    let (_, whole) = s
        .post("/v1/chat/completions", chat(json!({"max_tokens": 16})))
        .await;
    let expected = whole["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let events = s
        .stream(chat(
            json!({"max_tokens": 16, "stream": true, "stream_options": {"include_usage": true}}),
        ))
        .await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let mut text = String::new();
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], chunks[0]["id"]);
        if let Some(choice) = c["choices"].as_array().unwrap().first() {
            text.push_str(choice["delta"]["content"].as_str().unwrap_or(""));
        }
    }
    assert_eq!(text, expected);
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(
        finish["choices"][0]["finish_reason"],
        whole["choices"][0]["finish_reason"]
    );
    let usage = &chunks[chunks.len() - 1];
    assert_eq!(usage["choices"].as_array().unwrap().len(), 0);
    assert_eq!(
        usage["usage"]["completion_tokens"],
        whole["usage"]["completion_tokens"]
    );
    assert!(
        chunks[1]["usage"].is_null(),
        "usage is null until the last chunk"
    );
}

#[tokio::test]
async fn errors_have_openai_shape_and_status() {
    let s = Server::start(|a| {
        a.max_images_per_request = Some(1);
        a.max_body_bytes = Some(2 << 20);
    })
    .await;
    let check = |status: u16, body: &Value, want: u16, param: Option<&str>| {
        assert_eq!(status, want, "{body}");
        let e = &body["error"];
        assert!(
            e["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{body}"
        );
        assert!(e["type"].is_string());
        if let Some(param) = param {
            assert_eq!(e["param"], param, "{body}");
        }
    };
    let r = s
        .post_raw("/v1/chat/completions", b"{not json".to_vec(), None)
        .await;
    let status = r.status().as_u16();
    check(
        status,
        &serde_json::from_slice(&r.bytes().await.unwrap()).unwrap(),
        400,
        None,
    );
    let (st, b) = s
        .post("/v1/chat/completions", chat(json!({"temperature": 5})))
        .await;
    check(st, &b, 400, Some("temperature"));
    assert_eq!(
        b["error"]["code"],
        Value::Null,
        "OpenAI has no code for a bad value"
    );
    let (st, b) = s
        .post("/v1/chat/completions", chat(json!({"tools": []})))
        .await;
    check(st, &b, 400, Some("tools"));
    let (st, b) = s
        .post("/v1/chat/completions", chat(json!({"max_tokens": 5000})))
        .await;
    check(st, &b, 400, Some("messages"));
    assert!(b["error"]["message"]
        .as_str()
        .unwrap()
        .contains("maximum context length"));
    let two = json!({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_url("model-a.png")}},
        {"type": "image_url", "image_url": {"url": image_url("model-b.png")}}]}]});
    let (st, b) = s.post("/v1/chat/completions", chat(two)).await;
    check(st, &b, 400, Some("messages"));
    let junk = json!({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}]});
    let (st, b) = s.post("/v1/chat/completions", chat(junk)).await;
    check(st, &b, 400, Some("messages"));
    // A bare-string image_url (the URL without its object): plain words, where, and `param`.
    let bare = json!({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": image_url("model-a.png")}]}]});
    let (st, b) = s.post("/v1/chat/completions", chat(bare)).await;
    check(st, &b, 400, Some("messages"));
    let message = b["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("`messages[0].content`")
            && message.contains("{\"url\": \"...\"}")
            && !message.contains("untagged"),
        "{message}"
    );
    let (st, b) = s
        .post("/v1/chat/completions", chat(json!({"max_tokens": "many"})))
        .await;
    check(st, &b, 400, Some("max_tokens"));
    // serde quotes what it refused: a megabyte value, or a megabyte key on the path, comes
    // back as a line, not a megabyte.
    let huge = "x".repeat(1 << 20);
    for body in [
        chat(json!({ "max_tokens": huge })),
        chat(json!({ "logit_bias": { huge.clone(): "high" } })),
    ] {
        let (st, b) = s.post("/v1/chat/completions", body).await;
        assert_eq!(st, 400, "{b}");
        let message = b["error"]["message"].as_str().unwrap();
        assert!(message.len() < 1000 && message.contains('…'), "{message}");
    }
    let ssrf = json!({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest/meta-data"}}]}]});
    let (st, b) = s.post("/v1/chat/completions", chat(ssrf)).await;
    check(st, &b, 400, Some("messages"));
    let (st, b) = s
        .post("/v1/chat/completions", chat(json!({"model": "gpt-4o"})))
        .await;
    check(st, &b, 404, None);
    assert_eq!(b["error"]["code"], "model_not_found");
    let (st, b) = s.get("/v1/nothing").await;
    check(st, &b, 404, None);
    assert_eq!(b["error"]["code"], Value::Null);
    let (st, b) = s.get("/v1/chat/completions").await;
    check(st, &b, 405, None);
    let big = vec![b' '; 3 << 20];
    let r = s.post_raw("/v1/chat/completions", big, None).await;
    let status = r.status().as_u16();
    check(
        status,
        &serde_json::from_slice(&r.bytes().await.unwrap()).unwrap(),
        413,
        None,
    );
}

#[tokio::test]
async fn api_keys_are_required_when_configured() {
    let s = Server::start(|a| a.api_key = vec!["k1".into(), "k2".into()]).await;
    let body = chat(json!({})).to_string().into_bytes();
    for key in [None, Some("wrong")] {
        let r = s.post_raw("/v1/chat/completions", body.clone(), key).await;
        assert_eq!(r.status(), 401);
        let b: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        assert_eq!(b["error"]["type"], "authentication_error");
        assert_eq!(b["error"]["code"], "invalid_api_key");
    }
    assert_eq!(
        s.post_raw("/v1/chat/completions", body, Some("k2"))
            .await
            .status(),
        200
    );
    assert_eq!(s.get("/health").await.0, 200, "health needs no key");
}

/// Browsers: with origins allowed, a preflight is answered without the API key and answers
/// carry the allowed origin; other origins, or no setting, get no CORS headers at all.
#[tokio::test]
async fn cors_answers_allowed_origins_only() {
    let preflight = |s: &Server, origin: &'static str| {
        s.client
            .request(reqwest::Method::OPTIONS, s.url("/v1/chat/completions"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization,content-type",
            )
            .send()
    };
    let allow = |r: &reqwest::Response| {
        r.headers()
            .get("access-control-allow-origin")
            .map(|v| v.to_str().unwrap().to_string())
    };
    let s = Server::start(|a| {
        a.allowed_origins = Some("https://app.example,http://localhost:3000".into());
        a.api_key = vec!["k".into()];
    })
    .await;
    let r = preflight(&s, "https://app.example").await.unwrap();
    assert_eq!(r.status(), 200, "no key needed for a preflight");
    assert_eq!(allow(&r).as_deref(), Some("https://app.example"));
    let methods = r.headers()["access-control-allow-methods"]
        .to_str()
        .unwrap();
    assert!(
        methods.contains('*') || methods.contains("POST"),
        "{methods}"
    );
    let r = preflight(&s, "https://evil.example").await.unwrap();
    assert_eq!(allow(&r), None);
    let r = s
        .client
        .post(s.url("/v1/chat/completions"))
        .header("origin", "http://localhost:3000")
        .bearer_auth("k")
        .header("content-type", "application/json")
        .body(chat(json!({})).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(allow(&r).as_deref(), Some("http://localhost:3000"));
    let exposed = r.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap();
    assert!(exposed.contains("x-request-id"), "{exposed}");

    let closed = Server::start(|_| {}).await;
    let r = preflight(&closed, "https://app.example").await.unwrap();
    assert_eq!(allow(&r), None, "no origins allowed by default");
    assert_eq!(r.status(), 405);
}

#[tokio::test]
async fn models_tokenize_health_and_request_ids() {
    let s = Server::start(|_| {}).await;
    let (status, models) = s.get("/v1/models").await;
    assert_eq!(status, 200);
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], MODEL);
    let (status, card) = s.get(&format!("/v1/models/{MODEL}")).await;
    assert_eq!(status, 200, "{card}");
    assert_eq!(card, models["data"][0], "one card, both routes");
    let (status, error) = s.get("/v1/models/gpt-4o").await;
    assert_eq!(status, 404, "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`gpt-4o` does not exist"),
        "{error}"
    );
    let (status, t) = s
        .post(
            "/tokenize",
            json!({"model": MODEL, "messages": reference_messages(|_| "ignored".into())}),
        )
        .await;
    assert_eq!(status, 200, "{t}");
    assert_eq!(t["count"], prompt_tokens());
    assert_eq!(
        t["tokens"].as_array().unwrap(),
        reference_ids(),
        "the reference's prompt ids"
    );
    assert_eq!(t["max_model_len"], 2048);
    let (_, t) = s.post("/tokenize", json!({"prompt": "hello"})).await;
    assert_eq!(t["tokens"][0], 1, "BOS first");
    let r = s
        .client
        .get(s.url("/health"))
        .header("x-request-id", "my-id-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "my-id-1");
    let r = s.client.get(s.url("/health")).send().await.unwrap();
    assert!(!r.headers()["x-request-id"].is_empty());
}

#[tokio::test]
async fn a_model_that_fails_to_load_answers_503() {
    let s = Server::start(|a| a.model = Some(root().join("tests/fixtures/images"))).await;
    let (status, body) = s.get("/health").await;
    assert_eq!(status, 503);
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("failed to load"), "{message}");
    // The reason (which names the directory) stays in the log.
    assert!(!message.contains("fixtures"), "{message}");
    let (status, _) = s.post("/v1/chat/completions", chat(json!({}))).await;
    assert_eq!(status, 503);
}

#[tokio::test]
async fn disconnecting_frees_the_kv_cache() {
    let s = Server::start(|_| {}).await;
    let body = chat(json!({"max_tokens": 1500, "ignore_eos": true, "stream": true}));
    let mut r = s
        .post_raw("/v1/chat/completions", body.to_string().into_bytes(), None)
        .await;
    assert!(r.chunk().await.unwrap().is_some());
    let mut used = 0.0;
    for _ in 0..500 {
        used = s.metric("internvl:kv_cache_usage_perc").await;
        if used > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(used > 0.0, "the request holds blocks while it runs");
    drop(r);
    for _ in 0..400 {
        if s.metric("internvl:kv_cache_usage_perc").await == 0.0
            && s.metric("internvl:num_requests_running").await == 0.0
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("blocks were not freed after the client went away");
}

#[tokio::test]
async fn a_full_queue_answers_429_at_once() {
    let s = Server::start(|a| {
        a.max_num_seqs = Some(1);
        a.max_queued_requests = Some(0);
    })
    .await;
    let body = chat(json!({"max_tokens": 1500, "ignore_eos": true, "stream": true}));
    let mut busy = s
        .post_raw("/v1/chat/completions", body.to_string().into_bytes(), None)
        .await;
    assert!(busy.chunk().await.unwrap().is_some());
    let r = s
        .post_raw(
            "/v1/chat/completions",
            chat(json!({})).to_string().into_bytes(),
            None,
        )
        .await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let b: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(b["error"]["code"], "rate_limit_exceeded");
    drop(busy);
}

#[tokio::test]
async fn a_non_streamed_request_is_cancelled_when_the_client_leaves() {
    let s = Server::start(|_| {}).await;
    let body = chat(json!({"max_tokens": 1500, "ignore_eos": true}));
    let client = s.client.clone();
    let url = s.url("/v1/chat/completions");
    let request = tokio::spawn(async move {
        client
            .post(url)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
    });
    let mut running = false;
    for _ in 0..1000 {
        if s.metric("internvl:num_requests_running").await == 1.0 {
            running = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(running, "the request should be running");
    // The client gives up long before 1500 tokens: its connection closes.
    request.abort();
    for _ in 0..1000 {
        let aborted = s
            .metric("internvl:request_success_total{finished_reason=\"abort\"")
            .await;
        if aborted == 1.0 {
            assert_eq!(s.metric("internvl:kv_cache_usage_perc").await, 0.0);
            let length = s
                .metric("internvl:request_success_total{finished_reason=\"length\"")
                .await;
            assert_eq!(length, 0.0, "the request did not run to its end");
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the abandoned request was not aborted");
}

#[tokio::test]
async fn random_weights_serve_the_configured_model() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tiny-internvl.json");
    std::fs::copy(root().join("models/demo-internvl/config.json"), &config).unwrap();
    let s = Server::start(|a| a.random_weights = Some(config.clone())).await;
    let (status, body) = s
        .post(
            "/v1/chat/completions",
            chat(json!({"model": "tiny-internvl", "max_tokens": 4, "ignore_eos": true})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["prompt_tokens"], prompt_tokens());
    assert_eq!(body["usage"]["completion_tokens"], 4);

    let missing = dir.path().join("missing.json");
    let s = Server::start(|a| a.random_weights = Some(missing.clone())).await;
    let (status, body) = s.get("/health").await;
    assert_eq!(status, 503);
    // The missing file is named in the log, not to clients.
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("failed to load"), "{message}");
    assert!(!message.contains(&*missing.to_string_lossy()), "{message}");
}
