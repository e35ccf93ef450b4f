//! A model failure in the middle of a generation, over real HTTP: the streaming client gets
//! an OpenAI error event after the tokens it already had, then `[DONE]`; the non-streaming one
//! a 500 with OpenAI error JSON; every KV block comes back, and the next request is served
//! normally.

use internvl_model::LoadedModel;
use internvl_scheduler::{Engine, EngineConfig, ForwardSeq, ModelRunner, RunnerError};
use internvl_server::api::routes::router;
use internvl_server::runner::{CandleRunner, TokenizerDecoder};
use internvl_server::serve::app_state;
use internvl_server::settings::{ServeArgs, Settings};
use internvl_server::state::{AppState, Ready};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

/// The demo model, whose forward fails once: the call numbered `fail_at` (from 0).
struct FailOnce {
    inner: CandleRunner,
    calls: Arc<AtomicUsize>,
    fail_at: usize,
}

impl ModelRunner for FailOnce {
    type Pixels = <CandleRunner as ModelRunner>::Pixels;
    type ImageEmbeds = <CandleRunner as ModelRunner>::ImageEmbeds;

    fn encode_images(
        &mut self,
        images: &[&Self::Pixels],
    ) -> Result<Vec<Self::ImageEmbeds>, RunnerError> {
        self.inner.encode_images(images)
    }

    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }

    fn embeds_bytes(&self, embeds: &Self::ImageEmbeds) -> usize {
        self.inner.embeds_bytes(embeds)
    }

    fn forward(
        &mut self,
        batch: &[ForwardSeq<'_, Self::ImageEmbeds>],
    ) -> Result<Vec<Vec<f32>>, RunnerError> {
        if self.calls.fetch_add(1, Ordering::SeqCst) == self.fail_at {
            return Err(RunnerError("injected device failure".into()));
        }
        self.inner.forward(batch)
    }
}

fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// A server whose model fails on its `fail_at`-th forward; returns its address and state.
async fn start(fail_at: usize) -> (String, Arc<AppState>, Arc<AtomicUsize>) {
    let args = ServeArgs {
        model: Some(root().join("models/demo-internvl")),
        ..ServeArgs::default()
    };
    let settings = Settings::resolve(args, PathBuf::new()).unwrap();
    let state = app_state(&settings).unwrap();
    let loaded = LoadedModel::load(&settings.model, &candle_core::Device::Cpu, None).unwrap();
    let (blocks, block_size) = (64, 16);
    let calls = Arc::new(AtomicUsize::new(0));
    let runner = FailOnce {
        inner: CandleRunner::new(loaded.model.clone(), blocks, block_size).unwrap(),
        calls: calls.clone(),
        fail_at,
    };
    let decoder = Arc::new(TokenizerDecoder(loaded.tokenizer.clone()));
    let config = EngineConfig::new(blocks, block_size, 1024);
    let engine = Engine::start(runner, config, decoder).unwrap();
    let ready = Ready {
        loaded,
        engine,
        max_model_len: 1024,
    };
    assert!(state.ready.set(ready).is_ok());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = router(state.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/v1/chat/completions"), state, calls)
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

async fn post(client: &reqwest::Client, url: &str, body: &Value) -> reqwest::Response {
    client
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

async fn json_body(response: reqwest::Response) -> Value {
    serde_json::from_slice(&response.bytes().await.unwrap()).unwrap()
}

/// KV blocks in use once the engine has published the step that ended the request: the
/// client hears of the failure during that step, the counters follow at its end.
async fn blocks_used_after_step(state: &AppState) -> usize {
    let engine = &state.ready.get().unwrap().engine;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let used = engine.stats().blocks_used;
        if used == 0 || Instant::now() > deadline {
            return used;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_failed_forward_mid_stream_ends_the_stream_with_an_error_event() {
    // Forward 0 is the prefill, 1..=4 decode steps: the fifth forward fails.
    let (url, state, calls) = start(4).await;
    let client = reqwest::Client::new();
    let body = post(&client, &url, &request(true)).await;
    assert_eq!(body.status(), 200);
    let text = body.text().await.unwrap();
    let events: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
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
    assert_eq!(blocks_used_after_step(&state).await, 0);
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
    assert_eq!(blocks_used_after_step(&state).await, 0);
}
