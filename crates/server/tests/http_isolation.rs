//! One request cannot fail the others, over real HTTP on the demo checkpoint: a request with
//! limits of 2^64 − 1 is refused with a 400 while eight streams complete normally, and a
//! request whose tokens make the model fail gets its error alone while the eight streams it
//! was batched with complete with exactly the tokens they yield alone.

mod common;

use common::{blocks_used_settled, json_body, post, sse_data, Faulty, MODEL};
use internvl_model::prompt::{ChatMessage, Part, Role};
use internvl_model::LoadedModel;
use internvl_scheduler::{ForwardSeq, ModelRunner, RunnerError};
use internvl_server::runner::CandleRunner;
use internvl_server::state::AppState;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Tokens each of the eight streams generates: enough that they are still decoding when the
/// ninth request arrives.
const STREAM_TOKENS: u64 = 160;
const NORMAL_TEXT: &str = "你好";
const POISON_TEXT: &str = "zebra quartz xylophone jukebox";

/// The demo model, failing every forward whose batch holds a sequence with `poison` among
/// its tokens (a model fault caused by one sequence's input); `shared_a_batch` is set when a
/// failing batch held other sequences too: the case under test.
fn poisoned(inner: CandleRunner, poison: Vec<u32>, shared_a_batch: Arc<AtomicBool>) -> Faulty {
    Faulty::new(inner, move |batch| {
        let poisoned = |s: &ForwardSeq<'_, _>| s.tokens.windows(poison.len()).any(|w| w == poison);
        if batch.iter().any(poisoned) {
            if batch.len() > 1 {
                shared_a_batch.store(true, Ordering::SeqCst);
            }
            return Some(RunnerError(
                "injected failure of a poisoned sequence".into(),
            ));
        }
        None
    })
}

fn user(text: &str) -> Vec<ChatMessage> {
    vec![ChatMessage {
        role: Role::User,
        parts: vec![Part::Text(text.into())],
    }]
}

/// Three consecutive tokens of the poisoned prompt that the normal prompt lacks: a forward
/// over generated tokens (one at a time) can never hold them.
fn poison_window(loaded: &LoadedModel) -> Vec<u32> {
    let normal = loaded.encode_prompt(&user(NORMAL_TEXT)).unwrap().ids;
    let poisoned = loaded.encode_prompt(&user(POISON_TEXT)).unwrap().ids;
    poisoned
        .windows(3)
        .find(|w| !normal.windows(3).any(|n| n == *w))
        .expect("the poisoned prompt has tokens of its own")
        .to_vec()
}

/// A server on the demo model behind `router`, its engine over `runner`; its chat URL and
/// state.
async fn start_with<R>(
    runner: impl FnOnce(&LoadedModel, CandleRunner) -> R,
) -> (String, Arc<AppState>)
where
    R: ModelRunner<
        Pixels = <CandleRunner as ModelRunner>::Pixels,
        ImageEmbeds = <CandleRunner as ModelRunner>::ImageEmbeds,
    >,
{
    let (base, state) = common::serve_engine(256, runner).await;
    (format!("{base}/v1/chat/completions"), state)
}

fn chat(text: &str, stream: bool, max_tokens: u64) -> Value {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "ignore_eos": true,
        "temperature": 0,
        "stream": stream,
    })
}

