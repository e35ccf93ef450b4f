//! Internal errors over real HTTP: the client gets a short plain message naming the request
//! id, never the failure's detail (candle's errors carry backtraces with source paths); the
//! detail and the request's log line go to the log at ERROR, with the request id.

use axum::routing::get;
use axum::Router;
use internvl_model::LoadedModel;
use internvl_scheduler::{Engine, EngineConfig, ForwardSeq, ModelRunner, RunnerError};
use internvl_server::api::routes::{router, with_layers};
use internvl_server::runner::{CandleRunner, TokenizerDecoder};
use internvl_server::serve::app_state;
use internvl_server::settings::{ServeArgs, Settings};
use internvl_server::state::{AppState, Ready};
use serde_json::{json, Value};
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Once};
use tokio::net::TcpListener;

/// Every log line of this test binary, as JSON.
static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct LogBuffer;

impl Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Captures logs as the server writes them with `--log-format json`, and asks for
/// backtraces, as an operator debugging a failure would.
fn capture_logs() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        std::env::set_var("RUST_BACKTRACE", "1");
        tracing_subscriber::fmt()
            .json()
            .with_max_level(tracing::Level::INFO)
            .with_writer(|| LogBuffer)
            .init();
    });
}

/// The log lines that name `request_id`.
fn logged(request_id: &str) -> Vec<Value> {
    let logs = LOGS.lock().unwrap();
    String::from_utf8_lossy(&logs)
        .lines()
        .filter(|l| l.contains(request_id))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The demo model, whose every forward fails with a candle error carrying its backtrace.
struct Failing {
    inner: CandleRunner,
}

/// What the failure says: a real candle error, with `RUST_BACKTRACE=1` its backtrace.
fn failure() -> String {
    candle_core::Error::Msg("injected device failure".into())
        .bt()
        .to_string()
}

impl ModelRunner for Failing {
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
        _batch: &[ForwardSeq<'_, Self::ImageEmbeds>],
    ) -> Result<Vec<Vec<f32>>, RunnerError> {
        Err(RunnerError(failure()))
    }
}

fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

fn demo_state() -> Arc<AppState> {
    let args = ServeArgs {
        model: Some(root().join("models/demo-internvl")),
        ..ServeArgs::default()
    };
    app_state(&Settings::resolve(args, PathBuf::new()).unwrap()).unwrap()
}

/// Serves `app` on a fresh port; returns its base URL.
async fn serve_app(app: Router) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

/// A server whose model always fails.
async fn failing_server() -> String {
    let state = demo_state();
    let loaded = LoadedModel::load(
        &root().join("models/demo-internvl"),
        &candle_core::Device::Cpu,
        None,
    )
    .unwrap();
    let (blocks, block_size) = (64, 16);
    let runner = Failing {
        inner: CandleRunner::new(loaded.model.clone(), blocks, block_size).unwrap(),
    };
    let decoder = Arc::new(TokenizerDecoder(loaded.tokenizer.clone()));
    let engine =
        Engine::start(runner, EngineConfig::new(blocks, block_size, 1024), decoder).unwrap();
    let ready = Ready {
        loaded,
        engine,
        max_model_len: 1024,
    };
    assert!(state.ready.set(ready).is_ok());
    serve_app(router(state)).await
}

/// Nothing in `body` that only the server's insides know.
fn assert_plain(body: &str) {
    for leak in ["src/", ".rs", "backtrace", "stack", "injected"] {
        assert!(!body.to_lowercase().contains(leak), "`{leak}` in {body}");
    }
    assert!(body.len() < 400, "{} bytes: {body}", body.len());
}

/// The log line of `request_id`'s answer, and the line with the failure's detail.
fn assert_logged_at_error(request_id: &str, detail: &str) {
    let lines = logged(request_id);
    let done = lines
        .iter()
        .find(|l| l["fields"]["message"] == "done")
        .unwrap_or_else(|| panic!("no request log line for {request_id}: {lines:?}"));
    assert_eq!(done["level"], "ERROR", "{done}");
    assert_eq!(done["fields"]["status"], 500, "{done}");
    let failure = lines
        .iter()
        .find(|l| {
            l["fields"]["detail"]
                .as_str()
                .is_some_and(|d| d.contains(detail))
        })
        .unwrap_or_else(|| panic!("no detail logged for {request_id}: {lines:?}"));
    assert_eq!(failure["level"], "ERROR", "{failure}");
    assert_eq!(failure["span"]["request_id"], request_id, "{failure}");
}

fn chat(stream: bool) -> String {
    json!({
        "model": "demo-internvl",
        "messages": [{"role": "user", "content": "你好"}],
        "max_tokens": 4,
        "stream": stream,
    })
    .to_string()
}

#[tokio::test]
async fn a_failed_generation_says_so_plainly_and_logs_the_detail_at_error() {
    capture_logs();
    assert!(
        failure().contains(".rs"),
        "the injected failure must carry a backtrace for this test to mean anything"
    );
    let base = failing_server().await;
    let client = reqwest::Client::new();
    let response = client
        .post(format!("{base}/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("x-request-id", "errors-non-streaming")
        .body(chat(false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 500);
    let body = response.text().await.unwrap();
    assert_plain(&body);
    let error: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["error"]["type"], "server_error");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(message.contains("errors-non-streaming"), "{message}");
    assert_logged_at_error("errors-non-streaming", "injected device failure");

    // A stream's error event is as plain, and still names its request.
    let text = client
        .post(format!("{base}/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("x-request-id", "errors-streaming")
        .body(chat(true))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let event = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .find(|d| d.contains("\"error\""))
        .unwrap_or_else(|| panic!("no error event: {text}"));
    assert_plain(event);
    assert!(event.contains("errors-streaming"), "{event}");
    let detail = logged("errors-streaming")
        .into_iter()
        .find(|l| l["fields"]["detail"].is_string())
        .expect("the stream's failure is logged with its request id");
    assert_eq!(detail["level"], "ERROR");
}

async fn panics() -> &'static str {
    panic!("index out of bounds at crates/server/src/api/chat.rs:1")
}

#[tokio::test]
async fn a_handler_panic_is_a_plain_500_logged_at_error() {
    capture_logs();
    let routes = Router::new().route("/panic", get(panics));
    let base = serve_app(with_layers(routes, demo_state())).await;
    let response = reqwest::Client::new()
        .get(format!("{base}/panic"))
        .header("x-request-id", "errors-panic")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 500);
    assert_eq!(response.headers()["x-request-id"], "errors-panic");
    let body = response.text().await.unwrap();
    assert_plain(&body);
    let error: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["error"]["code"], 500);
    assert_logged_at_error("errors-panic", "index out of bounds");
}
