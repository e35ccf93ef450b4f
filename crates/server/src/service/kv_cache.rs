//! How many KV-cache blocks an engine gets: chosen once, from a memory budget or from the
//! sequences it must hold, and that one count given to both the engine's block pool and the
//! runner's cache, so the two cannot disagree.

use crate::runner::CandleRunner;
use crate::settings::{defaults, KvCacheMemory};
use anyhow::{bail, Context};
use candle_core::{DType, Device};
use internvl_model::config::LlmConfig;
use internvl_model::{LoadedModel, PagedKvCache};
use internvl_scheduler::EngineConfig;

/// What the KV cache is sized for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KvCacheSize {
    /// A memory budget (`serve`'s `kv_cache_memory`; `None`: the device's default),
    /// holding no more blocks than `max_num_seqs` sequences of the longest length can use,
    /// and refused when it cannot hold one such sequence.
    Memory {
        budget: Option<KvCacheMemory>,
        max_num_seqs: usize,
    },
    /// Room for `count` sequences of `tokens` tokens each, and `spare_blocks` more.
    Sequences {
        count: usize,
        tokens: usize,
        spare_blocks: usize,
    },
    /// Exactly this many blocks.
    Blocks(usize),
}

/// The KV cache an engine and its runner share: only [`KvCacheSize::layout`] makes one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCacheLayout {
    num_blocks: usize,
    block_size: usize,
    bytes_per_block: usize,
}

impl KvCacheLayout {
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Device memory the cache takes.
    pub fn bytes(&self) -> usize {
        self.num_blocks * self.bytes_per_block
    }

    /// The engine's configuration (defaults for everything but the cache and
    /// `max_model_len`) and the runner holding the cache, both of this one size.
    pub fn parts(
        &self,
        loaded: &LoadedModel,
        max_model_len: usize,
    ) -> anyhow::Result<(EngineConfig, CandleRunner)> {
        let config = EngineConfig::new(self.num_blocks, self.block_size, max_model_len);
        let runner = CandleRunner::new(loaded.model.clone(), self.num_blocks, self.block_size)
            .context("allocating the KV cache")?;
        Ok((config, runner))
    }
}

impl KvCacheSize {
    /// The blocks of `block_size` tokens this size means for a model of `llm` in `dtype` on
    /// `device`, whose sequences hold at most `max_model_len` tokens.
    pub fn layout(
        &self,
        llm: &LlmConfig,
        device: &Device,
        dtype: DType,
        block_size: usize,
        max_model_len: usize,
    ) -> anyhow::Result<KvCacheLayout> {
        let bytes_per_block = PagedKvCache::bytes_per_block(llm, block_size, dtype);
        let num_blocks = match *self {
            KvCacheSize::Memory {
                budget,
                max_num_seqs,
            } => {
                // Saturating: both are settings, and any product past usize::MAX caps nothing.
                let useful = max_num_seqs.saturating_mul(max_model_len.div_ceil(block_size));
                let kv_bytes = match budget {
                    Some(KvCacheMemory::Bytes(bytes)) => bytes,
                    Some(KvCacheMemory::Fraction(fraction)) => {
                        (available_memory(device)? as f64 * fraction) as u64
                    }
                    None if device.is_cpu() => defaults::KV_CACHE_MEMORY.cpu.0 as u64,
                    None => defaults::KV_CACHE_MEMORY.cuda.0 as u64,
                };
                let num_blocks = ((kv_bytes / bytes_per_block as u64) as usize).min(useful);
                if num_blocks < max_model_len.div_ceil(block_size) {
                    bail!(
                        "kv_cache_memory ({kv_bytes} bytes) holds {num_blocks} blocks of \
                         {block_size} tokens, less than one sequence of max_model_len \
                         {max_model_len}: raise kv_cache_memory or lower max_model_len"
                    );
                }
                num_blocks
            }
            KvCacheSize::Sequences {
                count,
                tokens,
                spare_blocks,
            } => count
                .checked_mul(tokens.div_ceil(block_size))
                .and_then(|blocks| blocks.checked_add(spare_blocks))
                .with_context(|| {
                    format!("a KV cache for {count} sequences of {tokens} tokens is too large")
                })?,
            KvCacheSize::Blocks(num_blocks) => num_blocks,
        };
        Ok(KvCacheLayout {
            num_blocks,
            block_size,
            bytes_per_block,
        })
    }
}

/// Memory the KV cache could take now (the weights already loaded): the GPU's free memory on
/// CUDA, the system's available memory on CPU.
fn available_memory(device: &Device) -> anyhow::Result<u64> {
    if !device.is_cpu() {
        let (free, _total) = crate::device::memory_info(device).context(
            "could not read the device's free memory for kv_cache_memory as a fraction: give \
             bytes, e.g. 30GiB",
        )?;
        return Ok(free as u64);
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .context("no MemAvailable in /proc/meminfo")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::demo_model_dir;
    use internvl_model::config::InternVlConfig;

    fn layout(size: KvCacheSize, max_model_len: usize) -> anyhow::Result<KvCacheLayout> {
        let config = InternVlConfig::from_dir(&demo_model_dir()).unwrap();
        size.layout(&config.llm, &Device::Cpu, DType::F32, 16, max_model_len)
    }

    #[test]
    fn sequences_get_whole_blocks_each() {
        let size = KvCacheSize::Sequences {
            count: 3,
            tokens: 33,
            spare_blocks: 1,
        };
        assert_eq!(layout(size, 1024).unwrap().num_blocks(), 3 * 3 + 1);
        assert_eq!(
            layout(KvCacheSize::Blocks(7), 1024).unwrap().num_blocks(),
            7
        );
        let huge = KvCacheSize::Sequences {
            count: usize::MAX,
            tokens: 1024,
            spare_blocks: 0,
        };
        assert!(layout(huge, 1024).is_err());
    }

    #[test]
    fn a_budget_is_capped_by_the_sequences_and_must_hold_one() {
        let size = |bytes, max_num_seqs| KvCacheSize::Memory {
            budget: Some(KvCacheMemory::Bytes(bytes)),
            max_num_seqs,
        };
        let roomy = layout(size(1 << 30, 2), 1024).unwrap();
        assert_eq!(roomy.num_blocks(), 2 * 64);
        let error = layout(size(1, 2), 1024).unwrap_err().to_string();
        assert!(error.contains("less than one sequence"), "{error}");
    }
}
