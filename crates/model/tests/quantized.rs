//! Quantized weights against f32, measured as `docs/benchmarks.md` reports them and bounded by
//! those measurements, so that a regression in the quantized path fails here.
//!
//! On the reference fixtures (the demo checkpoint, whose f32 logits and greedy tokens equal
//! transformers' within 1e-3: `reference.rs`) and on the bench checkpoint's shape (random
//! weights, seed 0), for each type: the share of cases whose 32 greedy tokens are the f32
//! ones, the first step where any differs, and the error of the top-5 log-probabilities over
//! the first 32 steps, teacher-forced on the f32 greedy path (for each step, the five tokens
//! f32 ranks highest, |logprob − f32's|: the largest and the mean).
//!
//! The demo checkpoint's rows (64 and 160 wide) take no 256-element k-quant: its q6k and q4k
//! run as their fallbacks (q8_0, q5_0), which is what the log says at load. The bench shape's
//! 512-wide rows do take them; its 1376-wide `down_proj` falls back. The same measures hold
//! a 16-bit KV cache (f16, bf16) to the f32 one.

mod common;

use candle_core::{DType, Tensor};
use common::*;
use internvl_model::quant::{Quantization, WeightQuant};
use internvl_model::{Backends, LoadedModel};
use std::path::Path;

const STEPS: usize = 32;

/// Log-probabilities of each step's next token, the prompt then `tokens` fed in turn: the
/// distributions of steps 0..tokens.len().
fn teacher_forced(
    loaded: &LoadedModel,
    prompt: &[u32],
    images: Option<&Tensor>,
    tokens: &[u32],
) -> Vec<Vec<f64>> {
    run_steps(loaded, prompt, images, tokens.len(), |step, _| tokens[step])
        .iter()
        .map(|l| log_softmax(&l.to_vec1::<f32>().unwrap()))
        .collect()
}

fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    logits.iter().map(|&l| l as f64 - max - sum.ln()).collect()
}

/// One prompt: its ids and its image files.
struct Prompt {
    name: String,
    ids: Vec<u32>,
    images: Vec<std::path::PathBuf>,
}

/// What one quantization measured against f32.
#[derive(Debug)]
struct Fidelity {
    identical: usize,
    cases: usize,
    /// The first step where a greedy token differs, over all cases (`None`: none does).
    first_divergence: Option<usize>,
    max_error: f64,
    mean_error: f64,
}

/// The greedy tokens of f32 (`reference`'s per prompt) against those of `quantized`, and
/// the top-5 logprob error along the f32 path.
fn measure(
    f32_model: &LoadedModel,
    quantized: &LoadedModel,
    prompts: &[Prompt],
    reference: &[Vec<u32>],
) -> Fidelity {
    let (mut identical, mut first, mut max, mut sum, mut count) = (0, None::<usize>, 0f64, 0f64, 0);
    for (prompt, path) in prompts.iter().zip(reference) {
        let exact = teacher_forced(
            f32_model,
            &prompt.ids,
            image_rows(f32_model, &prompt.images).as_ref(),
            path,
        );
        let ours = teacher_forced(
            quantized,
            &prompt.ids,
            image_rows(quantized, &prompt.images).as_ref(),
            path,
        );
        for (e, q) in exact.iter().zip(&ours) {
            let mut top: Vec<usize> = (0..e.len()).collect();
            top.sort_by(|&a, &b| e[b].total_cmp(&e[a]));
            for &t in &top[..5] {
                let error = (q[t] - e[t]).abs();
                max = max.max(error);
                sum += error;
                count += 1;
            }
        }
        // Free-running greedy of the quantized model against the f32 path.
        let (_, tokens) = greedy(
            quantized,
            &prompt.ids,
            image_rows(quantized, &prompt.images).as_ref(),
            path.len(),
        );
        let divergence = tokens.iter().zip(path).position(|(a, b)| a != b);
        match divergence {
            None => identical += 1,
            Some(step) => first = Some(first.map_or(step, |f: usize| f.min(step))),
        }
        match divergence {
            None => println!("  {}: greedy identical", prompt.name),
            Some(step) => println!("  {}: greedy differs from step {step}", prompt.name),
        }
    }
    Fidelity {
        identical,
        cases: prompts.len(),
        first_divergence: first,
        max_error: max,
        mean_error: sum / count as f64,
    }
}

