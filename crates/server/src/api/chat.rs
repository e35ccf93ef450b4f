//! `POST /v1/chat/completions`, streamed (SSE) or not.

use super::error::ApiError;
use super::extract::ApiJson;
use super::openai::{
    ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice, ChoiceLogprobs,
    ChunkChoice, Delta, PromptTokensDetails, ResponseMessage, TokenLogprob, TopLogprob, Usage,
};
use super::request_id::random_id;
use super::validate::{check_model, submit_error, validate_chat, ChatPlan, Rules};
use crate::service::request::{image_inputs, request, Generation, PreparedImage};
use crate::service::Service;
use crate::state::{Admission, AppState, ImageReservation};
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream};
use internvl_model::preprocess::preprocess;
use internvl_model::tokenizer::Tokenizer;
use internvl_scheduler::{Event, FinishReason, RequestStream, Usage as EngineUsage};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// What a request holds until its answer is complete: its place among the admitted requests
/// and the memory of its images' pixels.
struct Held {
    _admission: Admission,
    _images: ImageReservation,
}

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
    let prompt = state
        .tokenize(move |ready| {
            ready
                .loaded
                .encode_prompt(&messages)
                .map_err(|e| ApiError::invalid("messages", e.to_string()))
        })
        .await?;
    let generation = Generation {
        sampling: plan.sampling.clone(),
        stop: plan.stop_for(prompt.ids.len(), ready.max_model_len),
        n: plan.n,
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
    };
    let held = Held {
        _admission: admission,
        _images: reservation,
    };
    if plan.stream {
        Ok(stream_reply(reply, plan, events, held, span).into_response())
    } else {
        collect_reply(reply, plan, events, held).await
    }
}

/// Bytes of one image's pixels as the model takes them: 3 channels of f32.
fn pixel_bytes(ready: &Service) -> usize {
    let side = ready.loaded.preprocess.image_size as usize;
    side.saturating_mul(side)
        .saturating_mul(3 * std::mem::size_of::<f32>())
}

/// The most bytes the file behind `url` may have: a data URL's decoded size is known from its
/// length (4 base64 characters per 3 bytes), any other URL may bring up to `max_bytes`.
fn file_bound(url: &str, max_bytes: usize) -> usize {
    let url = url.trim();
    if url
        .get(..5)
        .is_some_and(|s| s.eq_ignore_ascii_case("data:"))
    {
        (url.len() / 4 * 3 + 3).min(max_bytes)
    } else {
        max_bytes
    }
}

/// Fetches every image and preprocesses it on the blocking pool, a bounded number at a time,
/// with the image memory of the worst case reserved before the first byte arrives; returned
/// with the reservation cut to what the files and pixels take.
async fn load_images(
    state: &Arc<AppState>,
    ready: &Service,
    urls: &[String],
) -> Result<(Vec<PreparedImage>, ImageReservation), ApiError> {
    let pixels = pixel_bytes(ready);
    let max_file = ready.loaded.preprocess.limits.max_bytes;
    let worst = urls
        .iter()
        .map(|u| file_bound(u, max_file).saturating_add(pixels))
        .fold(0, usize::saturating_add);
    let mut reservation = state.reserve_image_memory(worst)?;
    let fetched = futures_util::future::try_join_all(urls.iter().map(|u| state.fetcher.fetch(u)))
        .await
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    let file_bytes = fetched.iter().map(Vec::len).fold(0, usize::saturating_add);
    let max_request = state.limits.max_request_image_bytes;
    if file_bytes > max_request {
        return Err(ApiError::invalid(
            "messages",
            format!(
                "The images of this request take {file_bytes} bytes; at most {max_request} \
                 are allowed in one request"
            ),
        ));
    }
    reservation.shrink_to(file_bytes.saturating_add(pixels.saturating_mul(urls.len())));
    let jobs = fetched.into_iter().enumerate().map(|(i, bytes)| {
        let config = ready.loaded.preprocess.clone();
        let slots = state.preprocess_slots.clone();
        let state = state.clone();
        async move {
            let slot = slots
                .acquire_owned()
                .await
                .map_err(|_| ApiError::unavailable("The server is shutting down"))?;
            let started = Instant::now();
            // The slot goes with the decode: a client that leaves cannot free it while it runs.
            // Hashed there too, after the decode is timed: SHA-256 of a large file is
            // milliseconds of CPU.
            let (result, decoded) = tokio::task::spawn_blocking(move || {
                let _slot = slot;
                let result = preprocess(&bytes, &config);
                let decoded = started.elapsed();
                (
                    result.map(|pixels| PreparedImage::new(&bytes, pixels)),
                    decoded,
                )
            })
            .await
            .map_err(|e| ApiError::internal(format!("image preprocessing crashed: {e}")))?;
            state.metrics.observe_preprocess(decoded);
            result.map_err(|e| ApiError::invalid("messages", format!("image {i}: {e}")))
        }
    });
    let images = futures_util::future::try_join_all(jobs).await?;
    Ok((images, reservation))
}

/// What every chunk or answer of one request repeats.
struct Reply {
    id: String,
    created: u64,
    model: String,
    tokenizer: Arc<Tokenizer>,
    state: Arc<AppState>,
    num_images: usize,
}

