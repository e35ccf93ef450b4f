//! A model failure in the middle of a generation, over real HTTP: the streaming client gets
//! an OpenAI error event after the tokens it already had, then `[DONE]`; the non-streaming one
//! a 500 with OpenAI error JSON; every KV block comes back, and the next request is served
//! normally.

mod common;

use common::{blocks_used_settled, json_body, post, sse_data, Faulty};
use internvl_scheduler::RunnerError;
use internvl_server::state::AppState;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A server whose model (the demo model) fails once: on the forward numbered `fail_at` (from
/// 0). Returns its chat URL, its state and the count of forwards so far.
async fn start(fail_at: usize) -> (String, Arc<AppState>, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let (base, state) = common::serve_engine(64, move |_, inner| {
        Faulty::new(inner, move |_| {
            (counted.fetch_add(1, Ordering::SeqCst) == fail_at)
                .then(|| RunnerError("injected device failure".into()))
        })
    })
    .await;
    (format!("{base}/v1/chat/completions"), state, calls)
}

fn request(stream: bool) -> Value {
    json!({
        "model": "demo-internvl",
        "messages": [{"role": "user", "content": "你好"}],
        "max_tokens": 12,
        "ignore_eos": true,
        "stream": stream,
    })
}

#[tokio::test]
async fn a_failed_forward_mid_stream_ends_the_stream_with_an_error_event() {
    // Forward 0 is the prefill, 1..=4 decode steps: the fifth forward fails.
    let (url, state, calls) = start(4).await;
    let client = reqwest::Client::new();
    let body = post(&client, &url, &request(true)).await;
    assert_eq!(body.status(), 200);
    let text = body.text().await.unwrap();
    let events: Vec<Value> = sse_data(&text)
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let (last, chunks) = events.split_last().unwrap();
    let tokens = chunks
        .iter()
        .filter(|c| c["choices"][0]["delta"]["content"].is_string())
        .count();
    assert!(tokens >= 3, "the tokens before the failure arrive: {text}");
    assert_eq!(last["error"]["type"], "server_error", "{text}");
    // The failure's detail goes to the log; the client is told plainly, with the request id.
    let message = last["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("failed to complete the request"),
        "{message}"
    );
    assert!(!message.contains("injected device failure"), "{message}");
    assert!(
        text.trim_end().ends_with("data: [DONE]"),
        "[DONE] follows the error event, as vLLM sends it: {text}"
    );
    assert!(calls.load(Ordering::SeqCst) >= 5);

    // Everything was freed, and the next request is served normally.
    assert_eq!(blocks_used_settled(&state).await, 0);
    let next = json_body(post(&client, &url, &request(false)).await).await;
    assert_eq!(next["choices"][0]["finish_reason"], "length", "{next}");
    assert_eq!(next["usage"]["completion_tokens"], 12);
}

#[tokio::test]
async fn a_failed_forward_gives_a_non_streaming_request_a_500() {
    let (url, state, _) = start(2).await;
    let response = post(&reqwest::Client::new(), &url, &request(false)).await;
    assert_eq!(response.status(), 500);
    let error = json_body(response).await;
    assert_eq!(error["error"]["type"], "server_error", "{error}");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("failed to complete the request"),
        "{message}"
    );
    assert!(!message.contains("injected device failure"), "{message}");
    assert_eq!(blocks_used_settled(&state).await, 0);
}
