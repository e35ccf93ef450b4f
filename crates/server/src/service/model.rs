//! Which weights to load, onto which device, in which precision, with which attention; and
//! the loading progress
//! `serve` shows while a checkpoint of many gigabytes is read.

use crate::device::memory_info;
use crate::host_memory::peak_rss;
use crate::loading::load_model;
use candle_core::{DType, Device};
use internvl_model::quant::Quantization;
use internvl_model::weights::{LoadProgress, ProgressFn};
use internvl_model::{AttentionChoice, LoadedModel};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The model to load.
#[derive(Debug, Clone)]
pub struct ModelSource {
    /// Checkpoint directory; with `random_weights`, only its tokenizer is used.
    pub dir: PathBuf,
    /// A config file whose model is built with random weights instead of loaded.
    pub random_weights: Option<PathBuf>,
    pub device: Device,
    /// `None`: the device's default.
    pub dtype: Option<DType>,
    pub attention: AttentionChoice,
    /// Linear layers quantized at load (`--quantize`, `--quantize-vision`).
    pub quantization: Quantization,
    /// The KV cache's dtype (`--kv-cache-dtype`); `None`: the compute dtype.
    pub kv_dtype: Option<DType>,
}

/// Whether loading reports its progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    Quiet,
    /// A live line on a terminal, a log line every few seconds otherwise.
    Shown,
}

impl ModelSource {
    /// Loads the model: minutes for the real checkpoint.
    pub fn load(&self, progress: Progress) -> anyhow::Result<LoadedModel> {
        let report = match progress {
            Progress::Quiet => None,
            Progress::Shown => Some(load_progress()),
        };
        let started = Instant::now();
        let loaded = load_model(self, report)?;
        if progress == Progress::Shown && std::io::stderr().is_terminal() {
            // Ends the live progress line.
            eprintln!();
        }
        // What loading cost, as an operator sizes a host or a card by it: the process's peak
        // resident memory so far is the load's, and the device memory in use now is the
        // weights' (and the CUDA context's) before any KV cache is allocated.
        let mib = |bytes: u64| bytes >> 20;
        tracing::info!(
            seconds = started.elapsed().as_secs_f64(),
            peak_rss_mib = peak_rss().map(mib),
            device_used_mib = memory_info(&self.device)
                .map(|(free, total)| mib(total.saturating_sub(free) as u64)),
            "model loaded"
        );
        Ok(loaded)
    }
}

/// Shows loading progress: a live line on a terminal, a log line every few seconds otherwise.
fn load_progress() -> ProgressFn {
    let terminal = std::io::stderr().is_terminal();
    let last = Mutex::new(Instant::now());
    Box::new(move |p: &LoadProgress| {
        let gb = p.bytes as f64 / 1e9;
        if terminal {
            eprint!(
                "\rloading: shard {}/{}, {} tensors, {gb:.2} GB",
                p.shards_opened, p.shards, p.tensors
            );
        } else if let Ok(mut last) = last.lock() {
            if last.elapsed() >= Duration::from_secs(5) {
                *last = Instant::now();
                tracing::info!(
                    shards_opened = p.shards_opened,
                    shards = p.shards,
                    tensors = p.tensors,
                    gigabytes = gb,
                    "loading"
                );
            }
        }
    })
}
