//! The whole-body deadline: a request body must arrive within a time of its head, however
//! it trickles in (a per-chunk timeout would let one byte every few seconds hold a request
//! open forever).

use axum::body::Bytes;
use http_body::{Body, Frame, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Sleep;

/// A request's body deadline, carried in the request's extensions so that the API answers
/// 408 when the body missed it, whatever the handler made of the cut-off body.
#[derive(Debug, Clone)]
pub struct BodyDeadline {
    timeout: Duration,
    missed: Arc<AtomicBool>,
}

impl BodyDeadline {
    /// Whether reading the body stopped at the deadline.
    pub fn missed(&self) -> bool {
        self.missed.load(Ordering::SeqCst)
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

/// The body did not arrive in time.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0:?}")]
pub struct BodyTimedOut(Duration);

/// A body that fails once its deadline has passed.
pub struct DeadlineBody<B> {
    inner: B,
    sleep: Pin<Box<Sleep>>,
    deadline: BodyDeadline,
}

impl<B> DeadlineBody<B> {
    /// `inner` with a deadline `timeout` from now, and the deadline to put in the request.
    pub fn new(inner: B, timeout: Duration) -> (Self, BodyDeadline) {
        let deadline = BodyDeadline {
            timeout,
            missed: Arc::default(),
        };
        let body = DeadlineBody {
            inner,
            sleep: Box::pin(tokio::time::sleep(timeout)),
            deadline: deadline.clone(),
        };
        (body, deadline)
    }
}

impl<B> Body for DeadlineBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if this.deadline.missed() {
            return Poll::Ready(Some(Err(BodyTimedOut(this.deadline.timeout).into())));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(Into::into))),
            Poll::Pending => match this.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    this.deadline.missed.store(true, Ordering::SeqCst);
                    Poll::Ready(Some(Err(BodyTimedOut(this.deadline.timeout).into())))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    #[tokio::test(start_paused = true)]
    async fn a_trickling_body_fails_at_the_deadline_and_says_so() {
        // One byte a second, forever: every chunk is prompt, the whole never ends.
        let chunks = futures_util::stream::unfold((), |()| async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Some((
                Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(b"x"))),
                (),
            ))
        });
        let (body, deadline) =
            DeadlineBody::new(StreamBody::new(Box::pin(chunks)), Duration::from_secs(30));
        let started = tokio::time::Instant::now();
        let error = body.collect().await.unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_secs(30));
        assert!(deadline.missed());
        assert!(
            error.to_string().contains("did not arrive within 30s"),
            "{error}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_prompt_body_is_untouched() {
        let (body, deadline) = DeadlineBody::new(
            http_body_util::Full::new(Bytes::from_static(b"hello")),
            Duration::from_secs(1),
        );
        assert_eq!(body.collect().await.unwrap().to_bytes(), "hello");
        assert!(!deadline.missed());
    }
}
