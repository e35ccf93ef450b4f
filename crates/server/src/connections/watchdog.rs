//! Per-connection timers: how long a connection may wait for its next request (idle), and
//! how long a request's head may take once its first byte has arrived (header read).
//!
//! hyper's own `header_read_timeout` starts when the connection begins waiting for a head, so
//! on a kept-alive connection it is also the idle limit; a separate, longer idle limit (to
//! outlast load balancers' keep-alive) needs these timers of our own.

use std::num::NonZeroUsize;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;

/// Where a connection is between requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No request in flight and no byte of the next one yet.
    Idle { since: Instant },
    /// The first bytes of a request's head have come, the head is not complete.
    ReadingHead { since: Instant },
    /// Requests being answered: no timer runs (the body has its own deadline, and a streamed
    /// answer may last as long as its generation).
    Busy { requests: NonZeroUsize },
}

/// The timers of one connection.
pub struct Watchdog {
    phase: watch::Sender<Phase>,
    idle_timeout: Duration,
    header_read_timeout: Duration,
}

impl Watchdog {
    pub fn new(idle_timeout: Duration, header_read_timeout: Duration) -> Arc<Watchdog> {
        Arc::new(Watchdog {
            phase: watch::Sender::new(Phase::Idle {
                since: Instant::now(),
            }),
            idle_timeout,
            header_read_timeout,
        })
    }

    /// Bytes arrived: an idle connection starts reading a head.
    fn bytes_read(&self) {
        self.phase.send_if_modified(|phase| match *phase {
            Phase::Idle { .. } => {
                *phase = Phase::ReadingHead {
                    since: Instant::now(),
                };
                true
            }
            _ => false,
        });
    }

    /// A request's head is complete: timers stop until the returned guard drops with its
    /// answer.
    pub fn request_started(self: &Arc<Self>) -> RequestOnConnection {
        self.phase.send_modify(|phase| {
            *phase = match *phase {
                Phase::Busy { requests } => Phase::Busy {
                    requests: requests.saturating_add(1),
                },
                _ => Phase::Busy {
                    requests: NonZeroUsize::MIN,
                },
            }
        });
        RequestOnConnection {
            watchdog: self.clone(),
        }
    }

    /// Whether a request on this connection is being answered.
    pub fn busy(&self) -> bool {
        matches!(*self.phase.borrow(), Phase::Busy { .. })
    }

    fn deadline(&self, phase: Phase) -> Option<Instant> {
        match phase {
            Phase::Idle { since } => Some(since + self.idle_timeout),
            Phase::ReadingHead { since } => Some(since + self.header_read_timeout),
            Phase::Busy { .. } => None,
        }
    }

    /// Resolves when the connection has been idle, or reading one head, for too long.
    pub async fn expired(&self) {
        let mut phases = self.phase.subscribe();
        loop {
            let phase = *phases.borrow_and_update();
            match self.deadline(phase) {
                None => {
                    if phases.changed().await.is_err() {
                        return;
                    }
                }
                Some(deadline) => tokio::select! {
                    () = tokio::time::sleep_until(deadline) => return,
                    changed = phases.changed() => if changed.is_err() { return },
                },
            }
        }
    }
}

/// One request being answered on a connection; dropped with its answer.
pub struct RequestOnConnection {
    watchdog: Arc<Watchdog>,
}

impl Drop for RequestOnConnection {
    fn drop(&mut self) {
        self.watchdog.phase.send_modify(|phase| {
            *phase = match *phase {
                Phase::Busy { requests } => match NonZeroUsize::new(requests.get() - 1) {
                    Some(requests) => Phase::Busy { requests },
                    None => Phase::Idle {
                        since: Instant::now(),
                    },
                },
                other => other,
            }
        });
    }
}

/// A socket that tells its watchdog when bytes arrive.
pub struct Watched<S> {
    inner: S,
    watchdog: Arc<Watchdog>,
}

impl<S> Watched<S> {
    pub fn new(inner: S, watchdog: Arc<Watchdog>) -> Self {
        Watched { inner, watchdog }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.watchdog.bytes_read();
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_then_head_then_busy() {
        let dog = Watchdog::new(Duration::from_secs(75), Duration::from_secs(10));
        let started = Instant::now();
        dog.expired().await;
        assert_eq!(started.elapsed(), Duration::from_secs(75), "idle limit");

        dog.bytes_read();
        let head = Instant::now();
        dog.expired().await;
        assert_eq!(head.elapsed(), Duration::from_secs(10), "header limit");

        let request = dog.request_started();
        assert!(dog.busy());
        let waiting = tokio::spawn({
            let dog = dog.clone();
            async move { dog.expired().await }
        });
        tokio::time::sleep(Duration::from_secs(1000)).await;
        assert!(
            !waiting.is_finished(),
            "no timer while a request is answered"
        );
        let answered = Instant::now();
        drop(request);
        waiting.await.unwrap();
        assert_eq!(answered.elapsed(), Duration::from_secs(75), "idle again");
    }
}
