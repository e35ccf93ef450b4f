//! Request ids, API keys, body deadlines and HTTP counters.

use super::chat::random_id;
use super::error::ApiError;
use crate::connections::{BodyCut, BodyDeadline};
use crate::state::AppState;
use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body::{Body as _, Frame, SizeHint};
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

/// Answers 413 at once for a body declared (`Content-Length`) larger than the limit, rather
/// than waiting for bytes that will be refused anyway; and 408 for a request whose body
/// missed its deadline (503 for one cut off by a drain), in place of whatever the handler
/// made of the cut-off body. Each closes the connection: the rest of the body may still be
/// on its way.
pub async fn body_limits(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let limit = state.limits.max_body_bytes;
    let declared = request.body().size_hint().lower();
    if usize::try_from(declared).map_or(true, |declared| declared > limit) {
        return closing(ApiError::too_large(limit));
    }
    let deadline = request.extensions().get::<BodyDeadline>().cloned();
    let response = next.run(request).await;
    match deadline.and_then(|d| d.cut()) {
        Some(BodyCut::TimedOut(timeout)) => closing(ApiError::body_timeout(timeout)),
        Some(BodyCut::Draining) => closing(ApiError::unavailable("The server is shutting down")),
        None => response,
    }
}

fn closing(error: ApiError) -> Response {
    let mut response = error.into_response();
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Requires one of the configured API keys as a bearer token, when any is configured.
pub async fn authenticate(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let keys = &state.limits.api_keys;
    if keys.is_empty() {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(key)
            if keys
                .iter()
                .any(|k| constant_time_eq(k.as_bytes(), key.as_bytes())) =>
        {
            next.run(request).await
        }
        _ => ApiError::unauthorized().into_response(),
    }
}

/// Compares without an early exit, so timing does not reveal how much of a key matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Counts every response by route template and status.
pub async fn count_http(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let response = next.run(request).await;
    state
        .metrics
        .observe_http(&route, response.status().as_u16());
    response
}
