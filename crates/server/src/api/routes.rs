//! The router: every route, its middleware, and the small handlers.

use super::chat::chat_completions;
use super::error::ApiError;
use super::extract::ApiJson;
use super::middleware::{authenticate, count_http, request_id};
use super::openai::{ModelCard, ModelList, TokenizeRequest, TokenizeResponse};
use super::validate::convert_messages;
use crate::state::AppState;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{middleware, Json, Router};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

pub fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/tokenize", post(tokenize))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .merge(api)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.limits.max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), count_http))
        .layer(middleware::from_fn(request_id))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::not_found("No such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError {
        status: axum::http::StatusCode::METHOD_NOT_ALLOWED,
        ..ApiError::bad_request("This route does not accept that method")
    }
}

/// 200 once the model is loaded; 503 while loading, after a failed load, and while draining.
async fn health(State(state): State<Arc<AppState>>) -> Result<&'static str, ApiError> {
    state.ready().map(|_| "ok")
}

async fn models(State(state): State<Arc<AppState>>) -> Result<Json<ModelList>, ApiError> {
    let ready = state.ready()?;
    Ok(Json(ModelList {
        object: "list",
        data: vec![ModelCard {
            id: state.model_name.clone(),
            object: "model",
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            owned_by: "internvl",
            max_model_len: ready.max_model_len,
        }],
    }))
}

/// vLLM's `/tokenize`: the prompt ids of a chat (images as their placeholders) or of a text.
async fn tokenize(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<TokenizeRequest>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    let ready = state.ready()?;
    if let Some(model) = &req.model {
        if *model != state.model_name {
            return Err(ApiError::not_found(format!(
                "The model `{model}` does not exist"
            )));
        }
    }
    let tokens = match (&req.messages, &req.prompt) {
        (Some(messages), None) => {
            let (messages, _) = convert_messages(messages)?;
            ready
                .loaded
                .encode_prompt(&messages)
                .map_err(|e| ApiError::invalid("messages", e.to_string()))?
                .ids
        }
        (None, Some(prompt)) => ready
            .loaded
            .tokenizer
            .encode(prompt)
            .map_err(|e| ApiError::invalid("prompt", e.to_string()))?,
        _ => {
            return Err(ApiError::bad_request(
                "Give exactly one of `messages` and `prompt`",
            ))
        }
    };
    Ok(Json(TokenizeResponse {
        count: tokens.len(),
        max_model_len: ready.max_model_len,
        tokens,
    }))
}

async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    if let Some(ready) = state.ready.get() {
        state.metrics.update_engine(&ready.engine.stats());
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}
