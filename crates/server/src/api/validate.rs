//! From an OpenAI request to what the engine runs, refusing what cannot be honoured.
//!
//! Kept apart from the handlers so every rule is testable without HTTP.

use super::error::ApiError;
use super::openai::{
    ChatCompletionRequest, ContentPart, MessageContent, RequestMessage, Stop, UNSUPPORTED_FIELDS,
};
use internvl_model::prompt::{ChatMessage, Part, Role};
use internvl_scheduler::sampling::MAX_TOP_LOGPROBS;
use internvl_scheduler::scheduler::MAX_N;
use internvl_scheduler::SamplingParams;

/// Most stop strings per request.
const MAX_STOP_STRINGS: usize = 16;

/// A valid chat request, ready for tokenization.
#[derive(Debug)]
pub struct ChatPlan {
    pub messages: Vec<ChatMessage>,
    /// URLs of the images, in the order of their placeholders.
    pub image_urls: Vec<String>,
    pub sampling: SamplingParams,
    /// `None`: as many as fit in the model's context.
    pub max_tokens: Option<usize>,
    pub min_tokens: usize,
    pub stop_strings: Vec<String>,
    pub ignore_eos: bool,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
}

/// Checks a chat request; `max_images` bounds the images of one request.
pub fn validate_chat(req: ChatCompletionRequest, max_images: usize) -> Result<ChatPlan, ApiError> {
    for field in UNSUPPORTED_FIELDS {
        if req.other.get(field).is_some_and(|v| !v.is_null()) {
            return Err(ApiError::invalid(
                field,
                format!("`{field}` is not supported by this server"),
            ));
        }
    }
    if let Some(format) = &req.response_format {
        if format.get("type").and_then(|t| t.as_str()) != Some("text") {
            return Err(ApiError::invalid(
                "response_format",
                "only response_format {\"type\": \"text\"} is supported",
            ));
        }
    }
    let (messages, image_urls) = convert_messages(&req.messages)?;
    if image_urls.len() > max_images {
        return Err(ApiError::invalid(
            "messages",
            format!(
                "{} images in one request; at most {max_images} are allowed",
                image_urls.len()
            ),
        ));
    }
    if req.stream_options.is_some() && !req.stream {
        return Err(ApiError::invalid(
            "stream_options",
            "stream_options is only allowed when stream is true",
        ));
    }
    let max_tokens = match req.max_completion_tokens.or(req.max_tokens) {
        Some(0) => {
            let param = if req.max_completion_tokens.is_some() {
                "max_completion_tokens"
            } else {
                "max_tokens"
            };
            return Err(ApiError::invalid(
                param,
                format!("{param} must be at least 1"),
            ));
        }
        other => other.map(|v| v.min(usize::MAX as u64) as usize),
    };
    let min_tokens = req.min_tokens.unwrap_or(0) as usize;
    if max_tokens.is_some_and(|m| min_tokens > m) {
        return Err(ApiError::invalid(
            "min_tokens",
            "min_tokens must not exceed max_tokens",
        ));
    }
    let n = req.n.unwrap_or(1);
    if n == 0 || n > MAX_N as u64 {
        return Err(ApiError::invalid(
            "n",
            format!("n must be between 1 and {MAX_N}"),
        ));
    }
    let sampling = sampling(&req)?;
    let stop_strings = match req.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop_strings.len() > MAX_STOP_STRINGS || stop_strings.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            "stop",
            format!("stop takes at most {MAX_STOP_STRINGS} non-empty strings"),
        ));
    }
    Ok(ChatPlan {
        messages,
        image_urls,
        sampling,
        max_tokens,
        min_tokens,
        stop_strings,
        ignore_eos: req.ignore_eos,
        n: n as usize,
        stream: req.stream,
        include_usage: req.stream_options.is_some_and(|o| o.include_usage),
    })
}

fn in_range(
    param: &str,
    value: Option<f32>,
    lo: f32,
    hi: f32,
    default: f32,
) -> Result<f32, ApiError> {
    let v = value.unwrap_or(default);
    if !(v.is_finite() && v >= lo && v <= hi) {
        return Err(ApiError::invalid(
            param,
            format!("{param} must be between {lo} and {hi}, got {v}"),
        ));
    }
    Ok(v)
}

