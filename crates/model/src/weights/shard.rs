//! One shard file of a checkpoint, opened on first use: safetensors through candle's mapped
//! reader, a `torch.save` zip archive by mapping it and reading each tensor's byte range.

use super::WeightsError;
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A shard's path and, once opened, its reader (or why it could not be opened).
pub(super) struct Shard {
    path: PathBuf,
    reader: OnceLock<Result<ShardReader, String>>,
}

enum ShardReader {
    Safetensors(candle_core::safetensors::MmapedSafetensors),
    Pickle(PickleShard),
}

impl Shard {
    pub(super) fn new(path: PathBuf) -> Self {
        Shard {
            path,
            reader: OnceLock::new(),
        }
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the shard has been opened (by a read).
    pub(super) fn is_open(&self) -> bool {
        self.reader.get().is_some()
    }

    /// Names of the tensors the shard holds.
    pub(super) fn names(&self) -> Result<Vec<String>, WeightsError> {
        Ok(self.reader()?.names())
    }

    /// Reads one tensor as stored (its own dtype, on the CPU).
    pub(super) fn load(&self, name: &str) -> Result<Tensor, WeightsError> {
        self.reader()?.load(name).map_err(|e| match e {
            LoadFailure::Absent => WeightsError::NotInShard {
                name: name.to_string(),
                path: self.path.display().to_string(),
            },
            LoadFailure::Other(reason) => WeightsError::Shard {
                path: self.path.display().to_string(),
                reason: format!("tensor `{name}`: {reason}"),
            },
        })
    }

    fn reader(&self) -> Result<&ShardReader, WeightsError> {
        self.reader
            .get_or_init(|| ShardReader::open(&self.path))
            .as_ref()
            .map_err(|reason| WeightsError::Shard {
                path: self.path.display().to_string(),
                reason: reason.clone(),
            })
    }
}

/// Why a shard could not give a tensor.
enum LoadFailure {
    Absent,
    Other(String),
}

impl ShardReader {
    fn open(path: &Path) -> Result<Self, String> {
        let is_safetensors = path.extension().is_some_and(|e| e == "safetensors");
        if is_safetensors {
            // SAFETY: the file is mapped read-only; like every loader of mapped weights we
            // rely on it not being truncated while the server runs.
            let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }
                .map_err(|e| e.to_string())?;
            Ok(ShardReader::Safetensors(st))
        } else {
            PickleShard::open(path).map(ShardReader::Pickle)
        }
    }

    fn names(&self) -> Vec<String> {
        match self {
            ShardReader::Safetensors(st) => st.tensors().into_iter().map(|(n, _)| n).collect(),
            ShardReader::Pickle(p) => p.tensors.keys().cloned().collect(),
        }
    }

    fn load(&self, name: &str) -> Result<Tensor, LoadFailure> {
        match self {
            ShardReader::Safetensors(st) => match st.get(name) {
                Err(_) => Err(LoadFailure::Absent),
                Ok(view) => candle_core::safetensors::Load::load(&view, &Device::Cpu)
                    .map_err(|e| LoadFailure::Other(e.to_string())),
            },
            ShardReader::Pickle(p) => p.load(name),
        }
    }
}

/// A `torch.save` zip archive, mapped into memory.
struct PickleShard {
    mmap: Mmap,
    tensors: HashMap<String, PickleTensor>,
}

struct PickleTensor {
    dtype: DType,
    dims: Vec<usize>,
    /// Stored column-major (a transposed view was saved); read reversed, then permuted.
    fortran_order: bool,
    bytes: Range<usize>,
}

impl PickleShard {
    fn open(path: &Path) -> Result<Self, String> {
        let infos = candle_core::pickle::read_pth_tensor_info(path, false, None)
            .map_err(|e| format!("not a PyTorch zip checkpoint: {e}"))?;
        let file = File::open(path).map_err(|e| e.to_string())?;
        // SAFETY: see `ShardReader::open`.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| e.to_string())?;
        let mut archive =
            zip::ZipArchive::new(std::io::Cursor::new(&mmap[..])).map_err(|e| e.to_string())?;
        let mut tensors = HashMap::new();
        for info in infos {
            let entry = archive
                .by_name(&info.path)
                .map_err(|e| format!("entry {} of `{}`: {e}", info.path, info.name))?;
            if entry.compression() != zip::CompressionMethod::Stored {
                return Err(format!(
                    "entry {} is compressed; torch never does that",
                    info.path
                ));
            }
            let start = entry
                .data_start()
                .ok_or_else(|| format!("entry {} has no data offset", info.path))?
                as usize;
            let size = entry.size() as usize;
            let elem = info.dtype.size_in_bytes();
            let layout = &info.layout;
            let dims = layout.dims().to_vec();
            let fortran_order = dims.len() > 1 && !layout.is_contiguous();
            if !layout.is_contiguous() && !layout.is_fortran_contiguous() {
                return Err(format!(
                    "tensor `{}` is stored with strides {:?}",
                    info.name,
                    layout.stride()
                ));
            }
            let offset = layout.start_offset() * elem;
            let len = layout.shape().elem_count() * elem;
            if offset + len > size {
                return Err(format!(
                    "tensor `{}` needs {} bytes at offset {offset}, its storage has {size}",
                    info.name, len
                ));
            }
            tensors.insert(
                info.name.clone(),
                PickleTensor {
                    dtype: info.dtype,
                    dims,
                    fortran_order,
                    bytes: start + offset..start + offset + len,
                },
            );
        }
        Ok(PickleShard { mmap, tensors })
    }

    fn load(&self, name: &str) -> Result<Tensor, LoadFailure> {
        let t = self.tensors.get(name).ok_or(LoadFailure::Absent)?;
        let other = |e: candle_core::Error| LoadFailure::Other(e.to_string());
        let data = &self.mmap[t.bytes.clone()];
        if t.fortran_order {
            let reversed: Vec<usize> = t.dims.iter().rev().copied().collect();
            let order: Vec<usize> = (0..t.dims.len()).rev().collect();
            Tensor::from_raw_buffer(data, t.dtype, &reversed, &Device::Cpu)
                .and_then(|x| x.permute(order))
                .and_then(|x| x.contiguous())
                .map_err(other)
        } else {
            Tensor::from_raw_buffer(data, t.dtype, &t.dims, &Device::Cpu).map_err(other)
        }
    }
}
