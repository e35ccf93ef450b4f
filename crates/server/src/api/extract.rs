//! A JSON body extractor whose failures are OpenAI errors (400 bad JSON, 413 too large).
//!
//! The body is read whole first (bounded by the router's body limit), then parsed: inline
//! when small, on the blocking pool when large, since parsing tens of megabytes of JSON (base64
//! images) takes the better part of a second that the async workers owe to every other route.

use super::error::{echoed, ApiError};
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderMap, StatusCode};
use serde::de::DeserializeOwned;

/// Bodies up to this size are parsed on the async worker: a millisecond or so.
const INLINE_PARSE_BYTES: usize = 1 << 20;

/// Most characters of a path or of serde's message an error echoes.
const ECHOED_CHARS: usize = 200;

pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned + Send + 'static, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !is_json(req.headers()) {
            return Err(ApiError::bad_request(
                "Expected a JSON body with `Content-Type: application/json`",
            ));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            match rejection.status() {
                StatusCode::PAYLOAD_TOO_LARGE => ApiError {
                    status: StatusCode::PAYLOAD_TOO_LARGE,
                    ..ApiError::bad_request(rejection.body_text())
                },
                _ => ApiError::bad_request(rejection.body_text()),
            }
        })?;
        if bytes.len() <= INLINE_PARSE_BYTES {
            return parse(&bytes).map(ApiJson);
        }
        tokio::task::spawn_blocking(move || parse(&bytes))
            .await
            .map_err(|e| ApiError::internal(format!("JSON parsing crashed: {e}")))?
            .map(ApiJson)
    }
}

/// Parses the body; a body that is JSON but not of the request's shape is refused naming where
/// (`messages[0].content: ...`), with the top-level field as `param`. serde quotes the value it
/// refused (a string of megabytes, a huge map key in the path): both are echoed bounded.
fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let syntax = |e: serde_json::Error| {
        ApiError::bad_request(format!(
            "Invalid JSON body: {}",
            echoed(&e.to_string(), ECHOED_CHARS)
        ))
    };
    let mut json = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut json).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        if inner.is_syntax() || inner.is_eof() || path == "." {
            return syntax(inner);
        }
        let field = path.split(['.', '[']).next().unwrap_or_default();
        ApiError::invalid(
            field,
            format!(
                "Invalid request body at `{}`: {}",
                echoed(&path, ECHOED_CHARS),
                echoed(&inner.to_string(), ECHOED_CHARS)
            ),
        )
    })?;
    json.end().map_err(syntax)?;
    Ok(value)
}

/// `application/json` or any `application/*+json`, parameters (charset) allowed, as axum's
/// own `Json` extractor accepts.
fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or_default().trim();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    kind.eq_ignore_ascii_case("application")
        && (subtype.eq_ignore_ascii_case("json")
            || subtype.len() > 5
                && subtype
                    .get(subtype.len() - 5..)
                    .is_some_and(|suffix| suffix.eq_ignore_ascii_case("+json")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn json_content_types() {
        let check = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_str(value).unwrap());
            is_json(&headers)
        };
        assert!(check("application/json"));
        assert!(check("Application/JSON; charset=utf-8"));
        assert!(check("application/vnd.api+json"));
        assert!(!check("text/plain"));
        assert!(!check("application/jsonx"));
        assert!(!check("application/+json"));
        assert!(!is_json(&HeaderMap::new()));
    }
}
