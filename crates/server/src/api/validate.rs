//! From an OpenAI request to what the engine runs, refusing what cannot be honoured.
//!
//! Kept apart from the handlers so every rule is testable without HTTP.

use super::error::{echoed, ApiError};
use super::fields::check_other_fields;
use super::messages::convert_with_block;
use super::openai::{ChatCompletionRequest, Stop};
use super::structured::{constraint, Constrained};
use super::tools::{answer_grammar, plan_tools, CallFormat};
use internvl_model::prompt::ChatMessage;
use internvl_scheduler::{SamplingError, SamplingParams, StopError, StopParams, SubmitError};

/// What a request is checked against: this server's limits and its model.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    pub max_images: usize,
    /// Most bytes of text in all messages together.
    pub max_prompt_bytes: usize,
    /// Width of the model's logits: every token id a request names must be below it.
    pub vocab_size: usize,
    pub eos_token_id: u32,
}

/// A valid chat request, ready for tokenization. Its sampling and stop settings have passed
/// the engine's own checks ([`SamplingParams::validate`], [`StopParams::validate`]); what
/// needs the prompt (its length against the context, `n`) is checked by
/// [`internvl_scheduler::validate`] once it is tokenized, before any image is fetched.
#[derive(Debug)]
pub struct ChatPlan {
    pub messages: Vec<ChatMessage>,
    /// URLs of the images, in the order of their placeholders.
    pub image_urls: Vec<String>,
    pub sampling: SamplingParams,
    /// `None`: as many as fit in the model's context.
    pub max_tokens: Option<usize>,
    /// With `max_tokens` as asked, or unbounded (`usize::MAX`) until the prompt is known: see
    /// [`ChatPlan::stop_for`].
    pub stop: StopParams,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    /// The grammar the output must follow, compiled with the prompt's tokenization.
    pub constrained: Option<Constrained>,
    /// How the output is read into tool calls, when calls were asked for.
    pub tool_calls: Option<CallFormat>,
}

impl ChatPlan {
    /// The stop settings for a prompt of `prompt_len` tokens: `max_tokens` as asked, or what
    /// the context leaves (at least 1, so that a prompt filling the whole context is refused
    /// for its length rather than for asking no tokens).
    pub fn stop_for(&self, prompt_len: usize, max_model_len: usize) -> StopParams {
        let fits = max_model_len.saturating_sub(prompt_len).max(1);
        StopParams {
            max_tokens: self.max_tokens.unwrap_or(fits),
            ..self.stop.clone()
        }
    }
}

/// A client's count as a `usize`. Saturating is exact here: every limit a count meets is at
/// most `usize::MAX`, so a count past it is refused by the same rule as any other too large.
fn count(value: u64) -> usize {
    usize::try_from(value).unwrap_or(usize::MAX)
}

/// `ids` without repeats, in their first order. Each generated token is looked up in the stop
/// tokens, so repeats (as many as the body limit allows) would let a client set the cost of
/// every token; ids past the vocabulary are kept for [`StopParams::validate`] to refuse.
fn distinct_tokens(ids: Vec<u32>, vocab_size: usize) -> Vec<u32> {
    let mut seen = vec![false; vocab_size];
    ids.into_iter()
        .filter(|&id| match seen.get_mut(id as usize) {
            Some(seen) => !std::mem::replace(seen, true),
            None => true,
        })
        .collect()
}

/// 404 for a model this server does not serve. Only the start of the name is echoed: the
/// field is unbounded (up to the body limit), the answer must not be.
pub fn check_model(requested: &str, served: &str) -> Result<(), ApiError> {
    if requested == served {
        return Ok(());
    }
    let shown = echoed(requested, 64);
    Err(ApiError::model_not_found(format!(
        "The model `{shown}` does not exist; this server serves `{served}`"
    )))
}

