//! The incremental detokenizer on the demo checkpoint's real tokenizer (the upstream slow
//! LlamaTokenizer's rules, byte fallback included): streamed deltas against whole decodes,
//! over the tokenizer corpus, concatenations of it, and random id sequences.
//!
//! The property, for every sequence: each emitted prefix is a prefix of the full decode
//! (nothing is ever taken back), and the deltas plus the final `flush` are exactly
//! `decode(ids, skip_special_tokens)`. The deltas alone already are, except when the full
//! decode ends in U+FFFD: an incomplete character at the end is held back until `flush`. And
//! no delta contains U+FFFD unless the full decode has one.
//!
//! The one case where exactness cannot hold, documented in the detokenizer: with
//! `skip_special_tokens = false`, a `<s>`, `</s>` or `<unk>` after text makes the tokenizer
//! put a space in front of text already emitted. There the deltas must still carry every
//! other character, in order, up to spaces.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use internvl_model::tokenizer::Tokenizer;
use internvl_scheduler::{Detokenizer, TokenDecoder};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

/// The model crate's tokenizer as a [`TokenDecoder`], as the server adapts it (neither crate
/// depends on the other, so neither can implement the trait for the other's type). Counts
/// the ids it decodes, to check the detokenizer's cost.
struct DemoDecoder {
    tokenizer: Tokenizer,
    decoded_ids: AtomicUsize,
}

