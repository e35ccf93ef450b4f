//! Helpers shared by the server's integration tests: the demo checkpoint, image `data:` URLs,
//! `serve()` on a 127.0.0.1 port, `/metrics` samples, streamed bodies, and an engine whose
//! model fails where a test says.

// Every test binary compiles this module on its own (`mod common;`) and uses only part of it;
// without this, each would warn (an error under clippy's `-D warnings`) about the parts it
// leaves alone. The usual pattern for shared integration-test helpers.
#![allow(dead_code)]

use base64::Engine as _;
use internvl_model::{AttentionChoice, LoadedModel};
use internvl_scheduler::{ForwardSeq, ModelRunner, RunnerError};
use internvl_server::api::routes::router;
use internvl_server::runner::CandleRunner;
use internvl_server::serve::{app_state, serve};
use internvl_server::service::kv_cache::KvCacheSize;
use internvl_server::service::model::{ModelSource, Progress};
use internvl_server::service::{EngineShape, Service};
use internvl_server::settings::{ServeArgs, Settings};
use internvl_server::state::AppState;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The name the demo checkpoint is served under.
pub const MODEL: &str = "demo-internvl";

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// The demo checkpoint's directory.
pub fn demo_model() -> PathBuf {
    root().join("models/demo-internvl")
}

/// The demo checkpoint on the CPU, in its default precision.
pub fn demo_source() -> ModelSource {
    ModelSource {
        dir: demo_model(),
        random_weights: None,
        device: candle_core::Device::Cpu,
        dtype: None,
        attention: AttentionChoice::Auto,
        quantization: Default::default(),
        kv_dtype: None,
    }
}

