//! The router: every route, its middleware, and the small handlers.

use super::chat::chat_completions;
use super::decompress::decompress;
use super::error::ApiError;
use super::extract::ApiJson;
use super::messages::{check_prompt_bytes, convert_with_block};
use super::middleware::{authenticate, body_limits, count_http};
use super::openai::{ModelCard, ModelList, TokenizeRequest, TokenizeResponse};
use super::request_id::request_id;
use super::tools::{plan_tools, ToolFields};
use super::validate::check_model;
use crate::settings::AllowedOrigins;
use crate::state::AppState;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{middleware, Json, Router};
use std::any::Any;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tower::util::option_layer;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{self, AllowOrigin, CorsLayer};

pub fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/tokenize", post(tokenize))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    let routes = Router::new()
        .merge(api)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed);
    with_layers(routes, state)
}

/// The middleware every route gets, innermost first: the body limit; a handler panic as a
/// plain 500; gzip and deflate bodies inflated (415 for other encodings); 413 for a body
/// declared too large, 408 for one past its deadline; the HTTP counter; CORS where origins
/// are allowed (outside the API key check, since browsers send no credentials with a
/// preflight); the request id, span and log line (outermost, so that it
/// logs the status actually sent).
pub fn with_layers(routes: Router<Arc<AppState>>, state: Arc<AppState>) -> Router {
    routes
        .layer(DefaultBodyLimit::max(state.limits.max_body_bytes))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(middleware::from_fn_with_state(state.clone(), decompress))
        .layer(middleware::from_fn_with_state(state.clone(), body_limits))
        .layer(middleware::from_fn_with_state(state.clone(), count_http))
        .layer(option_layer(cors(&state.limits.allowed_origins)))
        .layer(middleware::from_fn(request_id))
        .with_state(state)
}

/// The CORS answer for `origins`: any method and request header (the SDKs send their own),
/// no credentials (keys travel as bearer tokens), and the request id readable by the page.
fn cors(origins: &AllowedOrigins) -> Option<CorsLayer> {
    let allow = match origins {
        AllowedOrigins::None => return None,
        AllowedOrigins::Any => AllowOrigin::any(),
        AllowedOrigins::List(list) => AllowOrigin::list(
            list.iter()
                .filter_map(|origin| HeaderValue::from_str(origin).ok()),
        ),
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods(cors::Any)
            .allow_headers(cors::Any)
            .expose_headers([HeaderName::from_static("x-request-id"), header::RETRY_AFTER]),
    )
}

/// A handler's panic: its message goes to the log, the client gets a plain 500.
fn panic_response(panic: Box<dyn Any + Send + 'static>) -> Response {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-text panic payload".into());
    ApiError::internal(format!("the handler panicked: {message}")).into_response()
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
    state.ready().map(|_| "ok").map_err(ApiError::from)
}

async fn models(State(state): State<Arc<AppState>>) -> Result<Json<ModelList>, ApiError> {
    Ok(Json(ModelList {
        object: "list",
        data: vec![model_card(&state)?],
    }))
}

/// `GET /v1/models/{id}` (the SDKs' `models.retrieve`): our card, or the 404 a chat naming
/// another model gets.
async fn model(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<ModelCard>, ApiError> {
    check_model(&id, &state.model_name)?;
    Ok(Json(model_card(&state)?))
}

/// The one model this server serves, once it is loaded.
fn model_card(state: &AppState) -> Result<ModelCard, ApiError> {
    let ready = state.ready()?;
    Ok(ModelCard {
        id: state.model_name.clone(),
        object: "model",
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        owned_by: "internvl",
        max_model_len: ready.max_model_len,
    })
}

/// vLLM's `/tokenize`: the prompt ids of a chat (images as their placeholders, the tools'
/// system block as a chat with those `tools` and `tool_choice` has it) or of a text,
/// tokenized on the blocking pool under the same size cap as chats.
async fn tokenize(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<TokenizeRequest>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    let max_model_len = state.ready()?.max_model_len;
    if let Some(model) = &req.model {
        check_model(model, &state.model_name)?;
    }
    let max_bytes = state.limits.max_prompt_bytes;
    let tools = plan_tools(ToolFields {
        tools: req.tools.as_deref(),
        tool_choice: req.tool_choice.as_ref(),
        parallel_tool_calls: req.parallel_tool_calls,
    })?;
    let tokens = match (req.messages, req.prompt) {
        (Some(messages), None) => {
            let block = tools.as_ref().map(|t| t.block.as_str());
            let (messages, _) = convert_with_block(&messages, block, max_bytes)?;
            state
                .tokenize(move |ready| {
                    ready
                        .loaded
                        .encode_prompt(&messages)
                        .map(|prompt| prompt.ids)
                        .map_err(|e| ApiError::invalid("messages", e.to_string()))
                })
                .await?
        }
        (None, Some(_)) if tools.is_some() => {
            return Err(ApiError::invalid(
                "tools",
                "tools describe a chat: give them with `messages`, not `prompt`",
            ))
        }
        (None, Some(prompt)) => {
            check_prompt_bytes("prompt", prompt.len(), max_bytes)?;
            state
                .tokenize(move |ready| {
                    ready
                        .loaded
                        .tokenizer
                        .encode(&prompt)
                        .map_err(|e| ApiError::invalid("prompt", e.to_string()))
                })
                .await?
        }
        _ => {
            return Err(ApiError::bad_request(
                "Give exactly one of `messages` and `prompt`",
            ))
        }
    };
    Ok(Json(TokenizeResponse {
        count: tokens.len(),
        max_model_len,
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
