//! API keys, body limits and deadlines, and HTTP counters: the layers every route passes
//! through (request ids are [`super::request_id`]'s).

use super::error::ApiError;
use crate::connections::{BodyCut, BodyDeadline};
use crate::state::AppState;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body::Body as _;
use std::sync::Arc;

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
