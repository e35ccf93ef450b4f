//! Loading the checkpoint directory in every layout upstream and the hub use, and failing
//! clearly when it is incomplete.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use internvl_model::weights::WeightFormat;
use internvl_model::{Checkpoint, LoadError, LoadedModel};
use std::collections::HashMap;
use std::path::Path;

const NON_WEIGHT_FILES: [&str; 5] = [
    "config.json",
    "tokenizer.model",
    "added_tokens.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// A new directory holding the demo checkpoint's config and tokenizer, but no weights.
fn empty_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for file in NON_WEIGHT_FILES {
        std::fs::copy(demo_dir().join(file), dir.path().join(file)).unwrap();
    }
    dir
}

fn demo_tensors() -> HashMap<String, Tensor> {
    let checkpoint = Checkpoint::open(&demo_dir()).unwrap();
    assert_eq!(checkpoint.format(), WeightFormat::Pickle);
    assert_eq!(checkpoint.num_shards(), 2);
    let names: Vec<String> = checkpoint.names().map(str::to_string).collect();
    names
        .into_iter()
        .map(|n| {
            let t = checkpoint.tensor(&n).unwrap();
            (n, t)
        })
        .collect()
}

/// Writes `tensors` as safetensors shards with an index, split by name prefix.
fn write_sharded_safetensors(dir: &Path, tensors: &HashMap<String, Tensor>) {
    let mut map = serde_json::Map::new();
    for (file, vision) in [
        ("model-00001-of-00002.safetensors", true),
        ("model-00002-of-00002.safetensors", false),
    ] {
        let part: HashMap<String, Tensor> = tensors
            .iter()
            .filter(|(n, _)| n.starts_with("vision_model.") == vision)
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect();
        for name in part.keys() {
            map.insert(name.clone(), file.into());
        }
        candle_core::safetensors::save(&part, dir.join(file)).unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

/// Logits of the reference's one-image case: a full pass through every module.
fn one_image_logits(loaded: &LoadedModel) -> Tensor {
    let reference = Reference::load();
    let case = reference
        .cases()
        .iter()
        .find(|c| c["name"] == "one_image")
        .unwrap()
        .clone();
    let (_, files) = case_messages(&case);
    let images = image_rows(loaded, &files);
    greedy(loaded, &ids(&case["input_ids"]), images.as_ref(), 1).0
}

fn load(dir: &Path) -> Result<LoadedModel, LoadError> {
    LoadedModel::load(dir, &cpu_backends(Some(DType::F32)))
}

fn error_text(dir: &Path) -> String {
    match load(dir) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn sharded_safetensors_equal_the_pickles() {
    let pickled = one_image_logits(&load_demo());
    let dir = empty_copy();
    write_sharded_safetensors(dir.path(), &demo_tensors());
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(
        (checkpoint.format(), checkpoint.num_shards()),
        (WeightFormat::Safetensors, 2)
    );
    let from_safetensors = one_image_logits(&load(dir.path()).unwrap());
    assert_eq!(errors(&from_safetensors, &pickled).0, 0.0);
}

#[test]
fn single_f32_safetensors_without_unused_vit_layers_loads() {
    let pickled = one_image_logits(&load_demo());
    let loaded = load_demo();
    let used = loaded.model.config().vision_layers_used();
    let total = loaded.model.config().vision.num_hidden_layers;
    assert!(
        used < total,
        "the demo checkpoint must have layers past select_layer"
    );
    // Drop every ViT layer past select_layer and widen the rest to f32.
    let kept: HashMap<String, Tensor> = demo_tensors()
        .into_iter()
        .filter(|(n, _)| {
            !(used..total).any(|l| n.starts_with(&format!("vision_model.encoder.layers.{l}.")))
        })
        .map(|(n, t)| (n, t.to_dtype(DType::F32).unwrap()))
        .collect();
    let dir = empty_copy();
    candle_core::safetensors::save(&kept, dir.path().join("model.safetensors")).unwrap();
    let logits = one_image_logits(&load(dir.path()).unwrap());
    assert_eq!(errors(&logits, &pickled).0, 0.0);
}

#[test]
fn missing_shard_is_named() {
    let dir = empty_copy();
    write_sharded_safetensors(dir.path(), &demo_tensors());
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let error = error_text(dir.path());
    assert!(
        error.contains("model-00002-of-00002.safetensors"),
        "{error}"
    );
    assert!(error.contains("missing"), "{error}");
}

#[test]
fn missing_tensor_is_named() {
    let mut tensors = demo_tensors();
    tensors.remove("language_model.model.layers.1.mlp.up_proj.weight");
    let dir = empty_copy();
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
    let error = error_text(dir.path());
    assert!(
        error.contains("language_model.model.layers.1.mlp.up_proj.weight"),
        "{error}"
    );
}

#[test]
fn wrong_shape_names_tensor_and_file() {
    let mut tensors = demo_tensors();
    let name = "mlp1.1.weight";
    let t = tensors[name].clone();
    let (rows, cols) = t.dims2().unwrap();
    tensors.insert(
        name.into(),
        Tensor::zeros((rows + 1, cols), t.dtype(), &Device::Cpu).unwrap(),
    );
    let dir = empty_copy();
    write_sharded_safetensors(dir.path(), &tensors);
    let error = error_text(dir.path());
    assert!(error.contains(name), "{error}");
    assert!(
        error.contains("model-00002-of-00002.safetensors"),
        "{error}"
    );
    assert!(
        error.contains(&format!("[{}, {cols}]", rows + 1)),
        "{error}"
    );
}

#[test]
fn corrupt_pickle_shard_is_named() {
    let dir = empty_copy();
    for file in [
        "pytorch_model.bin.index.json",
        "pytorch_model-00001-of-00002.bin",
    ] {
        std::fs::copy(demo_dir().join(file), dir.path().join(file)).unwrap();
    }
    std::fs::write(
        dir.path().join("pytorch_model-00002-of-00002.bin"),
        b"not a zip",
    )
    .unwrap();
    let error = error_text(dir.path());
    assert!(
        error.contains("pytorch_model-00002-of-00002.bin"),
        "{error}"
    );
}

#[test]
fn no_weights_at_all() {
    let dir = empty_copy();
    assert!(error_text(dir.path()).contains("no weights"));
}

/// Breaks one field of a config.
type Edit = fn(&mut serde_json::Value);

#[test]
fn config_errors_name_the_field() {
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(demo_dir().join("config.json")).unwrap())
            .unwrap();
    let cases: [(&str, Edit, &str); 4] = [
        (
            "missing",
            |c| {
                c["llm_config"]
                    .as_object_mut()
                    .unwrap()
                    .remove("hidden_size");
            },
            "llm_config.hidden_size",
        ),
        (
            "model type",
            |c| c["model_type"] = "qwen2_vl".into(),
            "qwen2_vl",
        ),
        (
            "ps_version",
            |c| c["ps_version"] = "v3".into(),
            "ps_version",
        ),
        (
            "wrong type",
            |c| c["vision_config"]["patch_size"] = "14".into(),
            "vision_config.patch_size",
        ),
    ];
    for (what, edit, expected) in cases {
        let dir = empty_copy();
        let mut broken = config.clone();
        edit(&mut broken);
        std::fs::write(dir.path().join("config.json"), broken.to_string()).unwrap();
        let error = error_text(dir.path());
        assert!(error.contains(expected), "{what}: {error}");
    }
}

#[test]
fn progress_reports_every_tensor_and_skips_unused_layers() {
    let reports = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = reports.clone();
    let loaded = LoadedModel::load_with_progress(
        &demo_dir(),
        &cpu_backends(None),
        Some(Box::new(move |p| sink.lock().unwrap().push(*p))),
    )
    .unwrap();
    let reports = reports.lock().unwrap();
    let last = reports.last().unwrap();
    let config = loaded.model.config();
    let unused: Vec<String> = (config.vision_layers_used()..config.vision.num_hidden_layers)
        .map(|l| format!("vision_model.encoder.layers.{l}."))
        .collect();
    let checkpoint = Checkpoint::open(&demo_dir()).unwrap();
    let used = checkpoint
        .names()
        .filter(|n| !unused.iter().any(|u| n.starts_with(u.as_str())))
        .count();
    assert_eq!(last.tensors, used);
    assert_eq!(reports.len(), last.tensors, "one report per tensor");
    assert_eq!((last.shards_opened, last.shards), (2, 2));
    assert!(reports.windows(2).all(|w| w[0].bytes < w[1].bytes));
}

#[test]
fn f16_checkpoints_load() {
    let pickled = one_image_logits(&load_demo());
    let f16: HashMap<String, Tensor> = demo_tensors()
        .into_iter()
        .map(|(n, t)| (n, t.to_dtype(DType::F16).unwrap()))
        .collect();
    let dir = empty_copy();
    candle_core::safetensors::save(&f16, dir.path().join("model.safetensors")).unwrap();
    let logits = one_image_logits(&load(dir.path()).unwrap());
    // bf16 values fit f16's 10-bit mantissa; only the tiniest lose bits as subnormals.
    let (abs, rel) = errors(&logits, &pickled);
    assert!(rel < 1e-3, "f16 weights: max abs {abs}, rel {rel}");
    let top = |t: &Tensor| t.argmax(0).unwrap().to_scalar::<u32>().unwrap();
    assert_eq!(top(&logits), top(&pickled));
}