/// Checks a chat request and turns its fields into the engine's types. Range rules are the
/// engine's alone; what is checked here is what the engine's types cannot express (JSON
/// shapes, `top_k: -1`, token ids as strings) and what is this server's (fields it does not
/// support, images per request, prompt size).
pub fn validate_chat(req: ChatCompletionRequest, rules: &Rules) -> Result<ChatPlan, ApiError> {
    check_other_fields(&req.other)?;
    let tools = plan_tools((&req).into())?;
    let block = tools.as_ref().map(|t| t.block.as_str());
    let (messages, image_urls) = convert_with_block(&req.messages, block, rules.max_prompt_bytes)?;
    if image_urls.len() > rules.max_images {
        return Err(ApiError::invalid(
            "messages",
            format!(
                "{} images in one request; at most {} are allowed",
                image_urls.len(),
                rules.max_images
            ),
        ));
    }
    if req.stream_options.is_some() && !req.stream {
        return Err(ApiError::invalid(
            "stream_options",
            "stream_options is only allowed when stream is true",
        ));
    }
    let max_tokens_param = if req.max_completion_tokens.is_some() {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    let max_tokens = req.max_completion_tokens.or(req.max_tokens).map(count);
    let constrained = constraint(&req)?;
    let (constrained, tool_calls) = answer_grammar(tools, constrained)?;
    let sampling = sampling(&req)?;
    sampling
        .validate(rules.vocab_size)
        .map_err(|e| sampling_error(&e))?;
    let stop = StopParams {
        max_tokens: max_tokens.unwrap_or(usize::MAX),
        min_tokens: req.min_tokens.map_or(0, count),
        stop_token_ids: distinct_tokens(req.stop_token_ids.unwrap_or_default(), rules.vocab_size),
        stop_strings: match req.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        },
        ignore_eos: req.ignore_eos,
        eos_token_id: Some(rules.eos_token_id),
    };
    stop.validate(rules.vocab_size).map_err(|e| match e {
        StopError::MaxTokens => ApiError::invalid(
            max_tokens_param,
            format!("{max_tokens_param} must be at least 1"),
        ),
        other => ApiError::invalid(other.param(), other.to_string()),
    })?;
    Ok(ChatPlan {
        messages,
        image_urls,
        sampling,
        max_tokens,
        stop,
        n: req.n.map_or(1, count),
        stream: req.stream,
        include_usage: req.stream_options.is_some_and(|o| o.include_usage),
        constrained,
        tool_calls,
    })
}

/// The OpenAI sampling fields as the engine's settings, OpenAI's defaults filled in.
fn sampling(req: &ChatCompletionRequest) -> Result<SamplingParams, ApiError> {
    let top_k = match req.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) => usize::try_from(k).map_err(|_| {
            ApiError::invalid(
                "top_k",
                format!("top_k must be -1 (off) or positive, got {k}"),
            )
        })?,
    };
    let logit_bias = req
        .logit_bias
        .iter()
        .flatten()
        .map(|(token, &bias)| {
            let id: u32 = token.parse().map_err(|_| {
                ApiError::invalid("logit_bias", format!("`{token}` is not a token id"))
            })?;
            Ok((id, bias))
        })
        .collect::<Result<_, ApiError>>()?;
    let logprobs = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
        (false, Some(_)) => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "top_logprobs requires logprobs to be true",
            ))
        }
        (false, None) => None,
        (true, top) => Some(top.map_or(0, count)),
    };
    Ok(SamplingParams {
        temperature: req.temperature.unwrap_or(1.0),
        top_k,
        top_p: req.top_p.unwrap_or(1.0),
        min_p: req.min_p.unwrap_or(0.0),
        presence_penalty: req.presence_penalty.unwrap_or(0.0),
        frequency_penalty: req.frequency_penalty.unwrap_or(0.0),
        repetition_penalty: req.repetition_penalty.unwrap_or(1.0),
        logit_bias,
        logprobs,
        // Reinterpreted, not clamped: each i64 seed is its own u64 seed.
        seed: req.seed.map(|s| s as u64),
    })
}

fn sampling_error(e: &SamplingError) -> ApiError {
    match e.param() {
        Some(param) => ApiError::invalid(param, e.to_string()),
        None => ApiError::bad_request(e.to_string()),
    }
}

