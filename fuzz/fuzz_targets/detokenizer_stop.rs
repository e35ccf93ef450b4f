//! The incremental detokenizer and stop matching, driven as the engine drives them: each
//! generated token goes through `Detokenizer::push`, and its text through `StopChecker::push`.
//!
//! Input: a flags byte (bit 0 `skip_special_tokens`, bit 1 `ignore_eos`, bits 2-3 the number of
//! stop strings, bit 4 a stop token id), `min_tokens`, `max_tokens` (0: unbounded), the stop
//! token id (2 bytes, when flagged), each stop string as a length byte and that many bytes
//! (high bit of the length set: its low 4 bits count token ids, 2 bytes each, decoded with the
//! tokenizer, so that stop strings the output can contain are common), then the generated
//! token ids, 2 bytes each.
//!
//! Asserts what `detokenizer.rs` and `stop.rs` promise: the deltas are a prefix of the full
//! decode at every step and equal it once flushed (ignoring spaces where special tokens are
//! kept, the documented exception); no U+FFFD appears that the full decode lacks; the text sent
//! never contains a stop string completed after the first `min_tokens` tokens; a stop string
//! ends the output just before its earliest-ending occurrence; EOS and stop ids end it with all
//! earlier text sent; `max_tokens` ends it with everything sent; while running, only a tail
//! that could start a stop string is held back; min_tokens bans the stop tokens exactly while
//! in force.

#![no_main]

use std::sync::Arc;

use internvl_fuzz::demo;
use internvl_fuzz::input::{token_id, Reader};
use internvl_model::tokenizer::Tokenizer;
use internvl_scheduler::{
    Detokenizer, FinishReason, StopChecker, StopParams, StopReason, TokenDecoder,
};
use libfuzzer_sys::fuzz_target;

/// The demo tokenizer as the engine's decoder (the server wraps it the same way).
struct Decoder(Arc<Tokenizer>);

impl TokenDecoder for Decoder {
    fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> String {
        self.0.decode(ids, skip_special_tokens)
    }
}

/// The stop settings and generated ids an input stands for.
struct Case {
    params: StopParams,
    skip_special_tokens: bool,
    ids: Vec<u32>,
}

fn parse(data: &[u8], tokenizer: &Tokenizer) -> Case {
    let vocab = tokenizer.vocab_size();
    let mut input = Reader::new(data);
    let flags = input.u8();
    let min_tokens = usize::from(input.u8() & 0x0f);
    let max_tokens = match input.u8() {
        0 => usize::MAX,
        n => usize::from(n),
    };
    let stop_token_ids = if flags & 0x10 != 0 {
        vec![token_id(input.u16(), vocab)]
    } else {
        Vec::new()
    };
    let stop_strings = (0..(flags >> 2) & 3)
        .map(|_| {
            let len = input.u8();
            if len & 0x80 != 0 {
                let count = usize::from(len & 0x0f);
                let ids: Vec<u32> = (0..count).map(|_| token_id(input.u16(), vocab)).collect();
                tokenizer.decode(&ids, true)
            } else {
                String::from_utf8_lossy(input.bytes(usize::from(len & 0x7f))).into_owned()
            }
        })
        .collect();
    Case {
        params: StopParams {
            max_tokens,
            min_tokens,
            stop_token_ids,
            stop_strings,
            ignore_eos: flags & 2 != 0,
            eos_token_id: Some(tokenizer.eos_id()),
        },
        skip_special_tokens: flags & 1 != 0,
        ids: input.token_ids(vocab),
    }
}

/// The deltas of `ids` against their full decode, as `crates/scheduler/tests/detokenizer.rs`
/// states the promise. Returns the deltas.
fn check_detokenizer(decoder: &Arc<Decoder>, ids: &[u32], skip: bool) -> Vec<String> {
    let tokenizer = &decoder.0;
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
    let mut deltas = Vec::with_capacity(ids.len());
    for (i, &id) in ids.iter().enumerate() {
        let delta = detokenizer.push(id);
        assert!(
            !delta.contains('\u{fffd}') || full.contains('\u{fffd}'),
            "{ids:?}: token {i} emitted U+FFFD in {delta:?}, the decode {full:?} has none"
        );
        streamed.push_str(&delta);
        assert!(
            comparable(&full).starts_with(&comparable(&streamed)),
            "{ids:?}: after token {i}, {streamed:?} is not a prefix of {full:?}"
        );
        deltas.push(delta);
    }
    streamed.push_str(&detokenizer.flush());
    assert_eq!(
        comparable(&streamed),
        comparable(&full),
        "{ids:?}: deltas and flush differ from the decode"
    );
    deltas
}

