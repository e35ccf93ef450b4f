//! The step loop on its own thread, and the handle callers submit requests through.

use crate::config::{ConfigError, EngineConfig};
use crate::detokenizer::TokenDecoder;
use crate::output::{channel as event_channel, EventSender, RequestStream};
use crate::request::{ErrorCause, Request};
use crate::runner::ModelRunner;
use crate::scheduler::Scheduler;
use crate::stats::EngineStats;
use crate::validation::{validate, SubmitError};
use std::sync::mpsc::{channel, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// A request on its way to the step thread, with where its events go.
type Submission<P> = (Request<P>, EventSender);

/// Why an engine did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot start the engine thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// A running engine. Dropping it lets the step thread finish the requests it has, then stop.
pub struct Engine<P> {
    submissions: Option<Sender<Submission<P>>>,
    config: EngineConfig,
    /// The runner's logits width, for validating requests at submission.
    vocab_size: usize,
    stats: Arc<Mutex<EngineStats>>,
    thread: Option<JoinHandle<()>>,
}

impl<P: Send + Sync + 'static> Engine<P> {
    /// Starts the step thread, which owns `runner` from now on.
    pub fn start<R: ModelRunner<Pixels = P>>(
        runner: R,
        config: EngineConfig,
        decoder: Arc<dyn TokenDecoder>,
    ) -> Result<Self, StartError> {
        config.validate()?;
        let vocab_size = runner.vocab_size();
        let (tx, rx) = channel::<Submission<P>>();
        let stats = Arc::new(Mutex::new(EngineStats::default()));
        let shared = stats.clone();
        let thread_config = config.clone();
        let thread = std::thread::Builder::new()
            .name("engine-step".into())
            .spawn(move || {
                let mut scheduler = Scheduler::new(runner, thread_config, decoder);
                let mut open = true;
                loop {
                    while open {
                        match rx.try_recv() {
                            Ok((request, events)) => add(&mut scheduler, request, events),
                            Err(TryRecvError::Empty) => break,
                            Err(TryRecvError::Disconnected) => open = false,
                        }
                    }
                    if !scheduler.has_work() {
                        if !open {
                            break;
                        }
                        match rx.recv() {
                            Ok((request, events)) => add(&mut scheduler, request, events),
                            Err(_) => open = false,
                        }
                        continue;
                    }
                    scheduler.step();
                    if let Ok(mut s) = shared.lock() {
                        *s = scheduler.stats().clone();
                    }
                }
            })?;
        Ok(Self {
            submissions: Some(tx),
            config,
            vocab_size,
            stats,
            thread: Some(thread),
        })
    }

    /// Queues a request, or refuses it at once if it could never complete.
    pub fn submit(&self, request: Request<P>) -> Result<RequestStream, SubmitError> {
        self.validate(&request)?;
        let (tx, stream) = event_channel();
        self.submissions
            .as_ref()
            .ok_or(SubmitError::Stopped)?
            .send((request, tx))
            .map_err(|_| SubmitError::Stopped)?;
        Ok(stream)
    }

    /// Whether this engine would take `request` ([`validate`] with its settings and model):
    /// for callers that check a request before the costly part of building it.
    pub fn validate(&self, request: &Request<P>) -> Result<(), SubmitError> {
        validate(&self.config, self.vocab_size, request)
    }

    /// The engine's counters as of its last step.
    pub fn stats(&self) -> EngineStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

fn add<R: ModelRunner>(
    scheduler: &mut Scheduler<R>,
    request: Request<R::Pixels>,
    events: EventSender,
) {
    if let Err(e) = scheduler.add(request, events.clone()) {
        events.fail(e.to_string(), ErrorCause::Engine);
    }
}

impl<P> Drop for Engine<P> {
    fn drop(&mut self) {
        self.submissions.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
