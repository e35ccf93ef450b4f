//! `internvl serve`: load the model, run the engine, answer HTTP until told to stop.

use crate::api::routes::router;
use crate::connections::{self, ConnectionLimits, InFlight};
use crate::device::{parse_device, parse_dtype};
use crate::images::{ImageFetchConfig, ImageFetcher};
use crate::service::kv_cache::KvCacheSize;
use crate::service::model::{ModelSource, Progress};
use crate::service::{EngineShape, Service};
use crate::settings::Settings;
use crate::state::{AppState, Limits};
use anyhow::Context;
use internvl_model::preprocess::DecodeLimits;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

/// The shared state for `settings`, before the model is loaded.
pub fn app_state(settings: &Settings) -> anyhow::Result<Arc<AppState>> {
    let fetcher = ImageFetcher::new(ImageFetchConfig {
        timeout: Duration::from_secs(settings.image_fetch_timeout),
        max_bytes: settings.max_image_bytes,
        allow_private_networks: settings.allow_private_image_urls,
        allowed_local_dir: settings.local_image_dir.clone(),
        ..ImageFetchConfig::default()
    })
    .context("image fetcher")?;
    let limits = Limits {
        max_images_per_request: settings.max_images_per_request,
        max_active_requests: settings.max_num_seqs + settings.max_queued_requests,
        max_body_bytes: settings.max_body_bytes,
        max_prompt_bytes: settings.max_prompt_bytes,
        max_request_image_bytes: settings.max_request_image_bytes,
        max_image_memory: settings.max_image_memory,
        api_keys: settings.api_keys.clone(),
        allowed_origins: settings.allowed_origins.clone(),
    };
    Ok(Arc::new(AppState::new(
        settings.served_model_name.clone(),
        limits,
        fetcher,
        settings.preprocess_workers,
    )))
}

/// Loads the checkpoint and starts the engine: minutes for the real model.
pub fn load(settings: &Settings) -> anyhow::Result<Service> {
    let source = ModelSource {
        dir: settings.model.clone(),
        random_weights: settings.random_weights.clone(),
        device: parse_device(&settings.device)?,
        dtype: parse_dtype(&settings.dtype)?,
        attention: settings.attention,
        quantization: settings.quantization,
        kv_dtype: settings.kv_cache_dtype,
    };
    if settings.using_demo && settings.random_weights.is_none() {
        tracing::warn!(
            model = %settings.model.display(),
            "no --model given: serving the bundled demo checkpoint (random weights, meaningless answers)"
        );
    }
    let started = Instant::now();
    tracing::info!(model = %settings.model.display(), "loading");
    let mut loaded = source.load(Progress::Shown)?;
    loaded.preprocess.limits = DecodeLimits {
        max_pixels: settings.max_image_pixels,
        max_bytes: settings.max_image_bytes,
    };
    let shape = EngineShape {
        block_size: settings.block_size,
        max_model_len: settings.max_model_len,
        kv_cache: KvCacheSize::Memory {
            budget: settings.kv_cache_memory,
            max_num_seqs: settings.max_num_seqs,
        },
    };
    let service = Service::start(loaded, &shape, |config| {
        config.max_num_seqs = settings.max_num_seqs;
        config.max_num_batched_tokens = settings.max_num_batched_tokens;
        config.enable_prefix_caching = settings.enable_prefix_caching;
        config.max_images_per_step = settings.max_images_per_step;
        config.max_buffered_output_bytes = settings.max_buffered_output_bytes;
    })?;
    tracing::info!(
        seconds = started.elapsed().as_secs_f64(),
        kv_blocks = service.kv_cache.num_blocks(),
        kv_bytes = service.kv_cache.bytes(),
        max_model_len = service.max_model_len,
        "model ready"
    );
    Ok(service)
}

/// Serves on `listener` until `shutdown` resolves, then drains: the port stays open and
/// answers 503 (so probes and balancers see the drain rather than a refused connection),
/// idle connections close at once, and the call returns as soon as no request is in flight,
/// or after `settings.shutdown_timeout` seconds. The model loads in the background meanwhile.
pub async fn serve(
    settings: Settings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let state = app_state(&settings)?;
    let loader_state = state.clone();
    let load_settings = settings.clone();
    tokio::task::spawn_blocking(move || match load(&load_settings) {
        Ok(ready) => {
            let _ = loader_state.ready.set(ready);
        }
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "the model failed to load");
            let _ = loader_state.failed.set(());
        }
    });
    let (drain_tx, drain_rx) = tokio::sync::watch::channel(false);
    let in_flight = InFlight::default();
    let metrics_state = state.clone();
    // Dropped when this function returns, which closes every connection left.
    let accepting = connections::accept(
        listener,
        router(state.clone()),
        ConnectionLimits::new(&settings),
        drain_rx,
        in_flight.clone(),
        move || metrics_state.metrics.observe_connection_refused(),
    );
    tokio::pin!(accepting);
    tokio::select! {
        never = &mut accepting => match never {},
        () = shutdown => {}
    }
    tracing::info!(
        in_flight = in_flight.get(),
        admitted = state.active_requests(),
        "shutting down: draining"
    );
    state.begin_shutdown();
    let _ = drain_tx.send(true);
    let deadline = Duration::from_secs(settings.shutdown_timeout);
    tokio::select! {
        never = &mut accepting => match never {},
        () = in_flight.none_left() => tracing::info!("drained"),
        () = tokio::time::sleep(deadline) => tracing::warn!(
            in_flight = in_flight.get(),
            admitted = state.active_requests(),
            "shutdown deadline passed with requests in flight"
        ),
    }
    tracing::info!("stopped");
    Ok(())
}

/// SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {},
        () = terminate => {},
    }
}

/// The `serve` command.
pub fn run(settings: Settings) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let address = format!("{}:{}", settings.host, settings.port);
        let listener = TcpListener::bind(&address)
            .await
            .with_context(|| format!("cannot listen on {address}"))?;
        tracing::info!(address = %listener.local_addr()?, model = %settings.served_model_name, "listening");
        serve(settings, listener, shutdown_signal()).await
    })
}
