//! Errors as OpenAI sends them: `{"error": {"message", "type", "param", "code"}}` with the
//! status the SDKs map to their exception types.

use super::request_id::current_request_id;
use crate::state::Refusal;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use std::time::Duration;

/// An error answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
    /// OpenAI's machine-readable `code` where it has one for this error (`model_not_found`,
    /// `invalid_api_key`, `rate_limit_exceeded`), else null; the status says the rest.
    pub code: Option<&'static str>,
    /// Seconds a client should wait before retrying (429, 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// 400: the request itself is wrong; `param` names the offending field.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            param: Some(param.to_string()),
            ..Self::new(StatusCode::BAD_REQUEST, message)
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn unauthorized() -> Self {
        ApiError {
            code: Some("invalid_api_key"),
            ..Self::new(
                StatusCode::UNAUTHORIZED,
                "Invalid or missing API key: pass it as `Authorization: Bearer <key>`",
            )
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    /// 404 for a model this server does not serve.
    pub fn model_not_found(message: impl Into<String>) -> Self {
        ApiError {
            code: Some("model_not_found"),
            ..Self::not_found(message)
        }
    }

    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("The request body exceeds {limit} bytes"),
        )
    }

    /// 415: a `Content-Encoding` other than those [`super::decompress`] accepts.
    pub fn unsupported_encoding(given: &str) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "Unsupported `Content-Encoding: {}`: send the body as it is, or compressed with \
                 gzip or deflate",
                echoed(given, 40)
            ),
        )
    }

    pub fn queue_full() -> Self {
        ApiError {
            retry_after: Some(1),
            code: Some("rate_limit_exceeded"),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "The server is at capacity: too many requests are queued; retry shortly",
            )
        }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError {
            retry_after: Some(5),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
        }
    }

    /// 408: the request body did not arrive within `timeout` of its headers.
    pub fn body_timeout(timeout: Duration) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "The request body did not arrive within {} seconds",
                timeout.as_secs()
            ),
        )
    }

    /// 500: a failure of ours. `detail` goes to the log at ERROR, inside the request's span;
    /// the client gets a fixed sentence naming the request id, since internal errors (candle's
    /// carry backtraces with source paths) are not for clients.
    pub fn internal(detail: impl Into<String>) -> Self {
        let detail = detail.into();
        tracing::error!(detail = %detail, "internal error");
        let message = match current_request_id() {
            Some(id) => format!(
                "The server failed to complete the request; the error was logged with request \
                 id {id}"
            ),
            None => "The server failed to complete the request; the error was logged".into(),
        };
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    /// OpenAI's `type` for the status.
    pub fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::BAD_REQUEST
            | StatusCode::REQUEST_TIMEOUT
            | StatusCode::PAYLOAD_TOO_LARGE
            | StatusCode::UNSUPPORTED_MEDIA_TYPE
            | StatusCode::METHOD_NOT_ALLOWED => "invalid_request_error",
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::SERVICE_UNAVAILABLE => "service_unavailable_error",
            _ => "server_error",
        }
    }

    /// The JSON body, also sent as the error event of a failed stream.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind(),
            "param": self.param,
            "code": self.code,
        }})
    }
}

/// Client text as an error echoes it: at most `max` characters, cut with `…`. A field is
/// bounded only by the body limit; an error answer (and its log line) must not be.
pub fn echoed(text: &str, max: usize) -> String {
    let mut shown: String = text.chars().take(max).collect();
    if shown.len() < text.len() {
        shown.push('…');
    }
    shown
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::ShuttingDown => ApiError::unavailable("The server is shutting down"),
            Refusal::LoadFailed => {
                ApiError::unavailable("The model failed to load; the reason is in the server's log")
            }
            Refusal::Loading => ApiError::unavailable("The model is still loading"),
            Refusal::QueueFull => ApiError::queue_full(),
            Refusal::ImageMemoryFull => ApiError {
                status: StatusCode::TOO_MANY_REQUESTS,
                retry_after: Some(1),
                code: Some("rate_limit_exceeded"),
                ..ApiError::bad_request(
                    "The server is at capacity: images of other requests take all the memory \
                     set aside for images; retry shortly",
                )
            },
            Refusal::TokenizerCrashed(detail) => {
                ApiError::internal(format!("tokenization crashed: {detail}"))
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_image_memory_is_a_429_to_retry_shortly() {
        let refused = ApiError::from(Refusal::ImageMemoryFull);
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(refused.retry_after, Some(1));
    }
}
