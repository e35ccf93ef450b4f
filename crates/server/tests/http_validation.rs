//! Validation and admission over real HTTP on the demo checkpoint: every bad parameter is a
//! 400 naming it before any answer starts, client numbers never overflow a limit, long
//! prompts never stall the other routes, image memory is bounded per request and across
//! requests, and unknown model names are not echoed whole.

mod common;

use common::{fixture_data_url, Server, Wait, MODEL};
use internvl_server::settings::ServeArgs;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// The demo checkpoint's vocabulary: logit_bias ids from here on do not exist.
const VOCAB: u32 = 1809;

impl Server {
    /// A server on 127.0.0.1 on the demo checkpoint, `edit`ed, once its model has loaded;
    /// dropped, it shuts down.
    async fn start(edit: impl FnOnce(&mut ServeArgs)) -> Server {
        let mut args = common::demo_args();
        edit(&mut args);
        Server::spawn_and_wait(args, reqwest::Client::new(), Wait::Healthy).await
    }

    /// Status, content type and body (JSON, or Null when it is not JSON).
    async fn post(&self, path: &str, body: &Value) -> (u16, String, Value) {
        let r = self.send(path, body).await;
        let status = r.status().as_u16();
        let content_type = r
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let bytes = r.bytes().await.unwrap();
        let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, content_type, json)
    }
}

