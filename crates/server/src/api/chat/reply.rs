//! A chat's answer in one JSON body, and what every answer repeats (id, model, logprobs as
//! OpenAI spells them, usage, finish reasons, the metrics of each finished completion).
//! An answer asked to be tool calls is read into `tool_calls` (content null).

use super::super::error::ApiError;
use super::super::openai::{
    ChatCompletion, Choice, ChoiceLogprobs, PromptTokensDetails, ResponseMessage, TokenLogprob,
    TopLogprob, Usage,
};
use super::super::tools::calls::CallParser;
use super::super::validate::ChatPlan;
use crate::state::{Admission, AppState, ImageReservation};
use axum::response::{IntoResponse, Response};
use axum::Json;
use internvl_model::tokenizer::Tokenizer;
use internvl_scheduler::{ErrorCause, Event, FinishReason, RequestStream, Usage as EngineUsage};
use std::sync::Arc;

/// What a request holds until its answer is complete: its place among the admitted requests
/// and the memory of its images' pixels.
pub(super) struct Held {
    _admission: Admission,
    _images: ImageReservation,
}

impl Held {
    pub(super) fn new(admission: Admission, images: ImageReservation) -> Held {
        Held {
            _admission: admission,
            _images: images,
        }
    }
}

/// What every chunk or answer of one request repeats.
pub(super) struct Reply {
    pub(super) id: String,
    pub(super) created: u64,
    pub(super) model: String,
    pub(super) tokenizer: Arc<Tokenizer>,
    pub(super) state: Arc<AppState>,
    pub(super) num_images: usize,
    /// The field that constrains the answer, if one does: the `param` of the 400 a grammar
    /// that fails while generating ends the request with.
    pub(super) constraint: Option<&'static str>,
}

impl Reply {
    /// The error a failed generation ends the request with: the client's when its grammar
    /// would not go on, ours (a 500, the detail logged) otherwise.
    pub(super) fn failure(&self, message: String, cause: ErrorCause) -> ApiError {
        match (cause, self.constraint) {
            (ErrorCause::Grammar, Some(param)) => {
                ApiError::invalid(param, format!("Invalid {param}: {message}"))
            }
            _ => ApiError::internal(format!("generation failed: {message}")),
        }
    }

    pub(super) fn logprob(
        &self,
        id: u32,
        logprob: Option<f32>,
        top: &[(u32, f32)],
    ) -> Option<TokenLogprob> {
        let piece = |id: u32| {
            let bytes = self.tokenizer.token_bytes(id).unwrap_or_default();
            (String::from_utf8_lossy(&bytes).into_owned(), bytes)
        };
        let logprob = logprob?;
        let (token, bytes) = piece(id);
        Some(TokenLogprob {
            token,
            logprob,
            bytes,
            top_logprobs: top
                .iter()
                .map(|&(id, logprob)| {
                    let (token, bytes) = piece(id);
                    TopLogprob {
                        token,
                        logprob,
                        bytes,
                    }
                })
                .collect(),
        })
    }

    pub(super) fn record(
        &self,
        reason: FinishReason,
        usage: &EngineUsage,
        timings: &internvl_scheduler::RequestTimings,
    ) {
        self.state
            .metrics
            .observe_finished(reason, usage, timings, self.num_images);
    }
}

pub(super) fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Abort => "abort",
    }
}

/// `"tool_calls"` when an answer of calls is whole, else the engine's reason: `"length"` when
/// `max_tokens` cut the calls (whose arguments are then incomplete JSON), `"stop"` when a stop
/// string did.
pub(super) fn calls_finish_reason(
    reason: FinishReason,
    calls: Option<&CallParser>,
) -> &'static str {
    match calls {
        Some(parser) if matches!(reason, FinishReason::Stop) && parser.complete() => "tool_calls",
        _ => finish_reason(reason),
    }
}

/// One call parser per choice when the answer is tool calls.
pub(super) fn call_parsers(plan: &ChatPlan) -> Vec<Option<CallParser>> {
    (0..plan.n)
        .map(|_| plan.tool_calls.clone().map(CallParser::new))
        .collect()
}

/// Adds one completion's usage: the prompt is counted once, completions summed.
pub(super) fn add_usage(total: &mut Usage, usage: &EngineUsage, first: bool) {
    if first {
        total.prompt_tokens = usage.prompt_tokens;
        total.prompt_tokens_details = PromptTokensDetails {
            cached_tokens: usage.cached_tokens,
        };
    }
    total.completion_tokens += usage.completion_tokens;
    total.total_tokens = total.prompt_tokens + total.completion_tokens;
}

pub(super) async fn collect_reply(
    reply: Reply,
    plan: ChatPlan,
    mut events: RequestStream,
    _held: Held,
) -> Result<Response, ApiError> {
    let wants_logprobs = plan.sampling.logprobs.is_some();
    let mut choices: Vec<Choice> = (0..plan.n)
        .map(|index| Choice {
            index,
            message: ResponseMessage {
                role: "assistant",
                content: Some(String::new()),
                refusal: None,
                tool_calls: None,
            },
            logprobs: wants_logprobs.then(ChoiceLogprobs::default),
            finish_reason: None,
        })
        .collect();
    let mut parsers = call_parsers(&plan);
    let mut usage = Usage::default();
    let mut done = 0;
    while done < plan.n {
        match events.next().await {
            Some(Event::Token {
                index,
                id,
                text,
                logprob,
                top_logprobs,
            }) => {
                let choice = &mut choices[index];
                add_text(&mut choice.message, parsers[index].as_mut(), &text);
                if let (Some(lp), Some(entry)) = (
                    choice.logprobs.as_mut(),
                    reply.logprob(id, logprob, &top_logprobs),
                ) {
                    lp.content.push(entry);
                }
            }
            Some(Event::Finished {
                index,
                text,
                reason,
                usage: u,
                timings,
                ..
            }) => {
                add_text(&mut choices[index].message, parsers[index].as_mut(), &text);
                choices[index].finish_reason =
                    Some(calls_finish_reason(reason, parsers[index].as_ref()));
                add_usage(&mut usage, &u, done == 0);
                reply.record(reason, &u, &timings);
                done += 1;
            }
            Some(Event::Error { message, cause }) => return Err(reply.failure(message, cause)),
            None => return Err(ApiError::internal("the engine stopped mid-request")),
        }
    }
    for (choice, parser) in choices.iter_mut().zip(parsers) {
        if let Some(parser) = parser {
            choice.message.content = None;
            choice.message.tool_calls = Some(parser.into_calls());
        }
    }
    Ok(Json(ChatCompletion {
        id: reply.id,
        object: "chat.completion",
        created: reply.created,
        model: reply.model,
        choices,
        usage,
        system_fingerprint: None,
    })
    .into_response())
}

/// Adds `text` to a choice's answer: its content, or its calls.
fn add_text(message: &mut ResponseMessage, calls: Option<&mut CallParser>, text: &str) {
    match calls {
        // The deltas are a stream's; the parser keeps the calls.
        Some(parser) => {
            parser.feed(text);
        }
        None => message.content.get_or_insert_default().push_str(text),
    }
}
