//! The channel a request's events travel through, bounded by what its reader leaves unread.
//!
//! Events are produced by the engine thread, which must never block on a client, so the
//! channel itself is unbounded; what bounds it is a byte count shared by both ends: the
//! engine adds an event's size before sending it, [`RequestStream`] subtracts it on delivery.
//! A request whose undelivered events would pass the engine's
//! `max_buffered_output_bytes` is **cancelled** (an error event, its KV blocks freed at the
//! next step), not paused: a paused request would keep its KV blocks and a running slot, so a
//! few clients that never read could hold `max_num_seqs` and starve everyone else.

use crate::request::{ErrorCause, Event};
use std::mem::size_of;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// What both ends of one request's channel share.
#[derive(Default)]
struct Shared {
    /// Bytes of events sent and not yet delivered (see [`event_bytes`]).
    buffered: AtomicUsize,
    /// Set once an error ended the request: nothing more is sent, and every completion of
    /// the request stops at the next step.
    ended: AtomicBool,
}

/// A new channel: the engine's end and the caller's.
pub fn channel() -> (EventSender, RequestStream) {
    let (tx, rx) = unbounded_channel();
    let shared = Arc::new(Shared::default());
    (
        EventSender {
            tx,
            shared: shared.clone(),
        },
        RequestStream { rx, shared },
    )
}

/// Memory an undelivered event holds: the event itself and what it owns on the heap.
pub fn event_bytes(event: &Event) -> usize {
    size_of::<Event>()
        + match event {
            Event::Token {
                text, top_logprobs, ..
            } => text.len() + top_logprobs.len() * size_of::<(u32, f32)>(),
            Event::Finished { text, timings, .. } => {
                text.len() + timings.inter_token.len() * size_of::<Duration>()
            }
            Event::Error { message, .. } => message.len(),
        }
}

/// The reader left more than the bound unread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overflow {
    pub buffered: usize,
}

/// The engine's end of a request's channel, shared by the request's `n` completions.
#[derive(Clone)]
pub struct EventSender {
    tx: UnboundedSender<Event>,
    shared: Arc<Shared>,
}

impl EventSender {
    /// Sends `event` unless the reader has more than `limit` bytes undelivered with it. An
    /// event is always accepted into an empty channel, so one event larger than the bound
    /// (a long finish's timings) never fails a reader that keeps up.
    pub fn send(&self, event: Event, limit: usize) -> Result<(), Overflow> {
        if self.shared.ended.load(Ordering::SeqCst) {
            return Ok(());
        }
        let bytes = event_bytes(&event);
        self.shared
            .buffered
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |buffered| {
                let total = buffered.checked_add(bytes)?;
                (buffered == 0 || total <= limit).then_some(total)
            })
            .map_err(|buffered| Overflow { buffered })?;
        self.push(event, bytes);
        Ok(())
    }

    /// Ends the request with an error event, whatever is buffered (the event is small); true
    /// if this call ended it, false if it had already ended.
    pub fn fail(&self, message: String, cause: ErrorCause) -> bool {
        if self.shared.ended.swap(true, Ordering::SeqCst) {
            return false;
        }
        let event = Event::Error { message, cause };
        let bytes = event_bytes(&event);
        self.shared.buffered.fetch_add(bytes, Ordering::SeqCst);
        self.push(event, bytes);
        true
    }

    fn push(&self, event: Event, bytes: usize) {
        if self.tx.send(event).is_err() {
            // No reader: nothing will deliver it.
            self.shared.buffered.fetch_sub(bytes, Ordering::SeqCst);
        }
    }

    /// Whether the request is over for the engine: its reader is gone or an error ended it.
    pub fn is_abandoned(&self) -> bool {
        self.tx.is_closed() || self.shared.ended.load(Ordering::SeqCst)
    }
}

/// The events of one request. Dropping it cancels the request at the next step.
pub struct RequestStream {
    rx: UnboundedReceiver<Event>,
    shared: Arc<Shared>,
}

impl RequestStream {
    /// The next event; `None` after the last.
    pub async fn next(&mut self) -> Option<Event> {
        let event = self.rx.recv().await;
        self.delivered(event)
    }

    /// The next event, blocking the thread (not for async code).
    pub fn next_blocking(&mut self) -> Option<Event> {
        let event = self.rx.blocking_recv();
        self.delivered(event)
    }

    /// The next event if one is waiting, for callers that drive a
    /// [`crate::Scheduler`] step by step on their own thread.
    pub fn try_next(&mut self) -> Option<Event> {
        let event = self.rx.try_recv().ok();
        self.delivered(event)
    }

    /// Bytes sent and not yet delivered.
    pub fn buffered_bytes(&self) -> usize {
        self.shared.buffered.load(Ordering::SeqCst)
    }

    fn delivered(&self, event: Option<Event>) -> Option<Event> {
        if let Some(event) = &event {
            self.shared
                .buffered
                .fetch_sub(event_bytes(event), Ordering::SeqCst);
        }
        event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(text: &str) -> Event {
        Event::Token {
            index: 0,
            id: 1,
            text: text.into(),
            logprob: None,
            top_logprobs: vec![(1, -0.5); 20],
        }
    }

    #[test]
    fn delivery_gives_the_bytes_back_and_the_bound_holds() {
        let (tx, mut rx) = channel();
        let one = event_bytes(&token("ab"));
        assert_eq!(one, size_of::<Event>() + 2 + 20 * 8);
        let limit = 3 * one;
        for _ in 0..3 {
            tx.send(token("ab"), limit).unwrap();
        }
        assert_eq!(rx.buffered_bytes(), 3 * one);
        assert_eq!(
            tx.send(token("ab"), limit),
            Err(Overflow { buffered: 3 * one })
        );
        assert_eq!(rx.try_next(), Some(token("ab")));
        assert_eq!(rx.buffered_bytes(), 2 * one);
        tx.send(token("ab"), limit).unwrap();
        while rx.try_next().is_some() {}
        assert_eq!(rx.buffered_bytes(), 0);
        // One event over the bound still reaches a reader that keeps up.
        tx.send(token(&"x".repeat(limit)), limit).unwrap();
        assert!(tx.send(token("ab"), limit).is_err());
    }

    #[test]
    fn an_error_ends_the_request_for_every_completion() {
        let (tx, mut rx) = channel();
        let sibling = tx.clone();
        assert!(!sibling.is_abandoned());
        assert!(tx.fail("boom".into(), ErrorCause::Engine));
        assert!(
            !sibling.fail("again".into(), ErrorCause::Grammar),
            "ended once"
        );
        assert!(sibling.is_abandoned());
        sibling.send(token("late"), usize::MAX).unwrap();
        assert_eq!(
            rx.try_next(),
            Some(Event::Error {
                message: "boom".into(),
                cause: ErrorCause::Engine
            })
        );
        assert_eq!(rx.try_next(), None, "nothing follows an error");
        assert_eq!(rx.buffered_bytes(), 0);
        let (other, reader) = channel();
        drop(reader);
        assert!(other.is_abandoned(), "a dropped stream cancels");
    }
}