impl Reply {
    fn logprob(&self, id: u32, logprob: Option<f32>, top: &[(u32, f32)]) -> Option<TokenLogprob> {
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

    fn record(
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

fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Abort => "abort",
    }
}

/// Adds one completion's usage: the prompt is counted once, completions summed.
fn add_usage(total: &mut Usage, usage: &EngineUsage, first: bool) {
    if first {
        total.prompt_tokens = usage.prompt_tokens;
        total.prompt_tokens_details = PromptTokensDetails {
            cached_tokens: usage.cached_tokens,
        };
    }
    total.completion_tokens += usage.completion_tokens;
    total.total_tokens = total.prompt_tokens + total.completion_tokens;
}

async fn collect_reply(
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
                content: String::new(),
                refusal: None,
            },
            logprobs: wants_logprobs.then(ChoiceLogprobs::default),
            finish_reason: None,
        })
        .collect();
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
                choice.message.content.push_str(&text);
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
                choices[index].message.content.push_str(&text);
                choices[index].finish_reason = Some(finish_reason(reason));
                add_usage(&mut usage, &u, done == 0);
                reply.record(reason, &u, &timings);
                done += 1;
            }
            Some(Event::Error { message }) => {
                return Err(ApiError::internal(format!("generation failed: {message}")))
            }
            None => return Err(ApiError::internal("the engine stopped mid-request")),
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

/// The state of a streamed answer between two SSE events.
struct Streaming {
    reply: Reply,
    events: RequestStream,
    include_usage: bool,
    n: usize,
    done: usize,
    usage: Usage,
    pending: VecDeque<SseEvent>,
    finished: bool,
    /// The request's span, entered to report a failure with the request's id.
    span: tracing::Span,
    _held: Held,
}

impl Streaming {
    fn chunk(
        &self,
        index: usize,
        delta: Delta,
        logprobs: Option<ChoiceLogprobs>,
        finish: Option<&'static str>,
    ) -> SseEvent {
        let choice = ChunkChoice {
            index,
            delta,
            logprobs,
            finish_reason: finish,
        };
        self.event(vec![choice], self.include_usage.then_some(None))
    }

    /// Ends the stream with a 500 error event for `detail` (logged with the request's id, not
    /// sent: the client is told in plain words), then `[DONE]` as vLLM does, so clients that
    /// read until `[DONE]` stop too (the OpenAI SDK raises on the error).
    fn fail(&mut self, detail: String) {
        let error = {
            let _entered = self.span.enter();
            ApiError::internal(detail)
        };
        self.pending
            .push_back(SseEvent::default().data(error.body().to_string()));
        self.pending.push_back(SseEvent::default().data("[DONE]"));
        self.finished = true;
    }

    /// One chunk as an SSE event; `usage` is absent, null, or (last chunk) the totals.
    fn event(&self, choices: Vec<ChunkChoice>, usage: Option<Option<Usage>>) -> SseEvent {
        let chunk = ChatCompletionChunk {
            id: self.reply.id.clone(),
            object: "chat.completion.chunk",
            created: self.reply.created,
            model: self.reply.model.clone(),
            choices,
            usage,
            system_fingerprint: None,
        };
        SseEvent::default().data(serde_json::to_string(&chunk).unwrap_or_default())
    }

    /// Turns the next engine event into SSE events; false when the stream is over.
    async fn advance(&mut self) -> bool {
        if self.finished {
            return false;
        }
        match self.events.next().await {
            Some(Event::Token {
                index,
                id,
                text,
                logprob,
                top_logprobs,
            }) => {
                let logprobs =
                    self.reply
                        .logprob(id, logprob, &top_logprobs)
                        .map(|entry| ChoiceLogprobs {
                            content: vec![entry],
                        });
                if !text.is_empty() || logprobs.is_some() {
                    let delta = Delta {
                        role: None,
                        content: Some(text),
                    };
                    let chunk = self.chunk(index, delta, logprobs, None);
                    self.pending.push_back(chunk);
                }
            }
            Some(Event::Finished {
                index,
                text,
                reason,
                usage,
                timings,
                ..
            }) => {
                let delta = Delta {
                    role: None,
                    content: (!text.is_empty()).then_some(text),
                };
                let chunk = self.chunk(index, delta, None, Some(finish_reason(reason)));
                self.pending.push_back(chunk);
                add_usage(&mut self.usage, &usage, self.done == 0);
                self.reply.record(reason, &usage, &timings);
                self.done += 1;
                if self.done == self.n {
                    if self.include_usage {
                        let event = self.event(Vec::new(), Some(Some(self.usage)));
                        self.pending.push_back(event);
                    }
                    self.pending.push_back(SseEvent::default().data("[DONE]"));
                    self.finished = true;
                }
            }
            Some(Event::Error { message }) => self.fail(format!("generation failed: {message}")),
            None => self.fail("the engine stopped mid-request".to_string()),
        }
        true
    }
}

fn stream_reply(
    reply: Reply,
    plan: ChatPlan,
    events: RequestStream,
    held: Held,
    span: tracing::Span,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let mut state = Streaming {
        reply,
        events,
        include_usage: plan.include_usage,
        n: plan.n,
        done: 0,
        usage: Usage::default(),
        pending: VecDeque::new(),
        finished: false,
        span,
        _held: held,
    };
    for index in 0..plan.n {
        let delta = Delta {
            role: Some("assistant"),
            content: Some(String::new()),
        };
        let first = state.chunk(index, delta, None, None);
        state.pending.push_back(first);
    }
    // Dropping this stream (the client went away) drops `events`, which cancels the request.
    let events = stream::unfold(state, |mut state| async move {
        loop {
            if let Some(event) = state.pending.pop_front() {
                return Some((Ok(event), state));
            }
            if !state.advance().await {
                return None;
            }
        }
    });
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
}
