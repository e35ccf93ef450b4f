//! `internvl generate --logprobs-out`: what the GPU check compares with the reference's logits.

use std::process::Command;

/// The `--logprobs-out` lines of `generate --prompt 你好 --ignore-eos` with `args`.
fn logprob_lines(args: &[&str]) -> Vec<serde_json::Value> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("logprobs.jsonl");
    let output = Command::new(env!("CARGO_BIN_EXE_internvl"))
        .args(["generate", "--prompt", "你好", "--ignore-eos"])
        .args(args)
        .arg("--logprobs-out")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// One JSON line per generated token; greedy picks the most likely token, so each line's
/// token is the first of its top list, with the top logprob, and the list is sorted.
#[test]
fn logprobs_out_has_one_line_per_greedy_token() {
    let lines = logprob_lines(&["--max-tokens", "5"]);
    assert_eq!(lines.len(), 5);
    for line in &lines {
        let top: Vec<(u64, f64)> = line["top"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e[0].as_u64().unwrap(), e[1].as_f64().unwrap()))
            .collect();
        assert_eq!(top.len(), 20);
        assert!(top.windows(2).all(|w| w[0].1 >= w[1].1), "{top:?}");
        assert_eq!(line["token"].as_u64().unwrap(), top[0].0);
        assert_eq!(line["logprob"].as_f64().unwrap(), top[0].1);
        let total: f64 = top.iter().map(|(_, lp)| lp.exp()).sum();
        assert!(total <= 1.0 + 1e-5, "probabilities sum to {total}");
    }
}

/// The greedy tokens of 16 steps on an image, with `extra` flags.
fn greedy_tokens(extra: &[&str]) -> Vec<u64> {
    let image = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/images/model-a.png"
    );
    let mut args = vec!["--max-tokens", "16", "--image", image];
    args.extend_from_slice(extra);
    logprob_lines(&args)
        .iter()
        .map(|l| l["token"].as_u64().unwrap())
        .collect()
}

/// `--quantize q8_0 --quantize-vision q8_0` loads and answers, and on the demo checkpoint keeps
/// f32's greedy tokens (crates/model/tests/quantized.rs measures it over the reference cases);
/// an unknown type is refused before loading, naming the types there are.
#[test]
fn quantize_flags_load_a_quantized_model() {
    let dense = greedy_tokens(&[]);
    assert_eq!(dense.len(), 16);
    assert_eq!(
        greedy_tokens(&["--quantize", "q8_0", "--quantize-vision", "q8_0"]),
        dense
    );
    assert_eq!(greedy_tokens(&["--quantize", "q4k"]).len(), 16);
    let output = Command::new(env!("CARGO_BIN_EXE_internvl"))
        .args(["generate", "--prompt", "hi", "--quantize", "q3k"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("unknown quantization") && stderr.contains("q4k"),
        "{stderr}"
    );
}
