//! Internal errors over real HTTP: the client gets a short plain message naming the request
//! id, never the failure's detail (candle's errors carry backtraces with source paths); the
//! detail and the request's log line go to the log at ERROR, with the request id.

mod common;

use axum::routing::get;
use axum::Router;
use common::{demo_state, serve_app, sse_data, Faulty};
use internvl_scheduler::RunnerError;
use internvl_server::api::routes::with_layers;
use serde_json::{json, Value};
use std::io::Write;
use std::sync::{Mutex, Once};

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

/// What the failure says: a real candle error, with `RUST_BACKTRACE=1` its backtrace.
fn failure() -> String {
    candle_core::Error::Msg("injected device failure".into())
        .bt()
        .to_string()
}

/// A server whose model (the demo model) always fails, every forward with a candle error
/// carrying its backtrace; its base URL.
async fn failing_server() -> String {
    common::serve_engine(64, |_, inner| {
        Faulty::new(inner, |_| Some(RunnerError(failure())))
    })
    .await
    .0
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

/// Asks the server at `base` for a short chat, streamed or not, as request `request_id`.
async fn chat(
    client: &reqwest::Client,
    base: &str,
    request_id: &str,
    stream: bool,
) -> reqwest::Response {
    let body = json!({
        "model": "demo-internvl",
        "messages": [{"role": "user", "content": "你好"}],
        "max_tokens": 4,
        "stream": stream,
    });
    client
        .post(format!("{base}/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("x-request-id", request_id)
        .body(body.to_string())
        .send()
        .await
        .unwrap()
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
    let response = chat(&client, &base, "errors-non-streaming", false).await;
    assert_eq!(response.status(), 500);
    let body = response.text().await.unwrap();
    assert_plain(&body);
    let error: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["error"]["type"], "server_error");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(message.contains("errors-non-streaming"), "{message}");
    assert_logged_at_error("errors-non-streaming", "injected device failure");

    // A stream's error event is as plain, and still names its request.
    let text = chat(&client, &base, "errors-streaming", true)
        .await
        .text()
        .await
        .unwrap();
    let event = sse_data(&text)
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
    assert_eq!(
        error["error"]["code"],
        Value::Null,
        "OpenAI has no code for it"
    );
    assert_logged_at_error("errors-panic", "index out of bounds");
}
