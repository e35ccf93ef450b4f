//! `POST /v1/chat/completions`: every check runs before the answer starts, then the answer
//! is collected ([`reply`]) or streamed as server-sent events ([`stream`]); the request's
//! images are fetched and preprocessed by [`images`].

mod images;
mod reply;
mod stream;

use super::error::ApiError;
use super::extract::ApiJson;
use super::openai::ChatCompletionRequest;
use super::request_id::random_id;
use super::validate::{check_model, submit_error, validate_chat, Rules};
use crate::service::request::{image_inputs, request, Generation};
use crate::state::AppState;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use images::{load_images, pixel_bytes};
use reply::{collect_reply, Held, Reply};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use stream::stream_reply;

/// Every check runs before the answer starts, cheapest first: the request's fields (the
/// engine's rules included) before tokenizing, the prompt's length before fetching images.
pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    // The SSE body may be polled outside the request's span: kept to report failures in it.
    let span = tracing::Span::current();
    let ready = state.ready()?;
    check_model(&req.model, &state.model_name)?;
    if let Some(user) = &req.user {
        tracing::info!(user = %user, "chat completion");
    }
    let vocab_size = ready.loaded.model.config().llm.vocab_size;
    let rules = Rules {
        max_images: state.limits.max_images_per_request,
        max_prompt_bytes: state.limits.max_prompt_bytes,
        vocab_size,
        eos_token_id: ready.loaded.tokenizer.eos_id(),
    };
    let mut plan = validate_chat(req, &rules)?;
    let admission = state.admit()?;
    let messages = std::mem::take(&mut plan.messages);
    let constrained = plan.constrained.take();
    let constraint = constrained.as_ref().map(|c| c.param);
    // The grammar is compiled beside the tokenization, off the async workers and the engine's
    // step thread; its work is bounded by llguidance's fuel (see `GrammarLimits`).
    let (prompt, grammar) = state
        .tokenize(move |ready| {
            let prompt = ready
                .loaded
                .encode_prompt(&messages)
                .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
            let grammar = constrained
                .map(|c| {
                    ready.grammars.compile(&c.spec).map_err(|e| {
                        ApiError::invalid(c.param, format!("Invalid {}: {e}", c.param))
                    })
                })
                .transpose()?;
            Ok::<_, ApiError>((prompt, grammar))
        })
        .await?;
    let generation = Generation {
        sampling: plan.sampling.clone(),
        stop: plan.stop_for(prompt.ids.len(), ready.max_model_len),
        n: plan.n,
        grammar,
    };
    // Checked before the images are fetched: the images change none of the engine's rules.
    let mut request = request(&ready.loaded, &prompt, Vec::new(), generation);
    ready.engine.validate(&request).map_err(submit_error)?;
    let (images, mut reservation) = load_images(&state, ready, &plan.image_urls).await?;
    let num_images = images.len();
    request.images = image_inputs(&ready.loaded, &prompt, images);
    // The files are hashed and gone: only the pixels are held from here on.
    reservation.shrink_to(num_images.saturating_mul(pixel_bytes(ready)));
    let events = ready.engine.submit(request).map_err(submit_error)?;
    let reply = Reply {
        id: format!("chatcmpl-{}", random_id()),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        model: state.model_name.clone(),
        tokenizer: ready.loaded.tokenizer.clone(),
        state: state.clone(),
        num_images,
        constraint,
    };
    let held = Held::new(admission, reservation);
    if plan.stream {
        Ok(stream_reply(reply, plan, events, held, span).into_response())
    } else {
        collect_reply(reply, plan, events, held).await
    }
}
