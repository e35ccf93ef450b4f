//! Request ids: the client's `x-request-id` or a fresh one, the span every log line of the
//! request is written in, and the id error messages name.

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use http_body::{Frame, SizeHint};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tracing::{Instrument, Span};

const REQUEST_ID: &str = "x-request-id";

tokio::task_local! {
    /// The id of the request being handled, for error messages that name it.
    static CURRENT_REQUEST_ID: Arc<str>;
}

/// The id of the request this code runs for, if it runs inside one's handler or body.
pub fn current_request_id() -> Option<Arc<str>> {
    CURRENT_REQUEST_ID.try_with(Arc::clone).ok()
}

/// Takes the client's `x-request-id` (or makes one), runs the handler and the response body
/// (a stream's events are made as it is sent) inside a span carrying it, logs the status
/// sent, and echoes the id on the response.
pub async fn request_id(request: Request, next: Next) -> Response {
    let id: Arc<str> = request
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map_or_else(|| random_id().into(), Into::into);
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        method = %request.method(),
        path = %request.uri().path()
    );
    let response = CURRENT_REQUEST_ID
        .scope(id.clone(), next.run(request))
        .instrument(span.clone())
        .await;
    span.in_scope(|| log_status(response.status()));
    let (mut parts, body) = response.into_parts();
    if let Ok(value) = HeaderValue::from_str(&id) {
        parts.headers.insert(REQUEST_ID, value);
    }
    Response::from_parts(parts, Body::new(InRequest { body, span, id }))
}

/// A failure of ours at ERROR; 503 (loading, draining: expected, but worth seeing when it
/// lasts) at WARN; client mistakes and successes at INFO.
fn log_status(status: StatusCode) {
    let code = status.as_u16();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        tracing::warn!(status = code, "done");
    } else if status.is_server_error() {
        tracing::error!(status = code, "done");
    } else {
        tracing::info!(status = code, "done");
    }
}

/// A response body polled inside its request's span and id.
struct InRequest {
    body: Body,
    span: Span,
    id: Arc<str>,
}

impl http_body::Body for InRequest {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let _entered = this.span.enter();
        CURRENT_REQUEST_ID.sync_scope(this.id.clone(), || Pin::new(&mut this.body).poll_frame(cx))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A random hex string for request and response ids.
pub fn random_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}
