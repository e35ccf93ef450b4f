//! The HTTP listener: an accept loop with a cap on open connections, each connection served
//! by hyper's HTTP/1 server with bounded buffers, idle and header timers, a whole-body
//! deadline, and a drain that closes what is idle and lets answers in flight finish.

mod body_deadline;
mod in_flight;
mod watchdog;

pub use body_deadline::{BodyCut, BodyDeadline};
pub use in_flight::InFlight;

use crate::settings::Settings;
use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use axum::Router;
use body_deadline::DeadlineBody;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use in_flight::Guarded;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tower::ServiceExt;
use watchdog::{Watchdog, Watched};

/// What bounds a client connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    /// hyper's buffer limit: the largest head, and each connection's read and write buffers.
    pub max_header_bytes: usize,
}

impl ConnectionLimits {
    pub fn new(settings: &Settings) -> Self {
        ConnectionLimits {
            header_read_timeout: settings.header_read_timeout,
            body_read_timeout: settings.body_read_timeout,
            idle_timeout: settings.idle_timeout,
            max_connections: settings.max_connections,
            max_header_bytes: settings.max_header_bytes,
        }
    }
}

/// Accepts connections on `listener` and serves `app` on them until dropped (which closes
/// every connection). Once `draining` turns true, idle and half-sent connections are closed,
/// busy ones close after their answers, and new ones are served one request each (the API
/// answers 503 meanwhile); `in_flight` counts the requests being answered.
///
/// A connection over `limits.max_connections` is closed as soon as it is accepted and
/// counted by `refused`: a client or balancer learns at once to retry, rather than waiting
/// unseen in the kernel's backlog with no timer of ours running.
pub async fn accept(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    draining: watch::Receiver<bool>,
    in_flight: InFlight,
    refused: impl Fn() + Send,
) -> Infallible {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(_) = connections.join_next() => continue,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, or a connection reset before it was accepted:
                // pause rather than spin, then go on.
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refused();
            drop(stream);
            continue;
        };
        let connection = Connection {
            app: app.clone(),
            limits,
            in_flight: in_flight.clone(),
            watchdog: Watchdog::new(limits.idle_timeout, limits.header_read_timeout),
            draining: draining.clone(),
        };
        connections.spawn(connection.serve(stream, slot));
    }
}

/// One client connection.
#[derive(Clone)]
struct Connection {
    app: Router,
    limits: ConnectionLimits,
    in_flight: InFlight,
    watchdog: Arc<Watchdog>,
    draining: watch::Receiver<bool>,
}

impl Connection {
    async fn serve(self, stream: TcpStream, _slot: OwnedSemaphorePermit) {
        let watchdog = self.watchdog.clone();
        let mut draining = self.draining.clone();
        let io = TokioIo::new(Watched::new(stream, watchdog.clone()));
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .max_buf_size(self.limits.max_header_bytes)
            .header_read_timeout(None)
            .keep_alive(!*draining.borrow());
        let connection = builder.serve_connection(io, self);
        tokio::pin!(connection);
        let mut drain_seen = *draining.borrow();
        loop {
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                    return;
                }
                () = watchdog.expired() => {
                    tracing::debug!("closing a connection idle or slow to send its headers");
                    return;
                }
                () = async { let _ = draining.wait_for(|d| *d).await; }, if !drain_seen => {
                    drain_seen = true;
                    if !watchdog.busy() {
                        return;
                    }
                    connection.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

impl hyper::service::Service<hyper::Request<Incoming>> for Connection {
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn call(&self, request: hyper::Request<Incoming>) -> Self::Future {
        let guards = (self.watchdog.request_started(), self.in_flight.begin());
        let (parts, body) = request.into_parts();
        let (body, deadline) =
            DeadlineBody::new(body, self.limits.body_read_timeout, self.draining.clone());
        let mut request = Request::from_parts(parts, Body::new(body));
        request.extensions_mut().insert(deadline);
        let app = self.app.clone();
        Box::pin(async move {
            let response = app.oneshot(request).await?;
            Ok(response.map(|body| Body::new(Guarded::new(body, guards))))
        })
    }
}
