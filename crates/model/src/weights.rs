//! Reads the checkpoint directory as published: sharded PyTorch pickles or safetensors.
//!
//! Tensors are read only when the model asks for them, so weights the forward never uses
//! (ViT layers past `select_layer`) are never touched. Both formats are memory-mapped: a
//! pickle shard is a zip archive whose entries are stored uncompressed, so each tensor is a
//! byte range of the file.

mod shard;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use shard::Shard;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Why a weight could not be had, naming the file and tensor involved.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("no weights in {dir}: expected model.safetensors[.index.json] or pytorch_model.bin[.index.json]")]
    NoWeights { dir: String },
    #[error("invalid shard index {path}: {reason}")]
    Index { path: String, reason: String },
    #[error("shard {path} is missing (listed in {index})")]
    MissingShard { path: String, index: String },
    #[error("cannot read shard {path}: {reason}")]
    Shard { path: String, reason: String },
    #[error("tensor `{name}` is not in the checkpoint {dir}")]
    MissingTensor { name: String, dir: String },
    #[error("tensor `{name}` is listed for {path} but is not in that file")]
    NotInShard { name: String, path: String },
    #[error("tensor `{name}` in {path} has shape {found:?}, expected {expected:?}")]
    Shape {
        name: String,
        path: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
}

impl From<WeightsError> for candle_core::Error {
    fn from(e: WeightsError) -> Self {
        candle_core::Error::Msg(e.to_string())
    }
}

/// The on-disk format of the shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    Safetensors,
    Pickle,
}

/// How far loading has got, reported after every tensor read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadProgress {
    pub tensors: usize,
    pub bytes: u64,
    pub shards_opened: usize,
    pub shards: usize,
}

/// Receives [`LoadProgress`] reports.
pub type ProgressFn = Box<dyn Fn(&LoadProgress) + Send + Sync>;

/// A checkpoint directory's weights, opened lazily shard by shard.
pub struct Checkpoint {
    progress: Option<ProgressFn>,
    dir: PathBuf,
    format: WeightFormat,
    shards: Vec<Shard>,
    routing: HashMap<String, usize>,
    loaded: Mutex<BTreeSet<String>>,
    bytes_loaded: AtomicU64,
}

impl Checkpoint {
    /// Finds the weights in `dir`, preferring safetensors, and checks every shard exists.
    pub fn open(dir: &Path) -> Result<Self, WeightsError> {
        let candidates = [
            (
                "model.safetensors.index.json",
                WeightFormat::Safetensors,
                true,
            ),
            ("model.safetensors", WeightFormat::Safetensors, false),
            ("pytorch_model.bin.index.json", WeightFormat::Pickle, true),
            ("pytorch_model.bin", WeightFormat::Pickle, false),
        ];
        let (file, format, indexed) = candidates
            .into_iter()
            .find(|(file, _, _)| dir.join(file).is_file())
            .ok_or_else(|| WeightsError::NoWeights {
                dir: dir.display().to_string(),
            })?;
        let mut checkpoint = Checkpoint {
            progress: None,
            dir: dir.to_path_buf(),
            format,
            shards: Vec::new(),
            routing: HashMap::new(),
            loaded: Mutex::new(BTreeSet::new()),
            bytes_loaded: AtomicU64::new(0),
        };
        let path = dir.join(file);
        if indexed {
            checkpoint.read_index(&path)?;
        } else {
            checkpoint.shards.push(Shard::new(path));
            let names = checkpoint.shards[0].names()?;
            checkpoint.routing = names.into_iter().map(|n| (n, 0)).collect();
        }
        Ok(checkpoint)
    }

    fn read_index(&mut self, path: &Path) -> Result<(), WeightsError> {
        let shown = path.display().to_string();
        let index_error = |reason: String| WeightsError::Index {
            path: shown.clone(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| index_error(e.to_string()))?;
        let index: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| index_error(e.to_string()))?;
        let map = index
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| index_error("no `weight_map` object".into()))?;
        let mut shard_ids: HashMap<String, usize> = HashMap::new();
        for (name, file) in map {
            let file = file
                .as_str()
                .ok_or_else(|| index_error(format!("`{name}` maps to a non-string")))?;
            if file.contains('/') || file.contains('\\') || file.starts_with('.') {
                return Err(index_error(format!(
                    "shard name `{file}` is not a plain file name"
                )));
            }
            let next = shard_ids.len();
            let id = *shard_ids.entry(file.to_string()).or_insert(next);
            self.routing.insert(name.clone(), id);
        }
        let mut files: Vec<(usize, String)> = shard_ids.into_iter().map(|(f, i)| (i, f)).collect();
        files.sort();
        for (_, file) in files {
            let shard_path = self.dir.join(&file);
            if !shard_path.is_file() {
                return Err(WeightsError::MissingShard {
                    path: shard_path.display().to_string(),
                    index: shown.clone(),
                });
            }
            self.shards.push(Shard::new(shard_path));
        }
        Ok(())
    }

    /// Calls `progress` after every tensor read, so a long load can be shown.
    pub fn with_progress(mut self, progress: ProgressFn) -> Self {
        self.progress = Some(progress);
        self
    }

    pub fn format(&self) -> WeightFormat {
        self.format
    }

    pub fn num_shards(&self) -> usize {
        self.shards.len()
    }

    /// Whether the checkpoint lists a tensor of this name.
    pub fn contains(&self, name: &str) -> bool {
        self.routing.contains_key(name)
    }

    /// Names of all tensors the checkpoint lists.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.routing.keys().map(String::as_str)
    }

    /// Reads one tensor as stored (its own dtype, on the CPU).
    pub fn tensor(&self, name: &str) -> Result<Tensor, WeightsError> {
        let id = *self
            .routing
            .get(name)
            .ok_or_else(|| WeightsError::MissingTensor {
                name: name.to_string(),
                dir: self.dir.display().to_string(),
            })?;
        let shard = &self.shards[id];
        let tensor = shard.load(name)?;
        let bytes = (tensor.elem_count() * tensor.dtype().size_in_bytes()) as u64;
        let total = self.bytes_loaded.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let tensors = match self.loaded.lock() {
            Ok(mut loaded) => {
                loaded.insert(name.to_string());
                loaded.len()
            }
            Err(_) => 0,
        };
        if let Some(progress) = &self.progress {
            progress(&LoadProgress {
                tensors,
                bytes: total,
                shards_opened: self.shards.iter().filter(|s| s.is_open()).count(),
                shards: self.shards.len(),
            });
        }
        Ok(tensor)
    }

    fn shard_path(&self, name: &str) -> String {
        self.routing
            .get(name)
            .map(|&id| self.shards[id].path().display().to_string())
            .unwrap_or_else(|| self.dir.display().to_string())
    }
}

impl SimpleBackend for Checkpoint {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.tensor(name)?;
        if tensor.shape() != &shape {
            return Err(WeightsError::Shape {
                name: name.to_string(),
                path: self.shard_path(name),
                found: tensor.dims().to_vec(),
                expected: shape.dims().to_vec(),
            }
            .into());
        }
        tensor.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.tensor(name)?.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.contains(name)
    }
}
