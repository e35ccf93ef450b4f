//! The whole-body deadline: a request body must arrive within a time of its head, however
//! it trickles in (a per-chunk timeout would let one byte every few seconds hold a request
//! open forever), and before the server begins draining.

use axum::body::Bytes;
use http_body::{Body, Frame, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Sleep;

/// Why reading a body stopped before its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyCut {
    #[error("the request body did not arrive within {0:?}")]
    TimedOut(Duration),
    /// The server began draining: a request still arriving has started no work, and is
    /// refused like any new one rather than holding the exit up.
    #[error("the server began shutting down before the request body arrived")]
    Draining,
}

/// A request's body deadline, carried in the request's extensions so that the API answers
/// 408 (or 503 while draining) when the body was cut off, whatever the handler made of the
/// cut-off body.
#[derive(Debug, Clone, Default)]
pub struct BodyDeadline {
    cut: Arc<OnceLock<BodyCut>>,
}

impl BodyDeadline {
    /// Why the body was cut off, if it was.
    pub fn cut(&self) -> Option<BodyCut> {
        self.cut.get().copied()
    }
}

/// A body that fails once its deadline has passed or the server begins draining.
pub struct DeadlineBody<B> {
    inner: B,
    timeout: Duration,
    sleep: Pin<Box<Sleep>>,
    drain: Pin<Box<dyn Future<Output = ()> + Send>>,
    deadline: BodyDeadline,
}

impl<B> DeadlineBody<B> {
    /// `inner` with a deadline `timeout` from now, cut off as well when `draining` turns
    /// true; and the deadline to put in the request.
    pub fn new(
        inner: B,
        timeout: Duration,
        mut draining: watch::Receiver<bool>,
    ) -> (Self, BodyDeadline) {
        let deadline = BodyDeadline::default();
        let body = DeadlineBody {
            inner,
            timeout,
            sleep: Box::pin(tokio::time::sleep(timeout)),
            drain: Box::pin(async move {
                if draining.wait_for(|d| *d).await.is_err() {
                    // No drain can come any more: never cut for it.
                    std::future::pending::<()>().await;
                }
            }),
            deadline: deadline.clone(),
        };
        (body, deadline)
    }

    fn cut(&self, why: BodyCut) -> Poll<Option<Result<Frame<Bytes>, axum::BoxError>>> {
        let why = *self.deadline.cut.get_or_init(|| why);
        Poll::Ready(Some(Err(why.into())))
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
        if let Some(why) = this.deadline.cut() {
            return this.cut(why);
        }
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if this.sleep.as_mut().poll(cx).is_ready() {
            return this.cut(BodyCut::TimedOut(this.timeout));
        }
        if this.drain.as_mut().poll(cx).is_ready() {
            return this.cut(BodyCut::Draining);
        }
        Poll::Pending
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
        let (_drain, draining) = watch::channel(false);
        let (body, deadline) = DeadlineBody::new(
            StreamBody::new(Box::pin(chunks)),
            Duration::from_secs(30),
            draining,
        );
        let started = tokio::time::Instant::now();
        let error = body.collect().await.unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_secs(30));
        assert_eq!(
            deadline.cut(),
            Some(BodyCut::TimedOut(Duration::from_secs(30)))
        );
        assert!(
            error.to_string().contains("did not arrive within 30s"),
            "{error}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_prompt_body_is_untouched() {
        let (_drain, draining) = watch::channel(false);
        let (body, deadline) = DeadlineBody::new(
            http_body_util::Full::new(Bytes::from_static(b"hello")),
            Duration::from_secs(1),
            draining,
        );
        assert_eq!(body.collect().await.unwrap().to_bytes(), "hello");
        assert_eq!(deadline.cut(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_cuts_a_body_still_arriving() {
        let (drain, draining) = watch::channel(false);
        let chunks = futures_util::stream::pending::<Result<Frame<Bytes>, std::io::Error>>();
        let (body, deadline) =
            DeadlineBody::new(StreamBody::new(chunks), Duration::from_secs(60), draining);
        let collecting = tokio::spawn(body.collect());
        tokio::time::sleep(Duration::from_secs(5)).await;
        drain.send(true).unwrap();
        assert!(collecting.await.unwrap().is_err());
        assert_eq!(deadline.cut(), Some(BodyCut::Draining));
    }
}