/// What a run changes from f32: the weights' quantization, or the KV cache's dtype.
#[derive(Clone, Copy)]
enum Variant {
    Weights(Quantization),
    KvCache(DType),
}

impl Variant {
    fn backends(self) -> Backends {
        match self {
            Variant::Weights(q) => cpu_backends(None).with_quantization(q),
            Variant::KvCache(dtype) => cpu_backends(None).with_kv_dtype(Some(dtype)).unwrap(),
        }
    }
}

impl std::fmt::Display for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Variant::Weights(q) => write!(f, "{q}"),
            Variant::KvCache(dtype) => write!(f, "KV cache {}", dtype.as_str()),
        }
    }
}

/// Bounds: each measured figure (printed by this test, recorded in docs/benchmarks.md) with a
/// margin of a half, and the greedy cases that were identical; the inputs and weights are
/// fixed, so the figures repeat exactly on a given CPU and move only with the kernels'
/// rounding. (The bench shape's random weights give flat distributions whose greedy choice
/// flips at the smallest change: none of its cases stays identical, even at q8_0.)
struct Bound {
    variant: Variant,
    min_identical: usize,
    max_error: f64,
    mean_error: f64,
}

/// The bound of `llm` (and `vision`) quantization: at least `min_identical` cases greedy
/// identical, top-5 logprob errors at most `max_error` and `mean_error`.
fn bound(
    llm: WeightQuant,
    vision: Option<WeightQuant>,
    min_identical: usize,
    max_error: f64,
    mean_error: f64,
) -> Bound {
    let quantization = Quantization {
        llm: Some(llm),
        vision,
    };
    Bound {
        variant: Variant::Weights(quantization),
        min_identical,
        max_error,
        mean_error,
    }
}

/// The same for a KV cache of `dtype`.
fn kv_bound(dtype: DType, min_identical: usize, max_error: f64, mean_error: f64) -> Bound {
    Bound {
        variant: Variant::KvCache(dtype),
        min_identical,
        max_error,
        mean_error,
    }
}

/// Each bound's variant, built by `load` from its backends, against `f32_model` along the f32
/// greedy path of each prompt.
fn check(
    label: &str,
    f32_model: &LoadedModel,
    load: impl Fn(&Backends) -> LoadedModel,
    prompts: &[Prompt],
    bounds: &[Bound],
) {
    let paths: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            greedy(
                f32_model,
                &p.ids,
                image_rows(f32_model, &p.images).as_ref(),
                STEPS,
            )
            .1
        })
        .collect();
    for bound in bounds {
        let variant = bound.variant;
        println!("{label}, {variant}:");
        let f = measure(f32_model, &load(&variant.backends()), prompts, &paths);
        println!(
            "{label}, {variant}: greedy identical {}/{}, first divergence {:?}, top-5 logprob error max {:.5} mean {:.6}",
            f.identical, f.cases, f.first_divergence, f.max_error, f.mean_error
        );
        assert!(
            f.identical >= bound.min_identical,
            "{label} {variant}: {f:?}"
        );
        assert!(f.max_error <= bound.max_error, "{label} {variant}: {f:?}");
        assert!(f.mean_error <= bound.mean_error, "{label} {variant}: {f:?}");
    }
}

fn reference_prompts() -> (Vec<Prompt>, Vec<Vec<u32>>) {
    let reference = Reference::load();
    let prompts = reference
        .cases()
        .iter()
        .map(|case| Prompt {
            name: case["name"].as_str().unwrap().to_string(),
            ids: ids(&case["input_ids"]),
            images: case_messages(case).1,
        })
        .collect();
    let tokens = reference
        .cases()
        .iter()
        .map(|c| ids(&c["greedy_tokens"]))
        .collect();
    (prompts, tokens)
}

