//! The tokenizer against the upstream slow LlamaTokenizer, string by string.
//!
//! `tests/fixtures/reference/tokenizer_corpus.json` holds, for a few hundred strings, the ids and
//! decodes transformers 4.37.2 produced from `models/demo-internvl/` (a small LLaMA-shaped
//! SentencePiece BPE model with InternVL's added tokens), and those of the fast tokenizer
//! converted from it, saved as `tests/fixtures/tokenizer-json/`. Regenerate both with
//! `scripts/reference/make_tokenizer.py` and `scripts/reference/make_tokenizer_corpus.py`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use internvl_model::tokenizer::{Tokenizer, TokenizerError};
use serde_json::Value;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn demo_dir() -> PathBuf {
    repo_root().join("models/demo-internvl")
}

fn fast_dir() -> PathBuf {
    repo_root().join("tests/fixtures/tokenizer-json")
}

fn corpus() -> Result<Value> {
    let path = repo_root().join("tests/fixtures/reference/tokenizer_corpus.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .expect("id list")
        .iter()
        .map(|v| v.as_u64().expect("id") as u32)
        .collect()
}

fn text(value: &Value) -> &str {
    value.as_str().expect("string")
}

/// A fresh copy of `src`'s files in a temporary directory, for variations of a checkpoint.
fn copy_dir(src: &Path, name: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "internvl-tokenizer-test-{name}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        std::fs::copy(entry.path(), dir.join(entry.file_name()))?;
    }
    Ok(dir)
}

/// Compares `actual(entry)` with `entry[key]` over the corpus, prints the counts, and fails
/// with the first mismatches.
fn check_all<T: PartialEq + std::fmt::Debug>(
    label: &str,
    entries: &[Value],
    expected: impl Fn(&Value) -> T,
    actual: impl Fn(&Value) -> Result<T>,
) -> Result<()> {
    let mut failures = Vec::new();
    for entry in entries {
        let (want, got) = (expected(entry), actual(entry)?);
        if want != got {
            failures.push(format!(
                "{:?}\n  expected {want:?}\n  actual   {got:?}",
                text(&entry["text"])
            ));
        }
    }
    println!(
        "{label}: {} of {} corpus strings match",
        entries.len() - failures.len(),
        entries.len()
    );
    assert!(
        failures.is_empty(),
        "{label}: {} mismatches, first:\n{}",
        failures.len(),
        failures[..failures.len().min(5)].join("\n")
    );
    Ok(())
}

#[test]
fn sentencepiece_path_matches_the_slow_tokenizer() -> Result<()> {
    let corpus = corpus()?;
    let entries = corpus["entries"].as_array().expect("entries");
    assert!(entries.len() >= 250, "corpus too small: {}", entries.len());
    let tokenizer = Tokenizer::from_dir(&demo_dir())?;
    check_all(
        "ids",
        entries,
        |e| ids(&e["ids"]),
        |e| Ok(tokenizer.encode(text(&e["text"]))?),
    )?;
    check_all(
        "decode skip_special_tokens=True",
        entries,
        |e| text(&e["decode_skip_special"]).to_owned(),
        |e| Ok(tokenizer.decode(&ids(&e["ids"]), true)),
    )?;
    check_all(
        "decode skip_special_tokens=False",
        entries,
        |e| text(&e["decode_keep_special"]).to_owned(),
        |e| Ok(tokenizer.decode(&ids(&e["ids"]), false)),
    )?;
    Ok(())
}

#[test]
fn byte_fallback_sequences_decode_like_the_slow_tokenizer() -> Result<()> {
    let corpus = corpus()?;
    let tokenizer = Tokenizer::from_dir(&demo_dir())?;
    let cases = corpus["byte_piece_decodes"].as_array().expect("byte cases");
    for case in cases {
        let ids = ids(&case["ids"]);
        assert_eq!(
            tokenizer.decode(&ids, true),
            text(&case["decode_skip_special"]),
            "{ids:?}"
        );
        assert_eq!(
            tokenizer.decode(&ids, false),
            text(&case["decode_keep_special"]),
            "{ids:?}"
        );
    }
    println!(
        "byte-fallback decodes: {} of {} match",
        cases.len(),
        cases.len()
    );
    Ok(())
}

/// Generated ids need not look like `encode` output: random sequences, rich in special, added,
/// byte and whitespace pieces, decode as the slow tokenizer (and on the tokenizer.json path, as
/// the fast one) decodes them.
#[test]
fn random_id_sequences_decode_like_the_reference() -> Result<()> {
    let corpus = corpus()?;
    let cases = corpus["random_id_decodes"]
        .as_array()
        .expect("random id cases");
    for (dir, prefix) in [(demo_dir(), ""), (fast_dir(), "fast_")] {
        let tokenizer = Tokenizer::from_dir(&dir)?;
        let mut matched = 0;
        for case in cases {
            let ids = ids(&case["ids"]);
            for (skip, key) in [
                (true, "decode_skip_special"),
                (false, "decode_keep_special"),
            ] {
                assert_eq!(
                    tokenizer.decode(&ids, skip),
                    text(&case[format!("{prefix}{key}")]),
                    "{ids:?} skip={skip}"
                );
            }
            matched += 1;
        }
        println!(
            "random id decodes ({}): {matched} of {} match",
            dir.display(),
            cases.len()
        );
    }
    Ok(())
}