/// A base64 `data:` URL of `bytes` as `media_type`.
pub fn data_url(media_type: &str, bytes: &[u8]) -> String {
    format!(
        "data:{media_type};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// A `data:` URL of `tests/fixtures/images/<file>` as `media_type`.
pub fn fixture_data_url(file: &str, media_type: &str) -> String {
    let bytes = std::fs::read(root().join("tests/fixtures/images").join(file)).unwrap();
    data_url(media_type, &bytes)
}

/// `serve()` arguments for the demo checkpoint with a 16 MiB KV cache.
pub fn demo_args() -> ServeArgs {
    ServeArgs {
        model: Some(demo_model()),
        kv_cache_memory: Some("16MiB".into()),
        ..ServeArgs::default()
    }
}

/// What [`Server::wait_for_health`] waits for.
#[derive(Clone, Copy)]
pub enum Wait {
    /// `/health` answers 200: the model has loaded.
    Healthy,
    /// 200, or a 503 whose body says the model failed to load (tests of that failure).
    HealthyOrLoadFailed,
}

/// `serve()` on a 127.0.0.1 port in this process; dropped, it shuts down (its stop sender
/// goes with it).
pub struct Server {
    pub addr: SocketAddr,
    /// The client the helpers here ask with.
    pub client: reqwest::Client,
    /// Sent (or dropped), the server drains and stops.
    pub stop: Option<oneshot::Sender<()>>,
    pub serving: JoinHandle<anyhow::Result<()>>,
}

impl Server {
    /// Starts `serve()` with `args` on a fresh port; returns at once, the model still loading.
    pub async fn spawn(args: ServeArgs, client: reqwest::Client) -> Server {
        let settings = Settings::resolve(args, PathBuf::new()).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let serving = tokio::spawn(serve(settings, listener, async move {
            let _ = stopped.await;
        }));
        Server {
            addr,
            client,
            stop: Some(stop),
            serving,
        }
    }

    /// [`Server::spawn`], then waits with `client` until `/health` says `wait`.
    pub async fn spawn_and_wait(args: ServeArgs, client: reqwest::Client, wait: Wait) -> Server {
        let server = Server::spawn(args, client).await;
        server.wait_for_health(&server.client, wait).await;
        server
    }

    /// Asks `/health` with `client` every 25 ms, 800 times at most, until it says `wait`.
    pub async fn wait_for_health(&self, client: &reqwest::Client, wait: Wait) {
        for _ in 0..800 {
            if let Ok(r) = client.get(self.url("/health")).send().await {
                if r.status() == 200
                    || matches!(wait, Wait::HealthyOrLoadFailed)
                        && r.status() == 503
                        && get_json(client, &self.url("/health"))
                            .await
                            .1
                            .to_string()
                            .contains("failed to load")
                {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the server did not become ready");
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// GET `path`: its status and JSON body (Null when it is not JSON).
    pub async fn get(&self, path: &str) -> (u16, Value) {
        get_json(&self.client, &self.url(path)).await
    }

    /// POSTs `body` as JSON to `path`.
    pub async fn send(&self, path: &str, body: &Value) -> reqwest::Response {
        post(&self.client, &self.url(path), body).await
    }

    /// The first sample of `name` in `/metrics`.
    pub async fn metric(&self, name: &str) -> f64 {
        self.labelled_metric(name, "").await
    }

    /// The first sample of `name` in `/metrics` whose line includes `label` (such as
    /// `finished_reason="abort"`).
    pub async fn labelled_metric(&self, name: &str, label: &str) -> f64 {
        let text = self
            .client
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        sample(&text, name, label).unwrap_or_else(|| panic!("no metric {name}"))
    }
}

/// The value of the first line of Prometheus `text` that starts with `name` and includes
/// `label`.
pub fn sample(text: &str, name: &str, label: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l.contains(label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// GET `url`: its status and JSON body (Null when it is not JSON).
pub async fn get_json(client: &reqwest::Client, url: &str) -> (u16, Value) {
    let r = client.get(url).send().await.unwrap();
    let status = r.status().as_u16();
    let bytes = r.bytes().await.unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// POSTs `body` as JSON to `url`.
pub async fn post(client: &reqwest::Client, url: &str, body: &Value) -> reqwest::Response {
    client
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

/// The body of `response`, as JSON.
pub async fn json_body(response: reqwest::Response) -> Value {
    serde_json::from_slice(&response.bytes().await.unwrap()).unwrap()
}

/// The `data:` payloads of an event stream, `[DONE]` included.
pub fn sse_data(text: &str) -> impl Iterator<Item = &str> {
    text.lines().filter_map(|l| l.strip_prefix("data: "))
}

/// Appends what is left of `response`'s body to `text`, each chunk decoded on its own
/// (lossily); returns how many `"content":` fields those chunks held.
pub async fn read_rest(response: &mut reqwest::Response, text: &mut String) -> usize {
    let mut contents = 0;
    while let Some(chunk) = response.chunk().await.unwrap() {
        let chunk = String::from_utf8_lossy(&chunk);
        contents += chunk.matches("\"content\":").count();
        text.push_str(&chunk);
    }
    contents
}

type Embeds = <CandleRunner as ModelRunner>::ImageEmbeds;
type Fault = Box<dyn FnMut(&[ForwardSeq<'_, Embeds>]) -> Option<RunnerError> + Send>;

/// The demo model's runner, whose forward fails wherever `fault` finds fault with its batch;
/// everything else is the model's own.
pub struct Faulty {
    inner: CandleRunner,
    fault: Fault,
}

impl Faulty {
    /// `inner`, failing each forward for which `fault` returns an error.
    pub fn new(
        inner: CandleRunner,
        fault: impl FnMut(&[ForwardSeq<'_, Embeds>]) -> Option<RunnerError> + Send + 'static,
    ) -> Faulty {
        Faulty {
            inner,
            fault: Box::new(fault),
        }
    }
}

impl ModelRunner for Faulty {
    type Pixels = <CandleRunner as ModelRunner>::Pixels;
    type ImageEmbeds = Embeds;

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
        if let Some(error) = (self.fault)(batch) {
            return Err(error);
        }
        self.inner.forward(batch)
    }
}

/// The app state of the demo checkpoint's settings, its model not loaded.
pub fn demo_state() -> Arc<AppState> {
    let args = ServeArgs {
        model: Some(demo_model()),
        ..ServeArgs::default()
    };
    app_state(&Settings::resolve(args, PathBuf::new()).unwrap()).unwrap()
}

/// Serves `app` on a fresh 127.0.0.1 port; returns its base URL.
pub async fn serve_app(app: axum::Router) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

/// A server on the demo model behind `router`, its engine (`blocks` KV blocks of 16 tokens,
/// 1024 tokens a sequence) over the runner `runner` makes of the model's own; its base URL and
/// state.
pub async fn serve_engine<R>(
    blocks: usize,
    runner: impl FnOnce(&LoadedModel, CandleRunner) -> R,
) -> (String, Arc<AppState>)
where
    R: ModelRunner<Pixels = <CandleRunner as ModelRunner>::Pixels, ImageEmbeds = Embeds>,
{
    let state = demo_state();
    let loaded = demo_source().load(Progress::Quiet).unwrap();
    let shape = EngineShape {
        block_size: 16,
        max_model_len: Some(1024),
        kv_cache: KvCacheSize::Blocks(blocks),
    };
    let ready = Service::start_with(loaded, &shape, |_| {}, runner).unwrap();
    assert!(state.ready.set(ready).is_ok());
    let base = serve_app(router(state.clone())).await;
    (base, state)
}

/// KV blocks in use once the engine has caught up: it has published the step that ended the
/// requests (a client hears of a failure during that step, the counters follow at its end).
/// Polled every 10 ms for at most 10 s.
pub async fn blocks_used_settled(state: &AppState) -> usize {
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
