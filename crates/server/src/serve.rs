//! `internvl serve`: load the model, run the engine, answer HTTP until told to stop.

use crate::api::routes::router;
use crate::connections::{self, ConnectionLimits, InFlight};
use crate::device::{parse_device, parse_dtype};
use crate::images::{ImageFetchConfig, ImageFetcher};
use crate::loading::load_model;
use crate::runner::{CandleRunner, TokenizerDecoder};
use crate::settings::{KvCacheMemory, Settings};
use crate::state::{AppState, Limits, Ready};
use anyhow::{bail, Context};
use internvl_model::preprocess::DecodeLimits;
use internvl_model::weights::{LoadProgress, ProgressFn};
use internvl_model::PagedKvCache;
use internvl_scheduler::{Engine, EngineConfig};
use std::future::Future;
use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::Mutex;
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
    };
    Ok(Arc::new(AppState::new(
        settings.served_model_name.clone(),
        limits,
        fetcher,
        settings.preprocess_workers,
    )))
}

/// Loads the checkpoint and starts the engine: minutes for the real model.
pub fn load(settings: &Settings) -> anyhow::Result<Ready> {
    let device = parse_device(&settings.device)?;
    let dtype = parse_dtype(&settings.dtype)?;
    if settings.using_demo && settings.random_weights.is_none() {
        tracing::warn!(
            model = %settings.model.display(),
            "no --model given: serving the bundled demo checkpoint (random weights, meaningless answers)"
        );
    }
    let started = Instant::now();
    tracing::info!(model = %settings.model.display(), "loading");
    let mut loaded = load_model(
        &settings.model,
        settings.random_weights.as_deref(),
        &device,
        dtype,
        internvl_model::AttentionChoice::Auto,
        Some(load_progress()),
    )?;
    if std::io::stderr().is_terminal() {
        eprintln!();
    }
    loaded.preprocess.limits = DecodeLimits {
        max_pixels: settings.max_image_pixels,
        max_bytes: settings.max_image_bytes,
    };
    let config = loaded.model.config();
    let positions = config.llm.max_position_embeddings;
    let max_model_len = settings.max_model_len.unwrap_or(positions);
    if max_model_len > positions {
        bail!("max_model_len {max_model_len} exceeds the model's {positions} positions");
    }
    let block_size = settings.block_size;
    let per_block = PagedKvCache::bytes_per_block(&config.llm, block_size, loaded.model.dtype());
    // Saturating: both are settings, and any product past usize::MAX caps nothing.
    let useful = settings
        .max_num_seqs
        .saturating_mul(max_model_len.div_ceil(block_size));
    // 30 GiB leaves an 80 GB GPU room for V1.1's 38 GB of weights and activations.
    let kv_bytes = match settings.kv_cache_memory {
        Some(KvCacheMemory::Bytes(bytes)) => bytes,
        Some(KvCacheMemory::Fraction(fraction)) => {
            (available_memory(&device)? as f64 * fraction) as u64
        }
        None if device.is_cpu() => 1 << 30,
        None => 30 << 30,
    };
    let num_blocks = ((kv_bytes / per_block as u64) as usize).min(useful);
    if num_blocks < max_model_len.div_ceil(block_size) {
        bail!(
            "kv_cache_memory ({} bytes) holds {num_blocks} blocks of {block_size} tokens, less \
             than one sequence of max_model_len {max_model_len}: raise kv_cache_memory or lower \
             max_model_len",
            kv_bytes
        );
    }
    let mut engine_config = EngineConfig::new(num_blocks, block_size, max_model_len);
    engine_config.max_num_seqs = settings.max_num_seqs;
    engine_config.max_num_batched_tokens = settings.max_num_batched_tokens;
    engine_config.enable_prefix_caching = settings.enable_prefix_caching;
    engine_config.max_images_per_step = settings.max_images_per_step;
    engine_config.max_buffered_output_bytes = settings.max_buffered_output_bytes;
    let runner = CandleRunner::new(loaded.model.clone(), num_blocks, block_size)?;
    let decoder = Arc::new(TokenizerDecoder(loaded.tokenizer.clone()));
    let engine = Engine::start(runner, engine_config, decoder).map_err(anyhow::Error::msg)?;
    tracing::info!(
        seconds = started.elapsed().as_secs_f64(),
        kv_blocks = num_blocks,
        kv_bytes = num_blocks * per_block,
        max_model_len,
        "model ready"
    );
    Ok(Ready {
        loaded,
        engine,
        max_model_len,
    })
}

/// Memory the KV cache could take now (the weights already loaded): the GPU's free memory on
/// CUDA, the system's available memory on CPU.
fn available_memory(device: &candle_core::Device) -> anyhow::Result<u64> {
    if !device.is_cpu() {
        let (free, _total) = crate::device::memory_info(device).context(
            "could not read the device's free memory for kv_cache_memory as a fraction: give \
             bytes, e.g. 30GiB",
        )?;
        return Ok(free as u64);
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .context("no MemAvailable in /proc/meminfo")
}

/// Shows loading progress: a live line on a terminal, a log line every few seconds otherwise.
fn load_progress() -> ProgressFn {
    let terminal = std::io::stderr().is_terminal();
    let last = Mutex::new(Instant::now());
    Box::new(move |p: &LoadProgress| {
        let gb = p.bytes as f64 / 1e9;
        if terminal {
            eprint!(
                "\rloading: shard {}/{}, {} tensors, {gb:.2} GB",
                p.shards_opened, p.shards, p.tensors
            );
        } else if let Ok(mut last) = last.lock() {
            if last.elapsed() >= Duration::from_secs(5) {
                *last = Instant::now();
                tracing::info!(
                    shards_opened = p.shards_opened,
                    shards = p.shards,
                    tensors = p.tensors,
                    gigabytes = gb,
                    "loading"
                );
            }
        }
    })
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
