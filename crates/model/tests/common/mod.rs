//! Shared by the model tests: paths of the committed fixtures and the reference outputs of
//! `scripts/reference/generate_model.py` (transformers InternVL, patched to V1.1).

#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use internvl_model::loader::pixel_batch;
use internvl_model::prompt::{ChatMessage, Part, Role};
use internvl_model::{AttentionChoice, Backends, LoadedModel, PagedKvCache, SequenceSlice};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn demo_dir() -> PathBuf {
    repo_root().join("models/demo-internvl")
}

pub fn images_dir() -> PathBuf {
    repo_root().join("tests/fixtures/images")
}

/// The CPU's backends for `dtype` (default f32), as the binary resolves them by default.
pub fn cpu_backends(dtype: Option<DType>) -> Backends {
    Backends::resolve(&Device::Cpu, dtype, AttentionChoice::Auto).expect("a CPU dtype")
}

pub fn load_demo() -> LoadedModel {
    LoadedModel::load(&demo_dir(), &cpu_backends(None)).expect("demo checkpoint loads")
}

/// `model_cases.json` and `model.safetensors`.
pub struct Reference {
    pub meta: Value,
    pub tensors: HashMap<String, Tensor>,
}

impl Reference {
    pub fn load() -> Self {
        let dir = repo_root().join("tests/fixtures/reference");
        let text = std::fs::read_to_string(dir.join("model_cases.json")).unwrap();
        let meta = serde_json::from_str(&text).unwrap();
        let tensors =
            candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
        Reference { meta, tensors }
    }

    pub fn cases(&self) -> &[Value] {
        self.meta["cases"].as_array().unwrap()
    }

    pub fn tensor(&self, name: &str) -> &Tensor {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("reference has no `{name}`"))
    }
}

/// A case's OpenAI-style messages, with the image files they name in order.
pub fn case_messages(case: &Value) -> (Vec<ChatMessage>, Vec<PathBuf>) {
    let mut files = Vec::new();
    let messages = case["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let role = match m["role"].as_str().unwrap() {
                "system" => Role::System,
                "user" => Role::User,
                "assistant" => Role::Assistant,
                other => panic!("role {other}"),
            };
            let parts = match &m["content"] {
                Value::String(s) => vec![Part::Text(s.clone())],
                Value::Array(parts) => parts
                    .iter()
                    .map(|p| match p["type"].as_str().unwrap() {
                        "text" => Part::Text(p["text"].as_str().unwrap().to_string()),
                        "image" => {
                            files.push(images_dir().join(p["file"].as_str().unwrap()));
                            Part::Image
                        }
                        other => panic!("part type {other}"),
                    })
                    .collect(),
                other => panic!("content {other}"),
            };
            ChatMessage { role, parts }
        })
        .collect();
    (messages, files)
}

pub fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

/// Image embeddings [images · tokens, hidden] of `files`, encoded as one batch.
pub fn image_rows(loaded: &LoadedModel, files: &[PathBuf]) -> Option<Tensor> {
    if files.is_empty() {
        return None;
    }
    let pixels: Vec<_> = files
        .iter()
        .map(|f| {
            internvl_model::preprocess::preprocess(&std::fs::read(f).unwrap(), &loaded.preprocess)
                .unwrap()
        })
        .collect();
    let embeds = loaded
        .model
        .encode_images(
            &pixel_batch(&pixels.iter().collect::<Vec<_>>(), loaded.model.device()).unwrap(),
        )
        .unwrap();
    Some(embeds.flatten_to(1).unwrap())
}

/// Largest absolute difference, and that divided by the reference's largest magnitude.
pub fn errors(ours: &Tensor, reference: &Tensor) -> (f32, f32) {
    let ours: Vec<f32> = ours.flatten_all().unwrap().to_vec1().unwrap();
    let reference: Vec<f32> = reference.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(ours.len(), reference.len(), "sizes differ");
    let max_abs = ours
        .iter()
        .zip(&reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    let scale = reference.iter().map(|b| b.abs()).fold(0.0f32, f32::max);
    (max_abs, max_abs / scale.max(f32::MIN_POSITIVE))
}

/// `steps` steps of `loaded` on the prompt `ids` (with `images`' embeddings): the logits
/// [vocab] of each step's next token, each fed back as `next(step, &logits)` chooses (the
/// last step's choice is not fed).
pub fn run_steps(
    loaded: &LoadedModel,
    ids: &[u32],
    images: Option<&Tensor>,
    steps: usize,
    mut next: impl FnMut(usize, &Tensor) -> u32,
) -> Vec<Tensor> {
    let model = &loaded.model;
    let block_size = 16;
    let mut cache: PagedKvCache = model
        .new_kv_cache((ids.len() + steps).div_ceil(block_size), block_size)
        .unwrap();
    let table: Vec<u32> = (0..cache.num_blocks() as u32).collect();
    let slice = |start, len| SequenceSlice {
        start,
        len,
        block_table: table.clone(),
        wants_logits: true,
    };
    let embeds = model.embed(ids, images).unwrap();
    let mut logits = model
        .forward(&embeds, &[slice(0, ids.len())], &mut cache)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let mut all = Vec::with_capacity(steps);
    for step in 0..steps {
        let token = next(step, &logits);
        all.push(logits);
        if step + 1 == steps {
            break;
        }
        let embeds = model.embed(&[token], None).unwrap();
        logits = model
            .forward(&embeds, &[slice(ids.len() + step, 1)], &mut cache)
            .unwrap()
            .squeeze(0)
            .unwrap();
    }
    all
}

/// Greedy decoding of `steps` tokens: the first position's logits [vocab] and the tokens.
pub fn greedy(
    loaded: &LoadedModel,
    ids: &[u32],
    images: Option<&Tensor>,
    steps: usize,
) -> (Tensor, Vec<u32>) {
    let mut tokens = Vec::new();
    let logits = run_steps(loaded, ids, images, steps, |_, logits| {
        let token: u32 = logits.argmax(0).unwrap().to_scalar().unwrap();
        tokens.push(token);
        token
    });
    (logits[0].clone(), tokens)
}
