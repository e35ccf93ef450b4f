//! What every handler shares: the model once loaded, the engine, limits and metrics.

use crate::api::error::ApiError;
use crate::images::ImageFetcher;
use crate::metrics::Metrics;
use internvl_model::preprocess::PixelValues;
use internvl_model::LoadedModel;
use internvl_scheduler::Engine;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use tokio::sync::Semaphore;

/// The model and the engine serving it, available once loading is done.
pub struct Ready {
    pub loaded: LoadedModel,
    pub engine: Engine<PixelValues>,
    pub max_model_len: usize,
}

/// Request limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max_images_per_request: usize,
    /// Requests admitted at once: the engine's sequences plus the queue behind them.
    pub max_active_requests: usize,
    pub max_body_bytes: usize,
    pub api_keys: Vec<String>,
}

pub struct AppState {
    pub model_name: String,
    pub ready: OnceLock<Ready>,
    /// Set when the model failed to load: the reason, for `/health` and every request.
    pub failed: OnceLock<String>,
    pub limits: Limits,
    pub fetcher: ImageFetcher,
    pub metrics: Metrics,
    /// Image decodes in flight, bounded so preprocessing cannot take every blocking thread.
    pub preprocess_slots: Arc<Semaphore>,
    active: AtomicUsize,
    shutting_down: AtomicBool,
}

/// A place among the admitted requests, given back when dropped.
pub struct Admission {
    state: Arc<AppState>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.state.active.fetch_sub(1, Ordering::SeqCst);
    }
}

impl AppState {
    pub fn new(
        model_name: String,
        limits: Limits,
        fetcher: ImageFetcher,
        preprocess_workers: usize,
    ) -> Self {
        AppState {
            metrics: Metrics::new(&model_name),
            model_name,
            ready: OnceLock::new(),
            failed: OnceLock::new(),
            limits,
            fetcher,
            preprocess_slots: Arc::new(Semaphore::new(preprocess_workers.max(1))),
            active: AtomicUsize::new(0),
            shutting_down: AtomicBool::new(false),
        }
    }

    /// The model, or why requests cannot be served now (503).
    pub fn ready(&self) -> Result<&Ready, ApiError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(ApiError::unavailable("The server is shutting down"));
        }
        if let Some(reason) = self.failed.get() {
            return Err(ApiError::unavailable(format!(
                "The model failed to load: {reason}"
            )));
        }
        self.ready
            .get()
            .ok_or_else(|| ApiError::unavailable("The model is still loading"))
    }

    /// Admits one more request, or refuses it at once when the queue is full (429).
    pub fn admit(self: &Arc<Self>) -> Result<Admission, ApiError> {
        let limit = self.limits.max_active_requests;
        self.active
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < limit).then_some(n + 1)
            })
            .map_err(|_| ApiError::queue_full())?;
        Ok(Admission {
            state: self.clone(),
        })
    }

    pub fn active_requests(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }
}
