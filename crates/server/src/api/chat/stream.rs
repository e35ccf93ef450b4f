//! A chat's answer streamed as server-sent events: one chunk per event of the engine, the
//! usage last when asked, and `[DONE]`; a failure mid-stream ends it with an error event.
//! An answer asked to be tool calls is sent as `tool_calls` deltas instead of content.

use super::super::error::ApiError;
use super::super::openai::{ChatCompletionChunk, ChoiceLogprobs, ChunkChoice, Delta, Usage};
use super::super::tools::calls::{CallDelta, CallParser};
use super::super::validate::ChatPlan;
use super::reply::{add_usage, call_parsers, calls_finish_reason, Held, Reply};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::stream::{self, Stream};
use internvl_scheduler::{Event, RequestStream};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

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
    /// Each choice's call parser, when the answer is tool calls.
    parsers: Vec<Option<CallParser>>,
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

    /// Ends the stream with `error` as its last event (a 500's detail is logged with the
    /// request's id, not sent: the client is told in plain words), then `[DONE]` as vLLM
    /// does, so clients that read until `[DONE]` stop too (the OpenAI SDK raises on the error).
    fn fail(&mut self, error: ApiError) {
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

    /// Queues one chunk per call delta of choice `index`, `logprobs` on the first; with none,
    /// a chunk with an empty delta when there are `logprobs` or a `finish` to send. `finish`
    /// comes in a chunk of its own, after the deltas.
    fn push_calls(
        &mut self,
        index: usize,
        deltas: Vec<CallDelta>,
        mut logprobs: Option<ChoiceLogprobs>,
        finish: Option<&'static str>,
    ) {
        for call in deltas {
            let delta = Delta {
                tool_calls: Some(vec![call.into_wire()]),
                ..Delta::default()
            };
            let chunk = self.chunk(index, delta, logprobs.take(), None);
            self.pending.push_back(chunk);
        }
        if logprobs.is_some() || finish.is_some() {
            let chunk = self.chunk(index, Delta::default(), logprobs, finish);
            self.pending.push_back(chunk);
        }
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
                if let Some(parser) = self.parsers[index].as_mut() {
                    let deltas = parser.feed(&text);
                    self.push_calls(index, deltas, logprobs, None);
                } else if !text.is_empty() || logprobs.is_some() {
                    let delta = Delta {
                        content: Some(text),
                        ..Delta::default()
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
                let finish = calls_finish_reason(reason, self.parsers[index].as_ref());
                if let Some(parser) = self.parsers[index].as_mut() {
                    let deltas = parser.feed(&text);
                    self.push_calls(index, deltas, None, Some(finish));
                } else {
                    let delta = Delta {
                        content: (!text.is_empty()).then_some(text),
                        ..Delta::default()
                    };
                    let chunk = self.chunk(index, delta, None, Some(finish));
                    self.pending.push_back(chunk);
                }
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
            Some(Event::Error { message, cause }) => {
                let error = {
                    let _entered = self.span.enter();
                    self.reply.failure(message, cause)
                };
                self.fail(error)
            }
            None => {
                let error = {
                    let _entered = self.span.enter();
                    ApiError::internal("the engine stopped mid-request")
                };
                self.fail(error)
            }
        }
        true
    }
}

pub(super) fn stream_reply(
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
        parsers: call_parsers(&plan),
        span,
        _held: held,
    };
    for index in 0..plan.n {
        // A named call is announced at once, with the role.
        let (content, calls) = match state.parsers[index].as_mut() {
            Some(parser) => (None, parser.feed("")),
            None => (Some(String::new()), Vec::new()),
        };
        let delta = Delta {
            role: Some("assistant"),
            content,
            tool_calls: None,
        };
        let first = state.chunk(index, delta, None, None);
        state.pending.push_back(first);
        state.push_calls(index, calls, None, None);
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
