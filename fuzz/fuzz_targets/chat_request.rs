//! A chat-completions body as the server receives it, through every check the handler runs
//! before fetching images: arbitrary bytes through serde into `ChatCompletionRequest`,
//! `check_model`, `validate_chat` (against the demo checkpoint's vocabulary), the prompt
//! template and tokenizer (`LoadedModel::encode_prompt`), then the engine's own
//! `internvl_scheduler::validate` on the tokenized request.
//!
//! Asserts: nothing panics; a refusal is a client error (4xx) with a short message (no echo of
//! the input); an accepted plan keeps its own rules (images within the limit, no empty stop
//! string) and passes the engine's parameter checks as it stands (one definition of valid); a
//! prompt that encodes starts with BOS, stays in the vocabulary and has one placeholder run per
//! image; and a request the engine admits fits the context (prompt + max_tokens, unwrapped).

#![no_main]

use internvl_fuzz::demo;
use internvl_scheduler::{EngineConfig, Request};
use internvl_server::api::error::ApiError;
use internvl_server::api::openai::ChatCompletionRequest;
use internvl_server::api::validate::{check_model, validate_chat, Rules};
use libfuzzer_sys::fuzz_target;

/// As the server's default `--max-images-per-request`.
const MAX_IMAGES: usize = 8;
/// As the server's default `--max-prompt-bytes`.
const MAX_PROMPT_BYTES: usize = 1 << 20;
/// As the server's default `--block-size`.
const BLOCK_SIZE: usize = 16;
/// The longest error message a refusal may carry: enough to explain, too short to echo.
const MAX_MESSAGE: usize = 1024;

fn check_refusal(e: &ApiError) {
    assert!(e.status.is_client_error(), "{e:?}");
    assert!(
        e.message.len() <= MAX_MESSAGE,
        "{} bytes of message",
        e.message.len()
    );
}

fuzz_target!(|data: &[u8]| {
    let model = demo::model();
    let Ok(request) = serde_json::from_slice::<ChatCompletionRequest>(data) else {
        return;
    };
    if let Err(e) = check_model(&request.model, "demo-internvl") {
        check_refusal(&e);
    }
    let tokenizer = &model.tokenizer;
    let config = model.model.config();
    let vocab_size = config.llm.vocab_size;
    let rules = Rules {
        max_images: MAX_IMAGES,
        max_prompt_bytes: MAX_PROMPT_BYTES,
        vocab_size,
        eos_token_id: tokenizer.eos_id(),
    };
    let plan = match validate_chat(request, &rules) {
        Ok(plan) => plan,
        Err(e) => return check_refusal(&e),
    };
    assert!(plan.image_urls.len() <= MAX_IMAGES);
    assert!(!plan.stop.stop_strings.iter().any(String::is_empty));
    plan.sampling
        .validate(vocab_size)
        .expect("an accepted plan's sampling is valid");
    plan.stop
        .validate(vocab_size)
        .expect("an accepted plan's stop settings are valid");
    let Ok(prompt) = model.encode_prompt(&plan.messages) else {
        return;
    };
    assert_eq!(prompt.ids.first(), Some(&tokenizer.bos_id()));
    assert!(prompt
        .ids
        .iter()
        .all(|&id| (id as usize) < tokenizer.vocab_size()));
    assert_eq!(prompt.num_images, plan.image_urls.len());
    assert_eq!(prompt.image_offsets.len(), prompt.num_images);
    let per_image = config.num_image_tokens();
    let context = model.model.image_context_id();
    for &offset in &prompt.image_offsets {
        assert!(prompt.ids[offset..offset + per_image]
            .iter()
            .all(|&t| t == context));
    }
    let max_model_len = config.llm.max_position_embeddings;
    let engine = EngineConfig::new(
        max_model_len.div_ceil(BLOCK_SIZE),
        BLOCK_SIZE,
        max_model_len,
    );
    let stop = plan.stop_for(prompt.ids.len(), max_model_len);
    let request: Request<()> = Request {
        images: Vec::new(),
        prompt: prompt.ids,
        sampling: plan.sampling,
        stop,
        skip_special_tokens: true,
        n: plan.n,
        grammar: None,
    };
    if internvl_scheduler::validate(&engine, vocab_size, &request).is_ok() {
        let total = request.prompt.len().checked_add(request.stop.max_tokens);
        assert!(
            total.is_some_and(|t| t <= max_model_len),
            "{total:?} tokens admitted"
        );
    }
});
