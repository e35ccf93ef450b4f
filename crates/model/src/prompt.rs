//! The `internvl_zh` conversation template, as upstream's `get_prompt` and `chat()` build it.
//!
//! ` <human>: <img><IMG_CONTEXT>×256</img>\n{question} <bot>:` — the system message (empty
//! by default) and a space come first; a human turn ends with a space, a bot turn with
//! `</s>`. Each image of a turn is placed as upstream `chat()` places its one image: an
//! `<img>…</img>` block and `\n`, before the turn's text (vLLM places several the same way).

/// Opens an image's token block.
pub const IMG_START: &str = "<img>";
/// Closes an image's token block.
pub const IMG_END: &str = "</img>";
/// Placeholder whose embedding is replaced by one visual token.
pub const IMG_CONTEXT: &str = "<IMG_CONTEXT>";

const HUMAN: &str = "<human>";
const BOT: &str = "<bot>";
const HUMAN_SEP: &str = " ";
const BOT_SEP: &str = "</s>";

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

/// One part of a message: text, or the place of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Text(String),
    Image,
}

/// A message of a chat conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: Role,
    pub parts: Vec<Part>,
}

impl ChatMessage {
    /// A message holding only text.
    pub fn text(role: Role, text: impl Into<String>) -> Self {
        ChatMessage {
            role,
            parts: vec![Part::Text(text.into())],
        }
    }
}

/// Why a conversation cannot be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PromptError {
    #[error("template `{0}` is not supported (only internvl_zh)")]
    UnsupportedTemplate(String),
    #[error("the conversation has no user message")]
    NoUserMessage,
    #[error("messages[{0}]: only user messages can contain images")]
    ImageOutsideUserMessage(usize),
}

/// The template of one model: its default system message and visual tokens per image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptTemplate {
    system_message: String,
    image_tokens: usize,
}

/// A rendered prompt and how many images it expects, in order of appearance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    pub text: String,
    pub num_images: usize,
}

impl PromptTemplate {
    /// `template` is the checkpoint's `template` field; only `internvl_zh` is V1.1's.
    pub fn new(
        template: &str,
        system_message: impl Into<String>,
        image_tokens: usize,
    ) -> Result<Self, PromptError> {
        if template != "internvl_zh" {
            return Err(PromptError::UnsupportedTemplate(template.to_string()));
        }
        Ok(Self {
            system_message: system_message.into(),
            image_tokens,
        })
    }

    /// The token block one image occupies in the prompt.
    fn image_block(&self) -> String {
        format!(
            "{IMG_START}{}{IMG_END}",
            IMG_CONTEXT.repeat(self.image_tokens)
        )
    }

    /// Renders `messages` and opens the bot's answer (`<bot>:`).
    ///
    /// System messages replace the default system message (several are joined by `\n`).
    /// Text parts of one message are joined by `\n`. Separators follow the role, which for
    /// an alternating conversation is upstream's alternation by index.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<Prompt, PromptError> {
        if !messages.iter().any(|m| m.role == Role::User) {
            return Err(PromptError::NoUserMessage);
        }
        let system: Vec<String> = messages
            .iter()
            .filter(|m| m.role == Role::System)
            .map(|m| joined_text(&m.parts))
            .collect();
        let system = if system.is_empty() {
            self.system_message.clone()
        } else {
            system.join("\n")
        };
        let mut text = system + HUMAN_SEP;
        let mut num_images = 0;
        for (i, message) in messages.iter().enumerate() {
            let images = message.parts.iter().filter(|p| **p == Part::Image).count();
            let (role, sep) = match message.role {
                Role::System => continue,
                Role::User => (HUMAN, HUMAN_SEP),
                Role::Assistant if images > 0 => {
                    return Err(PromptError::ImageOutsideUserMessage(i))
                }
                Role::Assistant => (BOT, BOT_SEP),
            };
            let mut body = format!("{}\n", self.image_block()).repeat(images);
            body.push_str(&joined_text(&message.parts));
            num_images += images;
            if body.is_empty() {
                // Upstream leaves an empty turn open, without separator.
                text.push_str(&format!("{role}:"));
            } else {
                text.push_str(&format!("{role}: {body}{sep}"));
            }
        }
        text.push_str(BOT);
        text.push(':');
        Ok(Prompt { text, num_images })
    }
}

/// The text parts of a message, joined by `\n` as the template joins them (images left out).
pub fn joined_text(parts: &[Part]) -> String {
    let texts: Vec<&str> = parts
        .iter()
        .filter_map(|p| match p {
            Part::Text(t) => Some(t.as_str()),
            Part::Image => None,
        })
        .collect();
    texts.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(tokens: usize) -> PromptTemplate {
        PromptTemplate::new("internvl_zh", "", tokens).unwrap()
    }

    fn user_with_images(images: usize, text: &str) -> ChatMessage {
        let mut parts = vec![Part::Image; images];
        parts.push(Part::Text(text.into()));
        ChatMessage {
            role: Role::User,
            parts,
        }
    }

    #[test]
    fn one_turn_with_an_image() {
        let p = template(2).render(&[user_with_images(1, "描述")]).unwrap();
        assert_eq!(
            p.text,
            " <human>: <img><IMG_CONTEXT><IMG_CONTEXT></img>\n描述 <bot>:"
        );
        assert_eq!(p.num_images, 1);
    }

    #[test]
    fn two_turns_close_the_bot_turn_with_eos() {
        let p = template(1)
            .render(&[
                ChatMessage::text(Role::User, "q1"),
                ChatMessage::text(Role::Assistant, "a1"),
                ChatMessage::text(Role::User, "q2"),
            ])
            .unwrap();
        assert_eq!(p.text, " <human>: q1 <bot>: a1</s><human>: q2 <bot>:");
    }

    #[test]
    fn images_go_first_each_in_its_own_block() {
        let msg = ChatMessage {
            role: Role::User,
            parts: vec![Part::Text("look".into()), Part::Image, Part::Image],
        };
        let p = template(1).render(&[msg]).unwrap();
        assert_eq!(
            p.text,
            " <human>: <img><IMG_CONTEXT></img>\n<img><IMG_CONTEXT></img>\nlook <bot>:"
        );
        assert_eq!(p.num_images, 2);
    }

    #[test]
    fn system_message_replaces_the_default() {
        let t = PromptTemplate::new("internvl_zh", "default", 1).unwrap();
        let user = ChatMessage::text(Role::User, "hi");
        assert_eq!(
            t.render(std::slice::from_ref(&user)).unwrap().text,
            "default <human>: hi <bot>:"
        );
        let sys = ChatMessage::text(Role::System, "be brief");
        assert_eq!(
            t.render(&[sys, user]).unwrap().text,
            "be brief <human>: hi <bot>:"
        );
    }

    #[test]
    fn rejects_what_upstream_cannot_express() {
        assert_eq!(
            PromptTemplate::new("chatml", "", 1),
            Err(PromptError::UnsupportedTemplate("chatml".into()))
        );
        let t = template(1);
        assert_eq!(
            t.render(&[ChatMessage::text(Role::System, "s")]),
            Err(PromptError::NoUserMessage)
        );
        let bad = ChatMessage {
            role: Role::Assistant,
            parts: vec![Part::Image],
        };
        let user = ChatMessage::text(Role::User, "q");
        assert_eq!(
            t.render(&[user, bad]),
            Err(PromptError::ImageOutsideUserMessage(1))
        );
    }
}
