//! Requests in flight across the server, from a complete head to the last byte of the
//! answer (a streamed answer included), so that a drain knows when it may stop.

use axum::body::Bytes;
use http_body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::watch;

/// The count of requests in flight.
#[derive(Clone)]
pub struct InFlight {
    count: watch::Sender<usize>,
}

impl Default for InFlight {
    fn default() -> Self {
        InFlight {
            count: watch::Sender::new(0),
        }
    }
}

impl InFlight {
    /// Counts one request until the returned guard drops.
    pub fn begin(&self) -> InFlightRequest {
        self.count.send_modify(|n| *n += 1);
        InFlightRequest {
            count: self.count.clone(),
        }
    }

    pub fn get(&self) -> usize {
        *self.count.borrow()
    }

    /// Resolves when no request is in flight.
    pub async fn none_left(&self) {
        let mut count = self.count.subscribe();
        // The sender lives in `self`, so this cannot fail.
        let _ = count.wait_for(|n| *n == 0).await;
    }
}

/// One request in flight.
pub struct InFlightRequest {
    count: watch::Sender<usize>,
}

impl Drop for InFlightRequest {
    fn drop(&mut self) {
        self.count.send_modify(|n| *n -= 1);
    }
}

/// A response body that holds `guard` until the body has been sent or dropped.
pub struct Guarded<B, G> {
    body: B,
    _guard: G,
}

impl<B, G> Guarded<B, G> {
    pub fn new(body: B, guard: G) -> Self {
        Guarded {
            body,
            _guard: guard,
        }
    }
}

impl<B, G> Body for Guarded<B, G>
where
    B: Body<Data = Bytes> + Unpin,
    G: Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn none_left_waits_for_the_last_guard() {
        let in_flight = InFlight::default();
        in_flight.none_left().await;
        let first = in_flight.begin();
        let second = in_flight.begin();
        assert_eq!(in_flight.get(), 2);
        let waiting = tokio::spawn({
            let in_flight = in_flight.clone();
            async move { in_flight.none_left().await }
        });
        drop(first);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        drop(second);
        waiting.await.unwrap();
        assert_eq!(in_flight.get(), 0);
    }
}