fn sampling(req: &ChatCompletionRequest) -> Result<SamplingParams, ApiError> {
    let top_p = in_range("top_p", req.top_p, 0.0, 1.0, 1.0)?;
    if top_p == 0.0 {
        return Err(ApiError::invalid("top_p", "top_p must be greater than 0"));
    }
    let top_k = match req.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => {
            return Err(ApiError::invalid(
                "top_k",
                format!("top_k must be -1 (off) or positive, got {k}"),
            ))
        }
    };
    let repetition_penalty = req.repetition_penalty.unwrap_or(1.0);
    if !(repetition_penalty.is_finite() && repetition_penalty > 0.0 && repetition_penalty <= 2.0) {
        return Err(ApiError::invalid(
            "repetition_penalty",
            "repetition_penalty must be in (0, 2]",
        ));
    }
    let logit_bias = req
        .logit_bias
        .iter()
        .flatten()
        .map(|(token, &bias)| {
            let id: u32 = token.parse().map_err(|_| {
                ApiError::invalid("logit_bias", format!("`{token}` is not a token id"))
            })?;
            if !(-100.0..=100.0).contains(&bias) {
                return Err(ApiError::invalid(
                    "logit_bias",
                    format!("bias {bias} for token {id} is outside [-100, 100]"),
                ));
            }
            Ok((id, bias))
        })
        .collect::<Result<_, _>>()?;
    let logprobs = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
        (false, Some(_)) => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "top_logprobs requires logprobs to be true",
            ))
        }
        (false, None) => None,
        (true, top) => {
            let top = top.unwrap_or(0);
            if top > MAX_TOP_LOGPROBS as u64 {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    format!("top_logprobs must be at most {MAX_TOP_LOGPROBS}"),
                ));
            }
            Some(top as usize)
        }
    };
    Ok(SamplingParams {
        temperature: in_range("temperature", req.temperature, 0.0, 2.0, 1.0)?,
        top_k,
        top_p,
        min_p: in_range("min_p", req.min_p, 0.0, 1.0, 0.0)?,
        presence_penalty: in_range("presence_penalty", req.presence_penalty, -2.0, 2.0, 0.0)?,
        frequency_penalty: in_range("frequency_penalty", req.frequency_penalty, -2.0, 2.0, 0.0)?,
        repetition_penalty,
        logit_bias,
        logprobs,
        seed: req.seed.map(|s| s as u64),
    })
}

/// OpenAI messages → template messages and the image URLs they reference, in order.
pub fn convert_messages(
    messages: &[RequestMessage],
) -> Result<(Vec<ChatMessage>, Vec<String>), ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("messages", "messages must not be empty"));
    }
    let mut urls = Vec::new();
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            other => {
                return Err(ApiError::invalid(
                    &format!("messages[{i}].role"),
                    format!("role `{other}` is not supported (system, user, assistant)"),
                ))
            }
        };
        let parts = match &m.content {
            None if role == Role::Assistant => vec![Part::Text(String::new())],
            None => {
                return Err(ApiError::invalid(
                    &format!("messages[{i}].content"),
                    "content is required",
                ))
            }
            Some(MessageContent::Text(text)) => vec![Part::Text(text.clone())],
            Some(MessageContent::Parts(parts)) => parts
                .iter()
                .enumerate()
                .map(|(j, p)| convert_part(i, j, p, role, &mut urls))
                .collect::<Result<_, _>>()?,
        };
        out.push(ChatMessage { role, parts });
    }
    if !out.iter().any(|m| m.role == Role::User) {
        return Err(ApiError::invalid(
            "messages",
            "the conversation needs at least one user message",
        ));
    }
    Ok((out, urls))
}

