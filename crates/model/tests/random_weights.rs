//! `--random-weights`: the model a config describes, built without a checkpoint.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use internvl_model::config::{PixelShuffleVersion, VisionNorm};
use internvl_model::{
    count_parameters, AttentionChoice, BackendError, Backends, Checkpoint, InternVlConfig,
    LoadError, LoadedModel, ParamCount,
};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn full_config_path() -> PathBuf {
    repo_root().join("config/models/internvl-chat-chinese-v1.1.json")
}

fn demo_config() -> Value {
    serde_json::from_str(&std::fs::read_to_string(demo_dir().join("config.json")).unwrap()).unwrap()
}

/// Writes `config` as a file in `dir`.
fn write_config(dir: &Path, config: &Value) -> PathBuf {
    let path = dir.join("random.json");
    std::fs::write(&path, config.to_string()).unwrap();
    path
}

fn load_random(config: &Path, dtype: DType, seed: u64) -> Result<LoadedModel, LoadError> {
    LoadedModel::load_random(config, &demo_dir(), &cpu_backends(Some(dtype)), seed)
        .map(|(loaded, _)| loaded)
}

fn load_error(config: &Path, dtype: DType) -> LoadError {
    load_random(config, dtype, 0).err().expect("the load fails")
}

/// Logits of an image question and the greedy tokens after it.
fn image_chat(loaded: &LoadedModel, steps: usize) -> (Tensor, Vec<u32>) {
    let image = images_dir().join("model-a.png");
    let images = image_rows(loaded, &[image]);
    let prompt = loaded
        .encode_prompt(&[internvl_model::prompt::ChatMessage {
            role: internvl_model::prompt::Role::User,
            parts: vec![
                internvl_model::prompt::Part::Image,
                internvl_model::prompt::Part::Text("请描述这张图片".into()),
            ],
        }])
        .unwrap();
    greedy(loaded, &prompt.ids, images.as_ref(), steps)
}

