//! What the benchmark's chats are made of: a prompt of one image and a question sized to a
//! number of text tokens, and the repository's fixture images.

use anyhow::{bail, Context};
use internvl_model::prompt::{ChatMessage, Part, Role};
use internvl_model::{EncodedPrompt, LoadedModel};
use std::path::PathBuf;

/// The question when no `--prompt-tokens` is given (311 prompt tokens with the demo tokenizer).
const QUESTION: &str = "Please describe this picture in detail: the objects, their colours, \
                        where they are, and what might happen next.";

/// Words a question of a requested size is cut from (repeated as needed).
const FILLER: &str = "Please describe this picture in detail: the objects, their colours and \
                      shapes, where they are, what they are doing, and what might happen next. \
                      Mention any text you can read, the lighting, the background, the mood of \
                      the scene and anything that looks unusual or out of place.";

/// The prompt of one chat: one image and a question, sized to `text_tokens` text tokens (all
/// but the visual ones) when given.
pub(super) fn chat_prompt(
    loaded: &LoadedModel,
    text_tokens: Option<usize>,
) -> anyhow::Result<EncodedPrompt> {
    let encode = |question: &str| {
        loaded.encode_prompt(&[ChatMessage {
            role: Role::User,
            parts: vec![Part::Image, Part::Text(question.into())],
        }])
    };
    let Some(target) = text_tokens else {
        return Ok(encode(QUESTION)?);
    };
    let visual = loaded.model.config().num_image_tokens();
    let text_len = |q: &str| -> anyhow::Result<usize> { Ok(encode(q)?.ids.len() - visual) };
    // Every word adds at least one token: no more than `target` words are ever needed.
    let words: Vec<&str> = FILLER
        .split_whitespace()
        .cycle()
        .take(target.max(1))
        .collect();
    let question = |k: usize| words[..k].join(" ");
    if text_len(&question(1))? > target {
        bail!(
            "--prompt-tokens {target} is below the template's minimum ({} with a one-word question)",
            text_len(&question(1))?
        );
    }
    // The most words that fit (the count grows with the words).
    let (mut lo, mut hi) = (1, words.len());
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if text_len(&question(mid))? <= target {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    // Then single-token additions while they fit.
    let mut q = question(lo);
    let mut len = text_len(&q)?;
    'grow: while len < target {
        for piece in [" a", ".", " I"] {
            let candidate = format!("{q}{piece}");
            let n = text_len(&candidate)?;
            if n > len && n <= target {
                q = candidate;
                len = n;
                continue 'grow;
            }
        }
        break;
    }
    Ok(encode(&q)?)
}

/// The repository's fixture images (PNG and JPEG), in name order.
pub(super) fn default_images() -> anyhow::Result<Vec<PathBuf>> {
    let dir = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/images"
    ));
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "png" || e == "jpg"))
        .collect();
    files.sort();
    Ok(files)
}