impl TokenDecoder for DemoDecoder {
    fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> String {
        self.decoded_ids.fetch_add(ids.len(), Ordering::Relaxed);
        self.tokenizer.decode(ids, skip_special_tokens)
    }
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn demo_decoder() -> Arc<DemoDecoder> {
    let tokenizer = Tokenizer::from_dir(&repo_root().join("models/demo-internvl")).unwrap();
    Arc::new(DemoDecoder {
        tokenizer,
        decoded_ids: AtomicUsize::new(0),
    })
}

fn corpus() -> Value {
    let path = repo_root().join("tests/fixtures/reference/tokenizer_corpus.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids_of(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .expect("ids")
        .iter()
        .map(|id| id.as_u64().expect("id") as u32)
        .collect()
}

/// The corpus's id sequences: its strings' encodings without BOS (what a model would
/// generate), the byte-fallback cases and the random id sequences; with, where recorded, the
/// decode transformers gave (`skip_special_tokens=True`).
fn corpus_sequences(corpus: &Value) -> Vec<(Vec<u32>, Option<String>)> {
    let mut sequences = Vec::new();
    for entry in corpus["entries"].as_array().unwrap() {
        let ids = ids_of(&entry["ids"]);
        let skipped = entry["decode_skip_special"].as_str().map(str::to_owned);
        // Only BOS comes first; it decodes to nothing with skip_special_tokens.
        sequences.push((ids[1..].to_vec(), skipped));
    }
    for key in ["byte_piece_decodes", "random_id_decodes"] {
        for case in corpus[key].as_array().unwrap() {
            let skipped = case["decode_skip_special"].as_str().map(str::to_owned);
            sequences.push((ids_of(&case["ids"]), skipped));
        }
    }
    sequences
}

/// Streams `ids` through a fresh detokenizer and checks the property; a description of what
/// went wrong otherwise.
fn check(decoder: &Arc<DemoDecoder>, ids: &[u32], skip: bool) -> Result<(), String> {
    let tokenizer = &decoder.tokenizer;
    // Where exactness cannot hold (see the module doc), compare without spaces.
    let exact = skip
        || !ids
            .windows(2)
            .any(|w| tokenizer.is_special(w[1]) && !tokenizer.is_special(w[0]));
    let comparable = |text: &str| {
        if exact {
            text.to_owned()
        } else {
            text.replace(' ', "")
        }
    };
    let full = tokenizer.decode(ids, skip);
    let mut detokenizer = Detokenizer::new(decoder.clone(), skip);
    let mut streamed = String::new();
    for (i, &id) in ids.iter().enumerate() {
        let delta = detokenizer.push(id);
        if delta.contains('\u{fffd}') && !full.contains('\u{fffd}') {
            return Err(format!("{ids:?}: token {i} emitted U+FFFD in {delta:?}"));
        }
        streamed.push_str(&delta);
        if !comparable(&full).starts_with(&comparable(&streamed)) {
            return Err(format!(
                "{ids:?}: after token {i}, {streamed:?} is not a prefix of {full:?}"
            ));
        }
    }
    if comparable(&streamed) != comparable(&full) && !full.ends_with('\u{fffd}') {
        return Err(format!("{ids:?}: deltas {streamed:?} != decode {full:?}"));
    }
    streamed.push_str(&detokenizer.flush());
    if comparable(&streamed) != comparable(&full) {
        return Err(format!(
            "{ids:?}: deltas and flush {streamed:?} != decode {full:?}"
        ));
    }
    Ok(())
}

/// Runs `check` on every sequence with and without skipping special tokens; fails listing the
/// first failures.
fn check_all(decoder: &Arc<DemoDecoder>, sequences: &[Vec<u32>]) {
    let mut failures = Vec::new();
    for ids in sequences {
        for skip in [true, false] {
            if let Err(e) = check(decoder, ids, skip) {
                failures.push(format!("skip_special_tokens={skip}: {e}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} checks failed, first ones:\n{}",
        failures.len(),
        sequences.len() * 2,
        failures[..failures.len().min(5)].join("\n")
    );
}

#[test]
fn corpus_sequences_stream_to_their_decode() {
    let decoder = demo_decoder();
    let sequences = corpus_sequences(&corpus());
    assert!(sequences.len() > 500);
    for (ids, recorded) in &sequences {
        if let Some(recorded) = recorded {
            assert_eq!(
                &decoder.tokenizer.decode(ids, true),
                recorded,
                "the reference itself: {ids:?}"
            );
        }
    }
    let ids: Vec<Vec<u32>> = sequences.into_iter().map(|(ids, _)| ids).collect();
    check_all(&decoder, &ids);
}

/// Answers are longer than one corpus string: pairs and runs of them back to back.
#[test]
fn concatenated_corpus_sequences_stream_to_their_decode() {
    let decoder = demo_decoder();
    let sequences: Vec<Vec<u32>> = corpus_sequences(&corpus())
        .into_iter()
        .map(|(ids, _)| ids)
        .collect();
    let mut joined: Vec<Vec<u32>> = sequences.windows(2).map(|w| w.concat()).collect();
    joined.extend(sequences.chunks(10).map(|c| c.concat()));
    check_all(&decoder, &joined);
}

/// Ids drawn from the whole vocabulary: special and added tokens, bytes that form no
/// character, bare spaces, anywhere.
#[test]
fn random_id_sequences_stream_to_their_decode() {
    let decoder = demo_decoder();
    let vocab = decoder.tokenizer.vocab_size() as u32;
    let mut rng = StdRng::seed_from_u64(1);
    let sequences: Vec<Vec<u32>> = (0..2000)
        .map(|_| {
            let len = rng.random_range(1..48);
            (0..len).map(|_| rng.random_range(0..vocab)).collect()
        })
        .collect();
    check_all(&decoder, &sequences);
}

/// Text-like sequences: tokens drawn from those the corpus strings use, with more byte-token
/// runs (Chinese and emoji through byte fallback) than uniform draws give.
#[test]
fn random_text_like_sequences_stream_to_their_decode() {
    let decoder = demo_decoder();
    let pool: Vec<u32> = corpus_sequences(&corpus())
        .into_iter()
        .flat_map(|(ids, _)| ids)
        .collect();
    let tokenizer = &decoder.tokenizer;
    let chinese = tokenizer.encode("你好，世界！今天天气很好。😀").unwrap();
    let mut rng = StdRng::seed_from_u64(2);
    let sequences: Vec<Vec<u32>> = (0..1500)
        .map(|_| {
            let len = rng.random_range(1..80);
            (0..len)
                .map(|_| {
                    if rng.random_range(0..4) == 0 {
                        chinese[rng.random_range(1..chinese.len())]
                    } else {
                        pool[rng.random_range(0..pool.len())]
                    }
                })
                .collect()
        })
        .collect();
    check_all(&decoder, &sequences);
}

/// The concatenated deltas start as the full decode does: without the first piece's leading
/// space (the slow LlamaTokenizer drops it), which is what upstream's `chat()` answers and an
/// OpenAI client expect. vLLM and TGI prime the window with prompt tokens and would emit
/// " Hello" here.
#[test]
fn output_starts_without_the_first_pieces_space() {
    let decoder = demo_decoder();
    let ids = decoder.tokenizer.encode("Hello world").unwrap();
    let generated = &ids[1..];
    let first = decoder.tokenizer.token_bytes(generated[0]).unwrap();
    assert_eq!(first[0], b' ', "the first generated piece carries a space");
    let mut detokenizer = Detokenizer::new(decoder.clone(), true);
    let deltas: Vec<String> = generated.iter().map(|&id| detokenizer.push(id)).collect();
    assert_eq!(deltas.concat(), "Hello world");
    assert!(!deltas[0].starts_with(' '));
}

/// A character split over byte-fallback tokens is emitted whole, once, with its last byte.
#[test]
fn byte_fallback_characters_come_out_whole() {
    let decoder = demo_decoder();
    let t = &decoder.tokenizer;
    let bytes: Vec<u32> = ["<0xE4>", "<0xBD>", "<0xA0>"]
        .iter()
        .map(|piece| t.token_to_id(piece).unwrap())
        .collect();
    let mut detokenizer = Detokenizer::new(decoder.clone(), true);
    let deltas: Vec<String> = bytes.iter().map(|&id| detokenizer.push(id)).collect();
    assert_eq!(deltas, ["", "", "你"]);
    // The same bytes cut short, then proven invalid by an ordinary piece.
    let a = t.token_to_id("a").or_else(|| t.token_to_id("▁a")).unwrap();
    let mut detokenizer = Detokenizer::new(decoder.clone(), true);
    assert_eq!(detokenizer.push(bytes[0]), "");
    assert_eq!(detokenizer.push(bytes[1]), "");
    let delta = detokenizer.push(a);
    assert!(delta.starts_with("\u{fffd}\u{fffd}"), "{delta:?}");
    assert_eq!(delta, t.decode(&[bytes[0], bytes[1], a], true));
}

/// The window stays a few tokens long: the cost per token does not grow with the output.
#[test]
fn cost_per_token_is_bounded() {
    let decoder = demo_decoder();
    let text: Vec<String> = corpus()["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["text"].as_str().unwrap().to_owned())
        .collect();
    let ids = decoder.tokenizer.encode(&text.join(" ")).unwrap();
    assert!(ids.len() > 3000, "{} tokens", ids.len());
    let mut detokenizer = Detokenizer::new(decoder.clone(), true);
    decoder.decoded_ids.store(0, Ordering::Relaxed);
    for &id in &ids[1..] {
        detokenizer.push(id);
    }
    let per_token = decoder.decoded_ids.load(Ordering::Relaxed) as f64 / ids.len() as f64;
    assert!(per_token < 12.0, "{per_token} ids decoded per token");
}