/// A text chat with `extra` fields merged in.
fn chat(extra: Value) -> Value {
    let mut body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "你好"}],
        "max_tokens": 4,
        "temperature": 0
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// A 400 before any answer: a JSON error body (not an event stream) naming `param`.
fn assert_refused(what: &str, (status, content_type, body): &(u16, String, Value), param: &str) {
    assert_eq!(*status, 400, "{what}: {body}");
    assert!(
        content_type.starts_with("application/json"),
        "{what}: {content_type}"
    );
    assert_eq!(body["error"]["type"], "invalid_request_error", "{what}");
    assert_eq!(body["error"]["param"], param, "{what}: {body}");
    assert!(body["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
}

#[tokio::test]
async fn every_bad_parameter_is_a_400_naming_it_before_streaming() {
    let s = Server::start(|a| a.max_prompt_bytes = Some(4096)).await;
    let stops: Vec<String> = (0..17).map(|i| format!("s{i}")).collect();
    let cases = [
        (json!({"logit_bias": {VOCAB.to_string(): 1}}), "logit_bias"),
        (json!({"logit_bias": {"4294967296": 1}}), "logit_bias"),
        (json!({"logit_bias": {"ten": 1}}), "logit_bias"),
        (json!({"logit_bias": {"1": 101}}), "logit_bias"),
        (json!({"min_tokens": 9, "max_tokens": 3}), "min_tokens"),
        (json!({"n": 0}), "n"),
        (json!({"n": 129}), "n"),
        (json!({"top_p": 0}), "top_p"),
        (json!({"top_p": 1.5}), "top_p"),
        (json!({"top_k": -2}), "top_k"),
        (json!({"min_p": 1.5}), "min_p"),
        (json!({"temperature": 2.5}), "temperature"),
        (json!({"presence_penalty": -3}), "presence_penalty"),
        (json!({"frequency_penalty": 3}), "frequency_penalty"),
        (json!({"repetition_penalty": 0}), "repetition_penalty"),
        (json!({"repetition_penalty": 2.5}), "repetition_penalty"),
        (
            json!({"logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
        ),
        (json!({"top_logprobs": 2}), "top_logprobs"),
        (json!({"stop": stops}), "stop"),
        (json!({"stop": [""]}), "stop"),
        (json!({"stop": "x".repeat(1 << 20)}), "stop"),
        (json!({"max_tokens": 0}), "max_tokens"),
        (json!({"max_completion_tokens": 0}), "max_completion_tokens"),
        (json!({"max_tokens": 5000}), "messages"),
        (
            json!({"messages": [{"role": "user", "content": "字".repeat(1366)}]}),
            "messages",
        ),
        (
            json!({"messages": [
                {"role": "system", "content": "x".repeat(2048)},
                {"role": "user", "content": [{"type": "text", "text": "x".repeat(2049)}]}]}),
            "messages",
        ),
    ];
    for (extra, param) in cases {
        for stream in [false, true] {
            let mut body = chat(extra.clone());
            body["stream"] = json!(stream);
            let shown: String = extra.to_string().chars().take(60).collect();
            let what = format!("{shown} (stream {stream})");
            assert_refused(&what, &s.post("/v1/chat/completions", &body).await, param);
        }
    }
    // The same rules let a valid request through, streamed and not: the largest values.
    let ok = chat(json!({
        "logit_bias": {(VOCAB - 1).to_string(): 1}, "repetition_penalty": 2, "temperature": 2,
        "n": 2, "stop": vec!["x".repeat(256); 16],
        "messages": [{"role": "user", "content": "字 ".repeat(800)}]
    }));
    for stream in [false, true] {
        let mut body = ok.clone();
        body["stream"] = json!(stream);
        let (status, content_type, body) = s.post("/v1/chat/completions", &body).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(content_type.starts_with("text/event-stream"), stream);
    }
    // Malformed JSON past the size parsed inline (1 MiB) is a 400 too.
    let broken = format!("{{\"model\": \"{}\", \"messages\": [", "x".repeat(2 << 20));
    let r = s
        .client
        .post(s.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(broken)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    let prompt = json!({"model": MODEL, "prompt": "x".repeat(4097)});
    assert_refused("prompt", &s.post("/tokenize", &prompt).await, "prompt");
    let messages = json!({"messages": [{"role": "user", "content": "x".repeat(4097)}]});
    assert_refused(
        "messages",
        &s.post("/tokenize", &messages).await,
        "messages",
    );
}

#[tokio::test]
async fn counts_of_2_pow_64_minus_1_are_refused_not_wrapped() {
    let s = Server::start(|_| {}).await;
    for (field, param) in [
        ("max_tokens", "messages"),
        ("max_completion_tokens", "messages"),
        ("min_tokens", "min_tokens"),
    ] {
        for stream in [false, true] {
            let mut body = chat(json!({"stream": stream}));
            body.as_object_mut().unwrap().remove("max_tokens");
            body[field] = json!(u64::MAX);
            let reply = s.post("/v1/chat/completions", &body).await;
            assert_refused(&format!("{field} (stream {stream})"), &reply, param);
            if param == "messages" {
                let message = reply.2["error"]["message"].as_str().unwrap();
                assert!(message.contains("maximum context length"), "{message}");
            }
        }
    }
    let (status, _, body) = s.post("/v1/chat/completions", &chat(json!({}))).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn unknown_model_names_are_not_echoed_whole() {
    let s = Server::start(|_| {}).await;
    let name = "m".repeat(1 << 20);
    let chat_body = chat(json!({"model": name}));
    let tokenize_body = json!({"model": name, "prompt": "hi"});
    for (path, body) in [
        ("/v1/chat/completions", chat_body),
        ("/tokenize", tokenize_body),
    ] {
        let r = s.send(path, &body).await;
        assert_eq!(r.status(), 404, "{path}");
        let bytes = r.bytes().await.unwrap();
        assert!(bytes.len() < 1000, "{path}: {} bytes", bytes.len());
        let body: Value = serde_json::from_slice(&bytes).unwrap();
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(&format!("`{}…`", "m".repeat(64))),
            "{message}"
        );
    }
}

/// Two prompts of several megabytes take seconds each to tokenize. Tokenized on the async
/// workers (two here, as on a two-core machine), they held both and `/health` waited for them;
/// on the blocking pool, `/health` answers while they are still being tokenized: the proof is
/// the order of events (answers that arrive before either prompt's reply), not a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_prompts_never_stall_other_routes() {
    const PROMPT_BYTES: usize = 3 << 20;
    let s = Server::start(|a| a.max_prompt_bytes = Some(64 << 20)).await;
    let s = std::sync::Arc::new(s);
    let prompt = "hello world, ".repeat(PROMPT_BYTES / 13);
    let started = Instant::now();
    let jobs: Vec<_> = (0..2)
        .map(|i| {
            let s = s.clone();
            let body = if i == 0 {
                json!({"model": MODEL, "prompt": prompt})
            } else {
                chat(json!({"messages": [{"role": "user", "content": prompt}]}))
            };
            tokio::spawn(async move {
                let path = if i == 0 {
                    "/tokenize"
                } else {
                    "/v1/chat/completions"
                };
                let (status, _, body) = s.post(path, &body).await;
                (status, body["count"].as_u64(), started.elapsed())
            })
        })
        .collect();
    // Let both bodies arrive and their tokenization start.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Health answers received while neither prompt has had its reply.
    let mut answered_during = 0;
    while !jobs.iter().any(|j| j.is_finished()) {
        let r = s.client.get(s.url("/health")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        if !jobs.iter().any(|j| j.is_finished()) {
            answered_during += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut took = Vec::new();
    for (i, job) in jobs.into_iter().enumerate() {
        let (status, count, elapsed) = job.await.unwrap();
        took.push(elapsed);
        if i == 0 {
            assert_eq!(status, 200);
            assert!(count.unwrap() > 1_000_000);
        } else {
            // Far past the context: refused for its length once tokenized.
            assert_eq!(status, 400);
        }
    }
    eprintln!("tokenizing took {took:?}; {answered_during} health answers meanwhile");
    assert!(
        answered_during >= 3,
        "/health answered {answered_during} times while the prompts were tokenized ({took:?})"
    );
}

#[tokio::test]
async fn image_bytes_are_bounded_per_request() {
    let gif = fixture_data_url("gif_240x160.gif", "image/gif");
    let s = Server::start(|a| a.max_request_image_bytes = Some(4000)).await;
    let image = |url: &str| json!({"type": "image_url", "image_url": {"url": url}});
    let one = chat(
        json!({"messages": [{"role": "user", "content": [image(&gif),
        {"type": "text", "text": "?"}]}]}),
    );
    assert_eq!(s.post("/v1/chat/completions", &one).await.0, 200);
    let two = chat(
        json!({"messages": [{"role": "user", "content": [image(&gif), image(&gif),
        {"type": "text", "text": "?"}]}]}),
    );
    for stream in [false, true] {
        let mut body = two.clone();
        body["stream"] = json!(stream);
        let reply = s.post("/v1/chat/completions", &body).await;
        assert_refused("two images", &reply, "messages");
        let message = reply.2["error"]["message"].as_str().unwrap();
        assert!(message.contains("4000"), "{message}");
    }
}

/// One image's pixels (448×448×3 f32) take 2352 KiB: a 4 MiB budget holds one request's.
#[tokio::test]
async fn image_memory_is_bounded_across_requests() {
    let gif = fixture_data_url("gif_240x160.gif", "image/gif");
    let s = Server::start(|a| a.max_image_memory = Some(4 << 20)).await;
    let with_image = |extra: Value| {
        let mut body = chat(extra);
        body["messages"] = json!([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": gif}}, {"type": "text", "text": "?"}]}]);
        body
    };
    // A stream left unread holds its pixels' memory as long as it lives.
    let mut holder = s
        .send(
            "/v1/chat/completions",
            &with_image(
                json!({"stream": true, "max_tokens": 1700, "ignore_eos": true,
                "logprobs": true, "top_logprobs": 20}),
            ),
        )
        .await;
    assert_eq!(holder.status(), 200);
    assert!(holder.chunk().await.unwrap().is_some());
    for stream in [false, true] {
        let r = s
            .send(
                "/v1/chat/completions",
                &with_image(json!({"stream": stream})),
            )
            .await;
        assert_eq!(r.status(), 429, "stream {stream}");
        assert!(r.headers().contains_key("retry-after"));
        let body: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        assert_eq!(body["error"]["type"], "rate_limit_error");
    }
    // Requests without images are not affected.
    assert_eq!(
        s.post("/v1/chat/completions", &chat(json!({}))).await.0,
        200
    );
    // Once the holder is gone, its memory is given back.
    drop(holder);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, _, body) = s.post("/v1/chat/completions", &with_image(json!({}))).await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 429, "{body}");
        assert!(
            Instant::now() < deadline,
            "the image memory was never given back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
