//! The tokenizer on arbitrary input, both backends (native SentencePiece under the slow
//! LlamaTokenizer's rules, and `tokenizers` for `tokenizer.json`): the input as UTF-8 text to
//! encode, and as token ids (in and out of the vocabulary) to decode.
//!
//! Asserts: nothing panics; encoded ids start with BOS and lie in the vocabulary; decoding
//! skips ids outside the vocabulary, exactly as if they were absent; `token_bytes` knows
//! every id of the vocabulary and none beyond; and `decode(encode(s)) == s` wherever the slow
//! tokenizer preserves text (see `round_trips`).

#![no_main]

use internvl_fuzz::demo;
use internvl_fuzz::input::Reader;
use internvl_model::tokenizer::Tokenizer;
use libfuzzer_sys::fuzz_target;

/// Strings that are tokens of their own in the demo checkpoint (special and added tokens):
/// text containing one is split around it and decoded with spaces at the seams.
const TOKEN_STRINGS: [&str; 12] = [
    "<s>",
    "</s>",
    "<unk>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
];

/// Whether the slow LlamaTokenizer gives `text` back from its ids (the reference corpus in
/// `tests/fixtures/reference/tokenizer_corpus.json` shows where it does not): not when the text
/// starts with a space (the dummy-prefix rule drops it), holds `▁` (decoded as a space) or
/// holds a special or added token's string (decoded with spaces around it, or dropped).
fn round_trips(text: &str) -> bool {
    !text.starts_with(' ')
        && !text.contains('\u{2581}')
        && !TOKEN_STRINGS.iter().any(|t| text.contains(t))
}

fn check_encode(tokenizer: &Tokenizer, text: &str) -> Option<Vec<u32>> {
    let ids = tokenizer.encode(text).ok()?;
    assert_eq!(ids.first(), Some(&tokenizer.bos_id()), "{text:?}");
    let vocab = tokenizer.vocab_size();
    assert!(
        ids.iter().all(|&id| (id as usize) < vocab),
        "{text:?}: {ids:?}"
    );
    Some(ids)
}

fn check_decode(tokenizer: &Tokenizer, ids: &[u32]) {
    let vocab = tokenizer.vocab_size();
    let known: Vec<u32> = ids
        .iter()
        .copied()
        .filter(|&id| (id as usize) < vocab)
        .collect();
    for skip in [true, false] {
        assert_eq!(
            tokenizer.decode(ids, skip),
            tokenizer.decode(&known, skip),
            "ids outside the vocabulary changed the decode of {ids:?}"
        );
    }
    for &id in ids {
        assert_eq!(
            tokenizer.token_bytes(id).is_some(),
            (id as usize) < vocab,
            "id {id}"
        );
        tokenizer.is_special(id);
    }
}

fuzz_target!(|data: &[u8]| {
    let slow = demo::tokenizer();
    let json = demo::json_tokenizer();
    let text = String::from_utf8_lossy(data);
    if let Some(ids) = check_encode(&slow, &text) {
        if round_trips(&text) {
            assert_eq!(slow.decode(&ids, true), text, "ids {ids:?}");
        }
    }
    // The `tokenizers` backend may refuse text (an error, a 400 upstream), never panic.
    check_encode(json, &text);
    let ids = Reader::new(data).token_ids(slow.vocab_size());
    check_decode(&slow, &ids);
    check_decode(json, &ids);
});