fn assert_finite(logits: &Tensor) -> f32 {
    let values: Vec<f32> = logits
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(values.iter().all(|v| v.is_finite()), "non-finite logits");
    values.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

#[test]
fn demo_config_generates_finite_logits_reproducibly() {
    let config = demo_dir().join("config.json");
    let first = load_random(&config, DType::F32, 7).unwrap();
    let (logits, tokens) = image_chat(&first, 4);
    let largest = assert_finite(&logits);
    assert!(largest > 0.0 && largest < 100.0, "largest logit {largest}");
    let again = image_chat(&load_random(&config, DType::F32, 7).unwrap(), 4);
    assert_eq!(
        logits.to_vec1::<f32>().unwrap(),
        again.0.to_vec1::<f32>().unwrap()
    );
    assert_eq!(tokens, again.1);
    let other = image_chat(&load_random(&config, DType::F32, 8).unwrap(), 1).0;
    assert_ne!(
        logits.to_vec1::<f32>().unwrap(),
        other.to_vec1::<f32>().unwrap()
    );
}

/// Full depth (48 ViT layers, 40 LLM layers) at the demo's width, in f16, whose range is
/// narrower than bf16's: the initialisation keeps each layer's scale whatever the width, so
/// this stands for the full model in bf16.
#[test]
fn full_depth_stays_finite_in_half_precision() {
    let mut config = demo_config();
    config["vision_config"]["num_hidden_layers"] = 48.into();
    config["llm_config"]["num_hidden_layers"] = 40.into();
    let dir = tempfile::tempdir().unwrap();
    let loaded = load_random(&write_config(dir.path(), &config), DType::F16, 1).unwrap();
    let (logits, _) = image_chat(&loaded, 2);
    let largest = assert_finite(&logits);
    assert!(largest < 100.0, "largest logit {largest}");
}

#[test]
fn counts_what_the_checkpoint_holds() {
    let config = InternVlConfig::from_dir(&demo_dir()).unwrap();
    let unused: Vec<String> = (config.vision_layers_used()..config.vision.num_hidden_layers)
        .map(|l| format!("vision_model.encoder.layers.{l}."))
        .collect();
    let checkpoint = Checkpoint::open(&demo_dir()).unwrap();
    let mut expected = ParamCount::default();
    for name in checkpoint.names() {
        if unused.iter().any(|u| name.starts_with(u.as_str())) {
            continue;
        }
        let count = checkpoint.tensor(name).unwrap().elem_count() as u64;
        match name.split('.').next().unwrap() {
            "vision_model" => expected.vision += count,
            "mlp1" => expected.projector += count,
            _ => expected.language_model += count,
        }
    }
    assert_eq!(count_parameters(&config), expected);
    let (_, made) = LoadedModel::load_random(
        &demo_dir().join("config.json"),
        &demo_dir(),
        &cpu_backends(None),
        0,
    )
    .unwrap();
    assert_eq!(made, expected);
}

#[test]
fn shipped_full_config_is_the_published_model() {
    let config = InternVlConfig::from_file(&full_config_path()).unwrap();
    let (v, l) = (&config.vision, &config.llm);
    assert_eq!(
        (v.hidden_size, v.num_attention_heads, v.intermediate_size),
        (3200, 25, 12800)
    );
    assert_eq!(
        (v.num_hidden_layers, v.patch_size, v.image_size),
        (48, 14, 448)
    );
    assert!(v.qk_normalization && !v.qkv_bias);
    assert_eq!((v.norm_type, v.layer_norm_eps), (VisionNorm::RmsNorm, 1e-6));
    assert_eq!(
        (l.hidden_size, l.num_hidden_layers, l.intermediate_size),
        (5120, 40, 13824)
    );
    assert_eq!((l.num_attention_heads, l.num_key_value_heads), (40, 40));
    assert_eq!((l.vocab_size, l.max_position_embeddings), (41919, 4096));
    assert_eq!((l.rms_norm_eps, l.rope_theta), (1e-6, 10_000.0));
    assert_eq!(config.ps_version, PixelShuffleVersion::V1);
    assert_eq!(config.template, "internvl_zh");
    assert_eq!(
        (config.vision_layers_used(), config.num_image_tokens()),
        (45, 256)
    );

    let used = count_parameters(&config);
    assert_eq!(used.language_model, 13_117_434_880);
    assert_eq!(used.projector, 91_786_240);
    assert_eq!(used.total(), 18_745_717_120);
    // With every ViT layer built, exactly the published checkpoint's size.
    let all_layers = InternVlConfig {
        select_layer: -1,
        ..config
    };
    assert_eq!(count_parameters(&all_layers).total(), 19_114_472_320);
}

#[test]
fn the_tokenizer_may_be_smaller_than_the_vocabulary() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = demo_config();
    config["llm_config"]["vocab_size"] = 41919.into();
    let loaded = load_random(&write_config(dir.path(), &config), DType::F32, 0).unwrap();
    assert!(loaded.tokenizer.vocab_size() < 41919);
    let (logits, _) = image_chat(&loaded, 1);
    assert_eq!(logits.dims(), &[41919]);
    config["llm_config"]["vocab_size"] = 100.into();
    let error = load_error(&write_config(dir.path(), &config), DType::F32);
    assert!(matches!(error, LoadError::VocabMismatch { model: 100, .. }));
}

#[test]
fn missing_or_broken_config_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere.json");
    let error = load_error(&missing, DType::F32).to_string();
    assert!(
        error.contains("cannot read") && error.contains("nowhere.json"),
        "{error}"
    );
    let broken = dir.path().join("broken.json");
    std::fs::write(&broken, "{\"model_type\": ").unwrap();
    let error = load_error(&broken, DType::F32).to_string();
    assert!(
        error.contains("broken.json") && error.contains("JSON"),
        "{error}"
    );
    let mut config = demo_config();
    config["llm_config"]
        .as_object_mut()
        .unwrap()
        .remove("vocab_size");
    let error = load_error(&write_config(dir.path(), &config), DType::F32).to_string();
    assert!(error.contains("llm_config.vocab_size"), "{error}");
}

#[test]
fn bf16_on_the_cpu_is_refused() {
    let error = Backends::resolve(&Device::Cpu, Some(DType::BF16), AttentionChoice::Auto)
        .expect_err("bf16 on the CPU is refused");
    assert!(matches!(error, BackendError::Bf16OnCpu), "{error}");
}