/// The engine's refusal of a request, as the 400 (or 503) that names the field at fault.
pub fn submit_error(e: SubmitError) -> ApiError {
    match e {
        SubmitError::Stopped => ApiError::unavailable("The engine has stopped"),
        SubmitError::TooLong {
            prompt,
            max_tokens,
            max_model_len,
        } => ApiError::invalid(
            "messages",
            format!(
                "This model's maximum context length is {max_model_len} tokens. However, you \
                 requested {} tokens ({prompt} in the messages, {max_tokens} in the \
                 completion). Please reduce the length of the messages or completion.",
                // Wider than usize: `max_tokens` may be anything the client sent.
                prompt as u128 + max_tokens as u128
            ),
        ),
        SubmitError::CacheTooSmall { .. } => ApiError::invalid("messages", e.to_string()),
        SubmitError::BadN(_) => ApiError::invalid("n", e.to_string()),
        SubmitError::NoTokens => ApiError::invalid("max_tokens", e.to_string()),
        SubmitError::Sampling(ref s) => sampling_error(s),
        SubmitError::Stop(ref s) => ApiError::invalid(s.param(), e.to_string()),
        other => ApiError::bad_request(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use internvl_model::prompt::Role;
    use serde_json::json;

    fn request(body: serde_json::Value) -> ChatCompletionRequest {
        serde_json::from_value(body).unwrap()
    }

    fn chat(extra: serde_json::Value) -> Result<ChatPlan, ApiError> {
        let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        validate_chat(request(body), &rules(4))
    }

    fn rules(max_images: usize) -> Rules {
        Rules {
            max_images,
            max_prompt_bytes: 64,
            vocab_size: 100,
            eos_token_id: 2,
        }
    }

    #[test]
    fn openai_defaults() {
        let plan = chat(json!({})).unwrap();
        assert_eq!(plan.sampling.temperature, 1.0);
        assert_eq!((plan.n, plan.max_tokens, plan.stream), (1, None, false));
        assert_eq!(plan.sampling.logprobs, None);
    }

    #[test]
    fn fields_are_honoured() {
        let plan = chat(json!({
            "max_tokens": 5, "max_completion_tokens": 7, "temperature": 0, "top_p": 0.5,
            "top_k": 3, "min_p": 0.1, "n": 2, "stop": "x", "seed": 9, "presence_penalty": 1,
            "frequency_penalty": -1, "repetition_penalty": 1.2, "logit_bias": {"42": 5},
            "logprobs": true, "top_logprobs": 3, "min_tokens": 2, "ignore_eos": true, "stop_token_ids": [7, 3, 7],
            "stream": true, "stream_options": {"include_usage": true}, "user": "u",
            "response_format": {"type": "text"}, "unknown_field": 1
        }))
        .unwrap();
        assert_eq!(plan.max_tokens, Some(7), "max_completion_tokens wins");
        assert_eq!(plan.sampling.top_k, 3);
        assert_eq!(plan.sampling.logit_bias.get(&42), Some(&5.0));
        assert_eq!(plan.sampling.logprobs, Some(3));
        assert_eq!(plan.stop.stop_strings, vec!["x".to_string()]);
        assert!(plan.include_usage && plan.stop.ignore_eos && plan.stream);
        assert_eq!(
            (plan.n, plan.stop.min_tokens, plan.sampling.seed),
            (2, 2, Some(9))
        );
        assert_eq!(plan.stop.eos_token_id, Some(2));
        assert_eq!(plan.stop.stop_token_ids, vec![7, 3], "repeats dropped");
    }

    #[test]
    fn bad_values_name_their_field() {
        let long_stop = "x".repeat(257);
        let (text_65, text_40) = ("x".repeat(65), "x".repeat(40));
        let cases = [
            (json!({"temperature": 3}), "temperature"),
            (json!({"top_p": 0}), "top_p"),
            (json!({"top_k": -2}), "top_k"),
            (json!({"max_tokens": 0}), "max_tokens"),
            (json!({"top_logprobs": 2}), "top_logprobs"),
            (
                json!({"logprobs": true, "top_logprobs": 21}),
                "top_logprobs",
            ),
            (json!({"logit_bias": {"abc": 1}}), "logit_bias"),
            (json!({"logit_bias": {"1": 101}}), "logit_bias"),
            (json!({"logit_bias": {"100": 1}}), "logit_bias"),
            (json!({"logit_bias": {"-1": 1}}), "logit_bias"),
            (json!({"stop": [""]}), "stop"),
            (json!({"stop": vec!["a"; 17]}), "stop"),
            (json!({"stop": long_stop}), "stop"),
            (json!({"repetition_penalty": 2.5}), "repetition_penalty"),
            (json!({"repetition_penalty": 0}), "repetition_penalty"),
            (json!({"top_p": 1.5}), "top_p"),
            (json!({"min_p": -1}), "min_p"),
            (json!({"frequency_penalty": 3}), "frequency_penalty"),
            (json!({"max_completion_tokens": 0}), "max_completion_tokens"),
            (
                json!({"min_tokens": u64::MAX, "max_tokens": 3}),
                "min_tokens",
            ),
            (
                json!({"logprobs": true, "top_logprobs": u64::MAX}),
                "top_logprobs",
            ),
            (
                json!({"messages": [{"role": "user", "content": text_65}]}),
                "messages",
            ),
            (
                json!({"messages": [{"role": "user", "content": [
                    {"type": "text", "text": text_40},
                    {"type": "text", "text": text_40}]}]}),
                "messages",
            ),
            (
                json!({"stream_options": {"include_usage": true}}),
                "stream_options",
            ),
            (json!({"min_tokens": 9, "max_tokens": 3}), "min_tokens"),
            (json!({"presence_penalty": -3}), "presence_penalty"),
            (json!({"stop_token_ids": [1, 100]}), "stop_token_ids"),
            (json!({"echo": true}), "echo"),
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": ""}}}),
                "response_format",
            ),
        ];
        for (extra, param) in cases {
            let err = chat(extra.clone()).unwrap_err();
            assert_eq!(err.status.as_u16(), 400, "{extra}");
            assert_eq!(
                err.param.as_deref(),
                Some(param),
                "{extra}: {}",
                err.message
            );
        }
    }

    #[test]
    fn messages_with_images_and_roles() {
        let body = json!({"model": "m", "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [
                {"type": "text", "text": "what"},
                {"type": "image_url", "image_url": {"url": "data:a", "detail": "high"}},
                {"type": "image_url", "image_url": {"url": "data:b"}}
            ]},
            {"role": "assistant", "content": null},
            {"role": "user", "content": "and?"}
        ]});
        let plan = validate_chat(request(body), &rules(4)).unwrap();
        assert_eq!(plan.image_urls, vec!["data:a", "data:b"]);
        assert_eq!(plan.messages[0].role, Role::System);
        assert_eq!(plan.messages[1].parts.len(), 3);

        let too_many = json!({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "1"}},
            {"type": "image_url", "image_url": {"url": "2"}}
        ]}]});
        assert_eq!(
            validate_chat(request(too_many), &rules(1))
                .unwrap_err()
                .param
                .as_deref(),
            Some("messages")
        );
        let bad_role = json!({"model": "m", "messages": [{"role": "function", "content": "x"}]});
        assert_eq!(
            validate_chat(request(bad_role), &rules(1))
                .unwrap_err()
                .param
                .as_deref(),
            Some("messages[0].role")
        );
        let audio = json!({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {}}]}]});
        assert_eq!(
            validate_chat(request(audio), &rules(1))
                .unwrap_err()
                .param
                .as_deref(),
            Some("messages[0].content[0].type")
        );
        let no_user = json!({"model": "m", "messages": [{"role": "system", "content": "x"}]});
        assert!(validate_chat(request(no_user), &rules(1)).is_err());
    }

    #[test]
    fn counts_past_usize_saturate_and_lengths_are_left_to_the_context_check() {
        let plan = chat(json!({"max_tokens": u64::MAX, "n": u64::MAX})).unwrap();
        assert_eq!((plan.max_tokens, plan.n), (Some(usize::MAX), usize::MAX));
        assert_eq!(plan.stop_for(10, 2048).max_tokens, usize::MAX);
        let plan = chat(json!({})).unwrap();
        assert_eq!(plan.stop_for(10, 2048).max_tokens, 2038);
        assert_eq!(
            plan.stop_for(4000, 2048).max_tokens,
            1,
            "refused for its length"
        );
        let e = submit_error(SubmitError::TooLong {
            prompt: 10,
            max_tokens: usize::MAX,
            max_model_len: 2048,
        });
        assert_eq!(e.param.as_deref(), Some("messages"));
        assert!(
            e.message.contains("18446744073709551625 tokens"),
            "{}",
            e.message
        );
        assert_eq!(
            submit_error(SubmitError::BadN(0)).param.as_deref(),
            Some("n")
        );
    }

    #[test]
    fn unknown_models_are_echoed_truncated() {
        assert!(check_model("m", "m").is_ok());
        let long = "é".repeat(100_000);
        let e = check_model(&long, "m").unwrap_err();
        assert_eq!(e.status.as_u16(), 404);
        assert!(
            e.message.contains(&format!("`{}…`", "é".repeat(64))),
            "{}",
            e.message
        );
        assert!(e.message.len() < 300);
        let e = check_model("gpt-4o", "m").unwrap_err();
        assert!(e.message.contains("`gpt-4o`"), "{}", e.message);
    }
}