fn convert_part(
    i: usize,
    j: usize,
    part: &ContentPart,
    role: Role,
    urls: &mut Vec<String>,
) -> Result<Part, ApiError> {
    let param = format!("messages[{i}].content[{j}]");
    match part.kind.as_str() {
        "text" => part
            .text
            .clone()
            .map(Part::Text)
            .ok_or_else(|| ApiError::invalid(&param, "a text part needs `text`")),
        "image_url" if role != Role::User => Err(ApiError::invalid(
            &param,
            "only user messages can contain images",
        )),
        "image_url" => {
            let url = part.image_url.as_ref().ok_or_else(|| {
                ApiError::invalid(&param, "an image_url part needs `image_url.url`")
            })?;
            urls.push(url.url.clone());
            Ok(Part::Image)
        }
        other => Err(ApiError::invalid(
            &format!("{param}.type"),
            format!("content part type `{other}` is not supported (text, image_url)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn request(body: serde_json::Value) -> ChatCompletionRequest {
        serde_json::from_value(body).unwrap()
    }

    fn chat(extra: serde_json::Value) -> Result<ChatPlan, ApiError> {
        let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        validate_chat(request(body), 4)
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
            "logprobs": true, "top_logprobs": 3, "min_tokens": 2, "ignore_eos": true,
            "stream": true, "stream_options": {"include_usage": true}, "user": "u",
            "response_format": {"type": "text"}, "unknown_field": 1
        }))
        .unwrap();
        assert_eq!(plan.max_tokens, Some(7), "max_completion_tokens wins");
        assert_eq!(plan.sampling.top_k, 3);
        assert_eq!(plan.sampling.logit_bias.get(&42), Some(&5.0));
        assert_eq!(plan.sampling.logprobs, Some(3));
        assert_eq!(plan.stop_strings, vec!["x".to_string()]);
        assert!(plan.include_usage && plan.ignore_eos && plan.stream);
        assert_eq!(
            (plan.n, plan.min_tokens, plan.sampling.seed),
            (2, 2, Some(9))
        );
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases = [
            (json!({"temperature": 3}), "temperature"),
            (json!({"top_p": 0}), "top_p"),
            (json!({"top_k": -2}), "top_k"),
            (json!({"n": 0}), "n"),
            (json!({"max_tokens": 0}), "max_tokens"),
            (json!({"top_logprobs": 2}), "top_logprobs"),
            (
                json!({"logprobs": true, "top_logprobs": 21}),
                "top_logprobs",
            ),
            (json!({"logit_bias": {"abc": 1}}), "logit_bias"),
            (json!({"logit_bias": {"1": 101}}), "logit_bias"),
            (json!({"stop": [""]}), "stop"),
            (json!({"tools": [{"type": "function"}]}), "tools"),
            (
                json!({"response_format": {"type": "json_object"}}),
                "response_format",
            ),
            (
                json!({"stream_options": {"include_usage": true}}),
                "stream_options",
            ),
            (json!({"min_tokens": 9, "max_tokens": 3}), "min_tokens"),
            (json!({"presence_penalty": -3}), "presence_penalty"),
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
        let plan = validate_chat(request(body), 4).unwrap();
        assert_eq!(plan.image_urls, vec!["data:a", "data:b"]);
        assert_eq!(plan.messages[0].role, Role::System);
        assert_eq!(plan.messages[1].parts.len(), 3);

        let too_many = json!({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "1"}},
            {"type": "image_url", "image_url": {"url": "2"}}
        ]}]});
        assert_eq!(
            validate_chat(request(too_many), 1)
                .unwrap_err()
                .param
                .as_deref(),
            Some("messages")
        );
        let bad_role = json!({"model": "m", "messages": [{"role": "tool", "content": "x"}]});
        assert_eq!(
            validate_chat(request(bad_role), 1)
                .unwrap_err()
                .param
                .as_deref(),
            Some("messages[0].role")
        );
        let audio = json!({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {}}]}]});
        assert_eq!(
            validate_chat(request(audio), 1)
                .unwrap_err()
                .param
                .as_deref(),
            Some("messages[0].content[0].type")
        );
        let no_user = json!({"model": "m", "messages": [{"role": "system", "content": "x"}]});
        assert!(validate_chat(request(no_user), 1).is_err());
    }
}
