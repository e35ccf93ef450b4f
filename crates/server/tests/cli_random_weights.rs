//! `internvl generate --random-weights`: a model without a checkpoint, from the command line.

use std::path::PathBuf;
use std::process::{Command, Output};

fn demo_config() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../models/demo-internvl/config.json"
    ))
}

fn generate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_internvl"))
        .arg("generate")
        .args(["--prompt", "你好", "--max-tokens", "6", "--ignore-eos"])
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn generate_says_weights_are_random_and_repeats_itself() {
    let config = demo_config();
    let config = config.to_str().unwrap();
    let first = generate(&["--random-weights", config]);
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success(), "{stderr}");
    assert!(
        stderr.contains("random weights") && stderr.contains("parameters"),
        "{stderr}"
    );
    assert!(!first.stdout.is_empty());
    let again = generate(&["--random-weights", config]);
    assert_eq!(first.stdout, again.stdout);
}

#[test]
fn generate_names_a_missing_config_and_refuses_bf16_on_cpu() {
    let missing = generate(&["--random-weights", "/nonexistent/big-internvl.json"]);
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(!missing.status.success());
    assert!(
        stderr.contains("/nonexistent/big-internvl.json"),
        "{stderr}"
    );
    let config = demo_config();
    let bf16 = generate(&[
        "--random-weights",
        config.to_str().unwrap(),
        "--dtype",
        "bf16",
    ]);
    let stderr = String::from_utf8_lossy(&bf16.stderr);
    assert!(!bf16.status.success());
    assert!(stderr.contains("bf16 compute is not supported"), "{stderr}");
}