/// What `NORMAL_TEXT` yields, not streamed and alone: the text the eight streams must match.
async fn alone(client: &reqwest::Client, url: &str) -> String {
    let alone = json_body(post(client, url, &chat(NORMAL_TEXT, false, STREAM_TOKENS)).await).await;
    alone["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A streamed answer: its text, its finish reason, and whether it ended in an error event.
#[derive(Debug)]
struct Streamed {
    text: String,
    finish: Option<String>,
    errors: Vec<Value>,
    done: bool,
}

/// Opens a stream; `first` is told once its first content chunk arrived (the request is then
/// decoding in the engine).
async fn stream(
    client: reqwest::Client,
    url: String,
    body: Value,
    first: tokio::sync::mpsc::Sender<()>,
) -> Streamed {
    let mut response = post(&client, &url, &body).await;
    assert_eq!(response.status(), 200);
    let mut raw = String::new();
    let mut told = false;
    while let Some(chunk) = response.chunk().await.unwrap() {
        raw.push_str(&String::from_utf8_lossy(&chunk));
        if !told && raw.contains("\"content\":\"") && raw.matches("data: ").count() > 1 {
            told = true;
            let _ = first.send(()).await;
        }
    }
    let mut out = Streamed {
        text: String::new(),
        finish: None,
        errors: Vec::new(),
        done: false,
    };
    for data in sse_data(&raw) {
        if data == "[DONE]" {
            out.done = true;
            continue;
        }
        let event: Value = serde_json::from_str(data).unwrap();
        if event.get("error").is_some() {
            out.errors.push(event);
            continue;
        }
        if let Some(choice) = event["choices"].get(0) {
            if let Some(text) = choice["delta"]["content"].as_str() {
                out.text.push_str(text);
            }
            if let Some(reason) = choice["finish_reason"].as_str() {
                out.finish = Some(reason.into());
            }
        }
    }
    out
}

/// Starts eight streams of `NORMAL_TEXT` and waits until each is decoding.
async fn eight_streams(
    client: &reqwest::Client,
    url: &str,
) -> Vec<tokio::task::JoinHandle<Streamed>> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(8);
    let streams: Vec<_> = (0..8)
        .map(|_| {
            tokio::spawn(stream(
                client.clone(),
                url.to_string(),
                chat(NORMAL_TEXT, true, STREAM_TOKENS),
                tx.clone(),
            ))
        })
        .collect();
    for _ in 0..8 {
        tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .expect("every stream starts");
    }
    streams
}

#[tokio::test]
async fn limits_of_two_to_the_64_are_refused_while_eight_streams_complete() {
    let (url, state) = start_with(|_, runner| runner).await;
    let client = reqwest::Client::new();
    let expected = alone(&client, &url).await;

    let streams = eight_streams(&client, &url).await;
    let huge = u64::MAX;
    for (field, extra) in [
        ("max_tokens", json!({"max_tokens": huge})),
        (
            "max_completion_tokens",
            json!({"max_completion_tokens": huge}),
        ),
        ("min_tokens", json!({"max_tokens": 16, "min_tokens": huge})),
    ] {
        let mut body = chat(NORMAL_TEXT, true, 16);
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let response = post(&client, &url, &body).await;
        let status = response.status();
        let text = response.text().await.unwrap();
        assert_eq!(status, 400, "{field} = 2^64 - 1: {text}");
        let error: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(error["error"]["type"], "invalid_request_error", "{text}");
        assert!(error["error"]["message"].is_string(), "{text}");
    }
    for s in streams {
        let s = s.await.unwrap();
        assert!(s.errors.is_empty(), "{s:?}");
        assert_eq!(s.finish.as_deref(), Some("length"));
        assert!(s.done);
        assert_eq!(s.text, expected);
    }
    assert_eq!(blocks_used_settled(&state).await, 0);
}

#[tokio::test]
async fn a_request_that_makes_the_model_fail_fails_alone() {
    let shared_a_batch = Arc::new(AtomicBool::new(false));
    let flag = shared_a_batch.clone();
    let (url, state) =
        start_with(move |loaded, inner| poisoned(inner, poison_window(loaded), flag)).await;
    let client = reqwest::Client::new();
    let expected = alone(&client, &url).await;

    let streams = eight_streams(&client, &url).await;
    let poisoned = post(&client, &url, &chat(POISON_TEXT, false, 16)).await;
    assert_eq!(poisoned.status(), 500);
    let error = json_body(poisoned).await;
    assert_eq!(error["error"]["type"], "server_error", "{error}");
    for s in streams {
        let s = s.await.unwrap();
        assert!(s.errors.is_empty(), "an innocent stream failed: {s:?}");
        assert_eq!(s.finish.as_deref(), Some("length"));
        assert!(s.done);
        assert_eq!(s.text, expected, "the same tokens as alone");
    }
    assert!(
        shared_a_batch.load(Ordering::SeqCst),
        "the poisoned request was batched with the streams"
    );
    assert_eq!(blocks_used_settled(&state).await, 0);
    let stats = state.ready.get().unwrap().engine.stats();
    assert_eq!(stats.failed, 1, "{stats:?}");
}
