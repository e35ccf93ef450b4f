//! What every handler shares: the model once loaded, the engine, limits and metrics; and the
//! [`Refusal`]s of a request it cannot take now, which the API answers with their statuses.

use crate::images::ImageFetcher;
use crate::metrics::Metrics;
use crate::service::Service;
use crate::settings::AllowedOrigins;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Why a request cannot go on now; the API answers each with its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    ShuttingDown,
    /// The reason is in the log only: it names files of the host.
    LoadFailed,
    Loading,
    /// Every place among the admitted requests is taken.
    QueueFull,
    /// Images of other requests hold all the memory set aside for images.
    ImageMemoryFull,
    /// Tokenization panicked: a failure of ours, with its detail for the log.
    TokenizerCrashed(String),
}

/// Request limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max_images_per_request: usize,
    /// Requests admitted at once: the engine's sequences plus the queue behind them.
    pub max_active_requests: usize,
    pub max_body_bytes: usize,
    /// Most bytes of text in one prompt (all messages, or `/tokenize`'s `prompt`), checked
    /// before tokenizing.
    pub max_prompt_bytes: usize,
    /// Most bytes of image files one request may fetch, all its images together.
    pub max_request_image_bytes: usize,
    /// Image memory of all requests together: see [`AppState::reserve_image_memory`].
    pub max_image_memory: usize,
    pub api_keys: Vec<String>,
    /// Web origins whose pages may call the API (CORS).
    pub allowed_origins: AllowedOrigins,
}

pub struct AppState {
    pub model_name: String,
    /// The model and its engine, once loading is done.
    pub ready: OnceLock<Service>,
    /// Set when the model failed to load. The reason goes to the log only: it names files of
    /// the host and may carry a backtrace, which clients must not see.
    pub failed: OnceLock<()>,
    pub limits: Limits,
    pub fetcher: ImageFetcher,
    pub metrics: Metrics,
    /// Image decodes in flight, bounded so preprocessing cannot take every blocking thread.
    pub preprocess_slots: Arc<Semaphore>,
    /// Tokenizations in flight, bounded like `preprocess_slots` and apart from them, so that
    /// long prompts can neither take every blocking thread nor wait behind image decodes.
    tokenize_slots: Arc<Semaphore>,
    /// Compressed bodies being inflated, bounded like `preprocess_slots`: a bomb costs a
    /// fifth of a second of CPU per 64 MiB it inflates to.
    pub inflate_slots: Arc<Semaphore>,
    /// KiB of image memory not reserved by any request.
    image_memory: Arc<Semaphore>,
    /// All of `image_memory`, in KiB.
    image_memory_kib: usize,
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

/// Image memory reserved by one request, given back when dropped. Held with the request's
/// [`Admission`] for as long as its images' bytes or pixels may live.
pub struct ImageReservation {
    permit: Option<OwnedSemaphorePermit>,
}

impl ImageReservation {
    /// Gives back all but `bytes` of the reservation, once less is held than was reserved.
    pub fn shrink_to(&mut self, bytes: usize) {
        if let Some(permit) = &mut self.permit {
            let surplus = permit.num_permits().saturating_sub(bytes.div_ceil(1024));
            if surplus == permit.num_permits() {
                self.permit = None;
            } else {
                drop(permit.split(surplus));
            }
        }
    }
}

impl AppState {
    pub fn new(
        model_name: String,
        limits: Limits,
        fetcher: ImageFetcher,
        preprocess_workers: usize,
    ) -> Self {
        // At most u32::MAX KiB (4 TiB): a reservation is taken as one `u32` count of permits.
        let image_memory_kib = limits
            .max_image_memory
            .div_ceil(1024)
            .min(u32::MAX as usize);
        AppState {
            metrics: Metrics::new(&model_name),
            model_name,
            ready: OnceLock::new(),
            failed: OnceLock::new(),
            limits,
            fetcher,
            preprocess_slots: Arc::new(Semaphore::new(preprocess_workers.max(1))),
            tokenize_slots: Arc::new(Semaphore::new(preprocess_workers.max(1))),
            inflate_slots: Arc::new(Semaphore::new(preprocess_workers.max(1))),
            image_memory: Arc::new(Semaphore::new(image_memory_kib)),
            image_memory_kib,
            active: AtomicUsize::new(0),
            shutting_down: AtomicBool::new(false),
        }
    }

