//! OpenAI chat messages into the prompt template's: roles, text and image parts (the image
//! URLs collected in order), with the prompt's text bounded before any of it is copied.
//! Tool calls and results, which V1.1's template cannot express, become text (see
//! [`super::tools::prompt`]).

use super::error::ApiError;
use super::openai::{ContentPart, MessageContent, RequestMessage};
use super::tools::prompt::{render_calls, render_result};
use internvl_model::prompt::{joined_text, ChatMessage, Part, Role};

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
    convert_with_block(messages, None, max_prompt_bytes)
}

/// [`convert_messages`], with `block` (the tools' description) as one more system message
/// after the request's own, which the template joins with `\n`. It counts toward
/// `max_prompt_bytes` too.
pub fn convert_with_block(
    messages: &[RequestMessage],
    block: Option<&str>,
    max_prompt_bytes: usize,
) -> Result<(Vec<ChatMessage>, Vec<String>), ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("messages", "messages must not be empty"));
    }
    let bytes = text_bytes(messages).saturating_add(block.map_or(0, str::len));
    check_prompt_bytes("messages", bytes, max_prompt_bytes)?;
    let mut urls = Vec::new();
    let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len() + 1);
    // Whether the last message out holds tool results, which consecutive ones join.
    let mut results_open = false;
    for (i, m) in messages.iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => Role::System,
            "user" | "tool" => Role::User,
            "assistant" => Role::Assistant,
            other => {
                return Err(ApiError::invalid(
                    &format!("messages[{i}].role"),
                    format!("role `{other}` is not supported (system, user, assistant, tool)"),
                ))
            }
        };
        let is_tool = m.role == "tool";
        let mut parts = match &m.content {
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
                .map(|(j, p)| convert_part(i, j, p, role == Role::User && !is_tool, &mut urls))
                .collect::<Result<_, _>>()?,
        };
        if let Some(calls) = &m.tool_calls {
            if role != Role::Assistant {
                return Err(ApiError::invalid(
                    &format!("messages[{i}].tool_calls"),
                    "only assistant messages can have tool_calls",
                ));
            }
            if let Some(j) = calls.iter().position(|c| c.kind != "function") {
                return Err(ApiError::invalid(
                    &format!("messages[{i}].tool_calls[{j}].type"),
                    "tool call type must be `function`",
                ));
            }
            parts = vec![Part::Text(render_calls(&joined_text(&parts), calls))];
        }
        if is_tool {
            let id = m.tool_call_id.as_deref().ok_or_else(|| {
                ApiError::invalid(
                    &format!("messages[{i}].tool_call_id"),
                    "a tool message needs the tool_call_id of the call it answers",
                )
            })?;
            let function = called_function(&messages[..i], id).or(m.name.as_deref());
            let result = render_result(id, function, &joined_text(&parts));
            if results_open {
                if let Some(last) = out.last_mut() {
                    last.parts.push(Part::Text(result));
                    continue;
                }
            }
            parts = vec![Part::Text(result)];
        }
        results_open = is_tool;
        out.push(ChatMessage { role, parts });
    }
    if !out.iter().any(|m| m.role == Role::User) {
        return Err(ApiError::invalid(
            "messages",
            "the conversation needs at least one user message",
        ));
    }
    if let Some(block) = block {
        let after_system = out
            .iter()
            .rposition(|m| m.role == Role::System)
            .map_or(0, |i| i + 1);
        out.insert(after_system, ChatMessage::text(Role::System, block));
    }
    Ok((out, urls))
}

/// The function of the call `id` made by an earlier assistant message, if one did.
fn called_function<'a>(earlier: &'a [RequestMessage], id: &str) -> Option<&'a str> {
    earlier
        .iter()
        .rev()
        .flat_map(|m| m.tool_calls.iter().flatten())
        .find(|c| c.id == id)
        .map(|c| c.function.name.as_str())
}