#[test]
fn quantized_demo_checkpoint_stays_near_the_reference() {
    let f32_model = load_demo();
    let (prompts, reference_tokens) = reference_prompts();
    // The f32 path is the reference's (reference.rs proves it); checked again here, since the
    // quantized figures are taken along it.
    for (p, tokens) in prompts.iter().zip(&reference_tokens) {
        let ours = greedy(
            &f32_model,
            &p.ids,
            image_rows(&f32_model, &p.images).as_ref(),
            STEPS,
        )
        .1;
        assert_eq!(&ours[..], &tokens[..STEPS], "{}", p.name);
    }
    check(
        "demo",
        &f32_model,
        |backends| LoadedModel::load(&demo_dir(), backends).unwrap(),
        &prompts,
        &[
            bound(WeightQuant::Q8_0, None, 4, 7.5, 1.0),
            bound(WeightQuant::Q6K, None, 4, 7.5, 1.0),
            bound(WeightQuant::Q4K, None, 3, 25.1, 3.3),
            bound(WeightQuant::Q4K, Some(WeightQuant::Q8_0), 3, 25.1, 3.3),
            bound(WeightQuant::Q5K, None, 0, 16.4, 3.1),
            bound(WeightQuant::Q5_1, None, 0, 16.4, 3.1),
            bound(WeightQuant::Q5_0, None, 3, 25.1, 3.3),
            bound(WeightQuant::Q4_0, None, 0, 92.2, 9.7),
        ],
    );
}

/// The bench preset's shape (scripts/bench and docs/benchmarks.md: the demo config with
/// vision 256 wide × 10 layers, LLM 512 wide × 8 layers, MLP 1376) with random weights.
fn bench_config(dir: &Path) -> std::path::PathBuf {
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(demo_dir().join("config.json")).unwrap())
            .unwrap();
    let v = &mut c["vision_config"];
    v["hidden_size"] = 256.into();
    v["num_attention_heads"] = 4.into();
    v["intermediate_size"] = 1024.into();
    v["num_hidden_layers"] = 10.into();
    let l = &mut c["llm_config"];
    l["hidden_size"] = 512.into();
    l["num_attention_heads"] = 8.into();
    l["num_key_value_heads"] = 8.into();
    l["num_hidden_layers"] = 8.into();
    l["intermediate_size"] = 1376.into();
    let path = dir.join("config.json");
    std::fs::write(&path, c.to_string()).unwrap();
    path
}

#[test]
fn quantized_bench_shape_stays_near_f32() {
    let dir = tempfile::tempdir().unwrap();
    let config = bench_config(dir.path());
    let load = |backends: &Backends| {
        LoadedModel::load_random(&config, &demo_dir(), backends, 0)
            .unwrap()
            .0
    };
    let f32_model = load(&cpu_backends(None));
    let (prompts, _) = reference_prompts();
    check(
        "bench shape",
        &f32_model,
        load,
        &prompts,
        &[
            bound(WeightQuant::Q8_0, None, 0, 0.17, 0.04),
            bound(WeightQuant::Q6K, None, 0, 0.34, 0.085),
            bound(WeightQuant::Q4K, None, 0, 1.85, 0.43),
            bound(WeightQuant::Q4K, Some(WeightQuant::Q8_0), 0, 1.85, 0.43),
            bound(WeightQuant::Q5K, None, 0, 0.85, 0.19),
            bound(WeightQuant::Q5_1, None, 0, 1.0, 0.18),
            bound(WeightQuant::Q5_0, None, 0, 0.93, 0.19),
            bound(WeightQuant::Q4_0, None, 0, 2.05, 0.42),
        ],
    );
}

/// A 16-bit KV cache (`--kv-cache-dtype`) against the f32 one, measured and bounded as the
/// quantized weights are.
#[test]
fn sixteen_bit_kv_caches_stay_near_f32() {
    let (prompts, _) = reference_prompts();
    check(
        "demo",
        &load_demo(),
        |backends| LoadedModel::load(&demo_dir(), backends).unwrap(),
        &prompts,
        &[
            kv_bound(DType::F16, 5, 0.045, 0.0043),
            kv_bound(DType::BF16, 5, 0.42, 0.037),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let config = bench_config(dir.path());
    let random = |backends: &Backends| {
        LoadedModel::load_random(&config, &demo_dir(), backends, 0)
            .unwrap()
            .0
    };
    check(
        "bench shape",
        &random(&cpu_backends(None)),
        random,
        &prompts,
        &[
            kv_bound(DType::F16, 5, 0.0024, 0.00029),
            kv_bound(DType::BF16, 4, 0.022, 0.0028),
        ],
    );
}