/// Occurrences of the stop strings in `text` as (end, start), in no particular order.
fn occurrences(text: &str, stops: &[String]) -> Vec<(usize, usize)> {
    stops
        .iter()
        .flat_map(|stop| {
            text.char_indices()
                .filter(move |&(i, _)| text[i..].starts_with(stop.as_str()))
                .map(move |(i, _)| (i + stop.len(), i))
        })
        .collect()
}

fn check_stop(case: &Case, deltas: &[String], vocab: usize) {
    let params = &case.params;
    let checker = StopChecker::new(params.clone(), vocab);
    // What must be refused; the engine may refuse more (its length limits on stop strings).
    let invalid = params.min_tokens > params.max_tokens
        || params.stop_strings.iter().any(String::is_empty)
        || params.stop_token_ids.iter().any(|&t| t as usize >= vocab);
    assert!(!invalid || checker.is_err(), "{params:?} accepted");
    let Ok(mut checker) = checker else { return };
    let stops = &params.stop_strings;
    let stop_ids: Vec<u32> = params
        .stop_token_ids
        .iter()
        .copied()
        .chain(params.eos_token_id.filter(|_| !params.ignore_eos))
        .collect();
    // The text fed in (all of it, and that of the first min_tokens tokens) and the text sent.
    let (mut fed, mut sent) = (String::new(), String::new());
    let mut before_min = 0;
    for (i, (&id, delta)) in case.ids.iter().zip(deltas).enumerate() {
        let banned = !checker.banned_tokens().is_empty();
        assert_eq!(
            banned,
            i < params.min_tokens && !stop_ids.is_empty(),
            "token {i}"
        );
        let step = checker.push(id, delta);
        let stopping_id = step.finish == Some(FinishReason::Stop)
            && matches!(
                step.stop_reason,
                Some(StopReason::Eos | StopReason::Token(_))
            );
        if !stopping_id {
            fed.push_str(delta);
        }
        if i < params.min_tokens {
            before_min = fed.len();
        }
        sent.push_str(&step.text);
        assert!(
            fed.starts_with(&sent),
            "{sent:?} is not a prefix of {fed:?}"
        );
        let late = |&(end, _): &(usize, usize)| end > before_min;
        match (step.finish, &step.stop_reason) {
            (None, None) => {
                let held = &fed[sent.len()..];
                assert!(
                    held.is_empty()
                        || stops
                            .iter()
                            .any(|s| s.len() > held.len() && s.starts_with(held)),
                    "{held:?} held back but starts no stop string of {stops:?}"
                );
                assert!(!occurrences(&sent, stops).iter().any(late), "{sent:?} sent");
                continue;
            }
            (Some(FinishReason::Stop), Some(StopReason::String(stop))) => {
                assert!(i >= params.min_tokens, "stopped by {stop:?} at token {i}");
                let end = sent.len() + stop.len();
                assert!(
                    fed[sent.len()..].starts_with(stop.as_str()),
                    "{stop:?} in {fed:?}"
                );
                let first = occurrences(&fed, stops).into_iter().filter(late).min();
                assert_eq!(
                    first,
                    Some((end, sent.len())),
                    "{fed:?} stopped at {stop:?}"
                );
            }
            (Some(FinishReason::Stop), Some(StopReason::Eos | StopReason::Token(_))) => {
                assert!(
                    i >= params.min_tokens && stop_ids.contains(&id),
                    "token {i}: {id}"
                );
                assert_eq!(sent, fed);
                assert!(!occurrences(&sent, stops).iter().any(late), "{sent:?} sent");
            }
            (Some(FinishReason::Length), None) => {
                assert_eq!(i + 1, params.max_tokens, "length finish at token {i}");
                assert_eq!(sent, fed);
                assert!(!occurrences(&sent, stops).iter().any(late), "{sent:?} sent");
            }
            other => panic!("token {i}: impossible outcome {other:?}"),
        }
        return;
    }
}

fuzz_target!(|data: &[u8]| {
    let tokenizer = demo::tokenizer();
    let case = parse(data, &tokenizer);
    let decoder = Arc::new(Decoder(tokenizer.clone()));
    let deltas = check_detokenizer(&decoder, &case.ids, case.skip_special_tokens);
    // Stop token ids may lie past the tokenizer's vocabulary, within the model's.
    check_stop(&case, &deltas, tokenizer.vocab_size() + 8);
});