/// Bytes of text in `messages`, counted before any of it is copied.
fn text_bytes(messages: &[RequestMessage]) -> usize {
    let tool_bytes = |m: &RequestMessage| {
        let calls = m.tool_calls.iter().flatten().map(|c| {
            c.function
                .name
                .len()
                .saturating_add(c.function.arguments.len())
        });
        let id = m.tool_call_id.as_ref().map_or(0, String::len);
        calls.fold(id, usize::saturating_add)
    };
    messages
        .iter()
        .map(|m| {
            tool_bytes(m).saturating_add(match &m.content {
                None => 0,
                Some(MessageContent::Text(text)) => text.len(),
                Some(MessageContent::Parts(parts)) => parts
                    .iter()
                    .filter(|p| p.kind == "text")
                    .filter_map(|p| p.text.as_ref())
                    .map(String::len)
                    .fold(0, usize::saturating_add),
            })
        })
        .fold(0, usize::saturating_add)
}

fn convert_part(
    i: usize,
    j: usize,
    part: &ContentPart,
    images_allowed: bool,
    urls: &mut Vec<String>,
) -> Result<Part, ApiError> {
    let param = format!("messages[{i}].content[{j}]");
    match part.kind.as_str() {
        "text" => part
            .text
            .clone()
            .map(Part::Text)
            .ok_or_else(|| ApiError::invalid(&param, "a text part needs `text`")),
        "image_url" if !images_allowed => Err(ApiError::invalid(
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

    fn convert(
        messages: serde_json::Value,
        block: Option<&str>,
    ) -> Result<Vec<ChatMessage>, ApiError> {
        let messages: Vec<RequestMessage> = serde_json::from_value(messages).unwrap();
        convert_with_block(&messages, block, 1000).map(|(m, _)| m)
    }

    #[test]
    fn tools_history_and_block_become_text() {
        let out = convert(
            json!([
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "c1", "type": "function",
                     "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
                {"role": "tool", "tool_call_id": "c2", "name": "get_time", "content": "noon"}
            ]),
            Some("BLOCK"),
        )
        .unwrap();
        let expected = [
            ChatMessage::text(Role::System, "be brief"),
            ChatMessage::text(Role::System, "BLOCK"),
            ChatMessage::text(Role::User, "weather?"),
            ChatMessage::text(
                Role::Assistant,
                "[{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}]",
            ),
            ChatMessage {
                role: Role::User,
                parts: vec![
                    Part::Text("Result of call c1 (get_weather):\nsunny".into()),
                    Part::Text("Result of call c2 (get_time):\nnoon".into()),
                ],
            },
        ];
        assert_eq!(out, expected);
    }

    #[test]
    fn tools_history_refusals_name_their_field() {
        let call =
            json!([{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]);
        let cases = [
            (
                json!([{"role": "tool", "content": "x"}]),
                "messages[0].tool_call_id",
            ),
            (
                json!([{"role": "user", "content": "x", "tool_calls": call}]),
                "messages[0].tool_calls",
            ),
            (
                json!([{"role": "user", "content": "x"}, {"role": "assistant", "content": null,
                        "tool_calls": [{"id": "c", "type": "other",
                                        "function": {"name": "f", "arguments": "{}"}}]}]),
                "messages[1].tool_calls[0].type",
            ),
            (
                json!([{"role": "tool", "tool_call_id": "c", "content": [
                    {"type": "image_url", "image_url": {"url": "data:x"}}]}]),
                "messages[0].content[0]",
            ),
        ];
        for (messages, param) in cases {
            let err = convert(messages.clone(), None).unwrap_err();
            assert_eq!(
                err.param.as_deref(),
                Some(param),
                "{messages}: {}",
                err.message
            );
        }
        let too_long = convert(
            json!([{"role": "user", "content": "x"}]),
            Some(&"b".repeat(1000)),
        );
        assert_eq!(
            too_long.unwrap_err().param.as_deref(),
            Some("messages"),
            "the block counts"
        );
    }
}