    /// The model, or why requests cannot be served now.
    pub fn ready(&self) -> Result<&Service, Refusal> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(Refusal::ShuttingDown);
        }
        if self.failed.get().is_some() {
            return Err(Refusal::LoadFailed);
        }
        self.ready.get().ok_or(Refusal::Loading)
    }

    /// Admits one more request, or refuses it at once when the queue is full.
    pub fn admit(self: &Arc<Self>) -> Result<Admission, Refusal> {
        let limit = self.limits.max_active_requests;
        self.active
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < limit).then_some(n + 1)
            })
            .map_err(|_| Refusal::QueueFull)?;
        Ok(Admission {
            state: self.clone(),
        })
    }

    /// Runs `work` (tokenization: up to a second of CPU for the longest prompts) on the
    /// blocking pool, a bounded number at a time, so that the async workers keep answering
    /// every other route meanwhile.
    pub async fn tokenize<T, E>(
        self: &Arc<Self>,
        work: impl FnOnce(&Service) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<Refusal> + Send + 'static,
    {
        let slot = self
            .tokenize_slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Refusal::ShuttingDown)?;
        let state = self.clone();
        // The slot goes with the work: a client that leaves cannot free it while it runs.
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            work(state.ready()?)
        })
        .await
        .map_err(|e| Refusal::TokenizerCrashed(e.to_string()))?
    }

    /// Reserves `bytes` of image memory (fetched files, and pixels held until the request
    /// ends) among all requests, or refuses at once when the rest is reserved, as
    /// [`AppState::admit`] does when the queue is full. A reservation larger than the whole
    /// budget takes the whole budget: such a request runs when no other holds image memory.
    pub fn reserve_image_memory(&self, bytes: usize) -> Result<ImageReservation, Refusal> {
        let kib = bytes.div_ceil(1024).min(self.image_memory_kib);
        if kib == 0 {
            return Ok(ImageReservation { permit: None });
        }
        let permits = u32::try_from(kib).unwrap_or(u32::MAX);
        let permit = self
            .image_memory
            .clone()
            .try_acquire_many_owned(permits)
            .map_err(|_| Refusal::ImageMemoryFull)?;
        Ok(ImageReservation {
            permit: Some(permit),
        })
    }

    pub fn active_requests(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::ImageFetchConfig;

    fn state(max_image_memory: usize) -> AppState {
        let limits = Limits {
            max_images_per_request: 8,
            max_active_requests: 8,
            max_body_bytes: 1 << 20,
            max_prompt_bytes: 1 << 10,
            max_request_image_bytes: 1 << 20,
            max_image_memory,
            api_keys: Vec::new(),
            allowed_origins: AllowedOrigins::None,
        };
        let fetcher = ImageFetcher::new(ImageFetchConfig::default()).unwrap();
        AppState::new("m".into(), limits, fetcher, 1)
    }

    #[test]
    fn image_memory_is_reserved_shrunk_and_given_back() {
        let s = state(4 << 10);
        let mut first = s.reserve_image_memory(3000).unwrap();
        let refused = s.reserve_image_memory(2 << 10).err().unwrap();
        assert_eq!(refused, Refusal::ImageMemoryFull);
        first.shrink_to(1000);
        let second = s.reserve_image_memory(2 << 10).unwrap();
        assert!(s.reserve_image_memory(2 << 10).is_err());
        drop(second);
        first.shrink_to(0);
        // Larger than the budget: the whole budget, once nothing else holds any.
        let whole = s.reserve_image_memory(1 << 30).unwrap();
        assert!(s.reserve_image_memory(1).is_err());
        drop(whole);
        assert!(s.reserve_image_memory(4 << 10).is_ok());
        assert!(
            s.reserve_image_memory(0).is_ok(),
            "no images, nothing to reserve"
        );
    }
}
