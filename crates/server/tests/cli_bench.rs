//! `internvl bench` on the demo checkpoint: the JSON that scripts/gpu-check.sh reads.

use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

const IMAGES: [&str; 2] = ["model-a.png", "model-b.png"];

fn bench(json: &Path, args: &[&str]) -> Output {
    let images = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/images");
    let mut command = Command::new(env!("CARGO_BIN_EXE_internvl"));
    command.arg("bench");
    for image in IMAGES {
        command.arg("--image").arg(images.join(image));
    }
    command.arg("--json").arg(json).args(args).output().unwrap()
}

fn read(json: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap()
}

#[test]
fn bench_reports_levels_ttft_and_vit_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let out = bench(
        &json,
        &[
            "--concurrency",
            "1,3",
            "--max-tokens",
            "5",
            "--prompt-tokens",
            "40",
            "--ttft-runs",
            "2",
            "--ttft-prompt-tokens",
            "30",
            "--vit-batch",
            "1,2",
            "--vit-runs",
            "2",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("| concurrency | decode tok/s"), "{stdout}");
    let report = read(&json);
    assert_eq!(report["engine"], "internvl");
    assert_eq!(report["image_tokens"], 256);
    assert!(report["gpu_memory"].is_null(), "no GPU memory on the CPU");
    assert!(report["definitions"]["decode_tok_s"].is_string());

    let levels = report["levels"].as_array().unwrap();
    assert_eq!(levels.len(), 2);
    let aggregate = |i: usize| levels[i]["aggregate_tok_s"].as_f64().unwrap();
    assert_eq!(levels[0]["aggregate_vs_single_stream"], 1.0);
    let ratio = levels[1]["aggregate_vs_single_stream"].as_f64().unwrap();
    assert!(
        (ratio - aggregate(1) / aggregate(0)).abs() < 2e-3,
        "{ratio}"
    );
    for (level, concurrency) in levels.iter().zip([1, 3]) {
        assert_eq!(level["concurrency"], concurrency);
        assert_eq!(level["text_tokens"], 40, "the question is sized exactly");
        assert_eq!(level["prompt_tokens"], 296);
        assert_eq!(level["output_tokens"], 5 * concurrency);
        assert_eq!(level["preemptions"], 0);
        for key in [
            "decode_tok_s",
            "aggregate_tok_s",
            "ttft_p50_ms",
            "ttft_p99_ms",
        ] {
            assert!(level[key].as_f64().unwrap() > 0.0, "{key}: {level}");
        }
        // tokens 2..=5 of a chat alone: contexts 296 + 1..=4
        if concurrency == 1 {
            assert_eq!(level["decode_window_tokens"], 4);
            assert_eq!(level["decode_window_mean_context"], 298.5);
        }
    }

    let ttft = &report["ttft"];
    assert_eq!(
        (ttft["runs"].as_u64(), ttft["text_tokens"].as_u64()),
        (Some(2), Some(30))
    );
    assert!(ttft["p50_ms"].as_f64().unwrap() > 0.0);

    let vit = report["vit"].as_array().unwrap();
    assert_eq!(vit.len(), 2);
    for (entry, batch) in vit.iter().zip([1.0, 2.0]) {
        assert_eq!(entry["batch"].as_f64(), Some(batch));
        let per_image = entry["ms_per_image"].as_f64().unwrap();
        let per_batch = entry["ms_per_batch_p50"].as_f64().unwrap();
        assert!(per_image > 0.0 && (per_image * batch - per_batch).abs() < 0.01);
    }
}

#[test]
fn a_failed_level_is_reported_and_the_others_still_run() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    // 5000 tokens exceed the demo model's 2048 positions: the level fails, the ViT timing runs.
    let out = bench(
        &json,
        &[
            "--no-warmup",
            "--concurrency",
            "1",
            "--max-tokens",
            "5000",
            "--vit-batch",
            "1",
            "--vit-runs",
            "1",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("1 of the measurements failed"), "{stderr}");
    let report = read(&json);
    let level = &report["levels"][0];
    assert_eq!(level["concurrency"], 1);
    assert!(
        level["error"].as_str().unwrap().contains("positions"),
        "{level}"
    );
    assert!(report["vit"][0]["ms_per_image"].as_f64().unwrap() > 0.0);
}

#[test]
fn a_prompt_below_the_template_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = bench(&dir.path().join("bench.json"), &["--prompt-tokens", "3"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("below the template's minimum"), "{stderr}");
}
