//! A JSON body extractor whose failures are OpenAI errors (400 bad JSON, 413 too large).

use super::error::ApiError;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => Err(match rejection.status() {
                StatusCode::PAYLOAD_TOO_LARGE => ApiError {
                    status: StatusCode::PAYLOAD_TOO_LARGE,
                    ..ApiError::bad_request(rejection.body_text())
                },
                _ => match rejection {
                    JsonRejection::MissingJsonContentType(_) => ApiError::bad_request(
                        "Expected a JSON body with `Content-Type: application/json`",
                    ),
                    other => ApiError::bad_request(other.body_text()),
                },
            }),
        }
    }
}