#[test]
fn clean_up_tokenization_spaces_is_honoured() -> Result<()> {
    let corpus = corpus()?;
    let entries = corpus["entries"].as_array().expect("entries");
    let dir = copy_dir(&demo_dir(), "clean-up")?;
    let config_path = dir.join("tokenizer_config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&config_path)?)?;
    config["clean_up_tokenization_spaces"] = Value::Bool(true);
    std::fs::write(&config_path, config.to_string())?;
    let tokenizer = Tokenizer::from_dir(&dir)?;
    check_all(
        "decode with clean-up",
        entries,
        |e| text(&e["decode_skip_special_clean_up"]).to_owned(),
        |e| Ok(tokenizer.decode(&ids(&e["ids"]), true)),
    )
}

/// Checkpoints saved before transformers 4.34 have no `added_tokens_decoder`: the added tokens
/// then come from `added_tokens.json` and the special ones from `special_tokens_map.json`.
#[test]
fn checkpoints_without_added_tokens_decoder_tokenize_the_same() -> Result<()> {
    let corpus = corpus()?;
    let entries = corpus["entries"].as_array().expect("entries");
    let dir = copy_dir(&demo_dir(), "old-config")?;
    let config_path = dir.join("tokenizer_config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&config_path)?)?;
    config
        .as_object_mut()
        .expect("object")
        .remove("added_tokens_decoder");
    std::fs::write(&config_path, config.to_string())?;
    let tokenizer = Tokenizer::from_dir(&dir)?;
    check_all(
        "ids (old-style config)",
        entries,
        |e| ids(&e["ids"]),
        |e| Ok(tokenizer.encode(text(&e["text"]))?),
    )?;
    check_all(
        "decode (old-style config)",
        entries,
        |e| text(&e["decode_keep_special"]).to_owned(),
        |e| Ok(tokenizer.decode(&ids(&e["ids"]), false)),
    )
}

#[test]
fn tokenizer_json_path_matches_the_fast_tokenizer() -> Result<()> {
    let corpus = corpus()?;
    let entries = corpus["entries"].as_array().expect("entries");
    let tokenizer = Tokenizer::from_dir(&fast_dir())?;
    check_all(
        "tokenizer.json ids",
        entries,
        |e| ids(&e["fast_ids"]),
        |e| Ok(tokenizer.encode(text(&e["text"]))?),
    )?;
    check_all(
        "tokenizer.json ids vs slow ids",
        entries,
        |e| ids(&e["ids"]),
        |e| Ok(tokenizer.encode(text(&e["text"]))?),
    )?;
    check_all(
        "tokenizer.json decode skip_special_tokens=True",
        entries,
        |e| text(&e["fast_decode_skip_special"]).to_owned(),
        |e| Ok(tokenizer.decode(&ids(&e["fast_ids"]), true)),
    )?;
    check_all(
        "tokenizer.json decode skip_special_tokens=False",
        entries,
        |e| text(&e["fast_decode_keep_special"]).to_owned(),
        |e| Ok(tokenizer.decode(&ids(&e["fast_ids"]), false)),
    )?;
    let same = entries
        .iter()
        .filter(|e| e["fast_decode_skip_special"] == e["decode_skip_special"])
        .count();
    println!(
        "fast decode equals slow decode (reference, not required): {same} of {}",
        entries.len()
    );
    Ok(())
}

#[test]
fn special_ids_vocabulary_and_token_lookup() -> Result<()> {
    let corpus = corpus()?;
    let added: Value = serde_json::from_str(&std::fs::read_to_string(
        demo_dir().join("added_tokens.json"),
    )?)?;
    for dir in [demo_dir(), fast_dir()] {
        let tokenizer = Tokenizer::from_dir(&dir)?;
        assert_eq!(tokenizer.bos_id(), 1);
        assert_eq!(tokenizer.eos_id(), 2);
        assert_eq!(tokenizer.token_to_id("</s>"), Some(2));
        assert_eq!(
            tokenizer.vocab_size() as u64,
            corpus["vocab_size"].as_u64().expect("vocab_size")
        );
        for (token, id) in added.as_object().expect("object") {
            assert_eq!(
                tokenizer.token_to_id(token).map(u64::from),
                id.as_u64(),
                "{token}"
            );
            assert_eq!(
                tokenizer.token_bytes(id.as_u64().expect("id") as u32),
                Some(token.as_bytes().to_vec())
            );
        }
        assert_eq!(tokenizer.token_to_id("no such piece"), None);
        assert_eq!(tokenizer.token_bytes(u32::MAX), None);
        assert_eq!(tokenizer.token_bytes(3 + 0x0a), Some(vec![b'\n']));
        let the = tokenizer.token_to_id("\u{2581}the").expect("▁the");
        assert_eq!(tokenizer.token_bytes(the), Some(b" the".to_vec()));
    }
    let slow = Tokenizer::from_dir(&demo_dir())?;
    let special: Vec<u32> = ids(&corpus["special_ids"]);
    for id in 0..slow.vocab_size() as u32 {
        assert_eq!(slow.is_special(id), special.contains(&id), "id {id}");
    }
    Ok(())
}

/// Concatenated `token_bytes` give back the text: one dummy-prefix space per chunk, byte pieces
/// reassembling characters. That is what a streaming detokenizer relies on.
#[test]
fn token_bytes_reassemble_the_text() -> Result<()> {
    let corpus = corpus()?;
    let tokenizer = Tokenizer::from_dir(&demo_dir())?;
    let added: Value = serde_json::from_str(&std::fs::read_to_string(
        demo_dir().join("added_tokens.json"),
    )?)?;
    let added_ids: Vec<u64> = added
        .as_object()
        .expect("object")
        .values()
        .filter_map(Value::as_u64)
        .collect();
    let mut checked = 0;
    for entry in corpus["entries"].as_array().expect("entries") {
        let s = text(&entry["text"]);
        let ids = ids(&entry["ids"]);
        // Texts with added or special tokens have several chunks; a literal ▁ comes back as a space.
        let several_chunks = ids[1..]
            .iter()
            .any(|&id| tokenizer.is_special(id) || added_ids.contains(&u64::from(id)));
        if s.is_empty() || s.contains('\u{2581}') || several_chunks {
            continue;
        }
        let bytes: Vec<u8> = ids[1..]
            .iter()
            .flat_map(|&id| tokenizer.token_bytes(id).expect("in vocabulary"))
            .collect();
        assert_eq!(String::from_utf8(bytes)?, format!(" {s}"));
        checked += 1;
    }
    println!("token_bytes reassemble {checked} texts");
    assert!(checked > 150);
    Ok(())
}

#[test]
fn missing_or_corrupt_tokenizer_model_names_the_file() -> Result<()> {
    let dir = copy_dir(&demo_dir(), "broken-model")?;
    let model = dir.join("tokenizer.model");

    std::fs::remove_file(&model)?;
    let err = Tokenizer::from_dir(&dir).expect_err("no tokenizer.model");
    assert!(matches!(err, TokenizerError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("tokenizer.model"), "{err}");

    std::fs::write(&model, b"this is not a protobuf message")?;
    let err = Tokenizer::from_dir(&dir).expect_err("garbage tokenizer.model");
    assert!(matches!(err, TokenizerError::Model { .. }), "{err:?}");
    assert!(err.to_string().contains("tokenizer.model"), "{err}");

    let good = std::fs::read(demo_dir().join("tokenizer.model"))?;
    std::fs::write(&model, &good[..good.len() / 2])?;
    let err = Tokenizer::from_dir(&dir).expect_err("truncated tokenizer.model");
    assert!(err.to_string().contains("tokenizer.model"), "{err}");

    std::fs::write(dir.join("tokenizer_config.json"), "{")?;
    std::fs::write(&model, &good)?;
    let err = Tokenizer::from_dir(&dir).expect_err("bad tokenizer_config.json");
    assert!(err.to_string().contains("tokenizer_config.json"), "{err}");

    let err = Tokenizer::from_dir(&repo_root().join("no/such/dir")).expect_err("no directory");
    assert!(err.to_string().contains("tokenizer.model"), "{err}");
    println!("errors: {err}");
    Ok(())
}

#[test]
fn unsupported_tokenizer_settings_are_rejected() -> Result<()> {
    let dir = copy_dir(&demo_dir(), "unsupported")?;
    let config_path = dir.join("tokenizer_config.json");
    let original: Value = serde_json::from_str(&std::fs::read_to_string(&config_path)?)?;
    for (key, value) in [
        ("legacy", Value::Bool(false)),
        (
            "tokenizer_class",
            Value::String("InternLM2Tokenizer".into()),
        ),
        ("bos_token", Value::String("<not a token>".into())),
    ] {
        let mut config = original.clone();
        config[key] = value;
        std::fs::write(&config_path, config.to_string())?;
        let err = Tokenizer::from_dir(&dir).expect_err(key);
        assert!(err.to_string().contains("tokenizer_config.json"), "{err}");
    }
    std::fs::write(dir.join("tokenizer.json"), "{}")?;
    let err = Tokenizer::from_dir(&dir).expect_err("bad tokenizer.json");
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
    Ok(())
}
