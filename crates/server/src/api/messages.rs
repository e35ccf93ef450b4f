//! OpenAI chat messages into the prompt template's: roles, text and image parts (the image
//! URLs collected in order), with the prompt's text bounded before any of it is copied.

use super::error::ApiError;
use super::openai::{ContentPart, MessageContent, RequestMessage};
use internvl_model::prompt::{ChatMessage, Part, Role};

/// Refuses `bytes` of prompt text past `max`, before any of it is tokenized.
pub fn check_prompt_bytes(param: &str, bytes: usize, max: usize) -> Result<(), ApiError> {
    if bytes > max {
        return Err(ApiError::invalid(
            param,
            format!("The prompt has more than {max} bytes of text; shorten it"),
        ));
    }
    Ok(())
}

/// OpenAI messages → template messages and the image URLs they reference, in order.
/// `max_prompt_bytes` bounds their text, all messages together.
pub fn convert_messages(
    messages: &[RequestMessage],
    max_prompt_bytes: usize,
) -> Result<(Vec<ChatMessage>, Vec<String>), ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("messages", "messages must not be empty"));
    }
    check_prompt_bytes("messages", text_bytes(messages), max_prompt_bytes)?;
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

/// Bytes of text in `messages`, counted before any of it is copied.
fn text_bytes(messages: &[RequestMessage]) -> usize {
    messages
        .iter()
        .map(|m| match &m.content {
            None => 0,
            Some(MessageContent::Text(text)) => text.len(),
            Some(MessageContent::Parts(parts)) => parts
                .iter()
                .filter(|p| p.kind == "text")
                .filter_map(|p| p.text.as_ref())
                .map(String::len)
                .fold(0, usize::saturating_add),
        })
        .fold(0, usize::saturating_add)
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
