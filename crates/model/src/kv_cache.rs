//! Storage of the paged KV cache: per layer, one key and one value tensor of fixed-size blocks.
//!
//! The model owns the storage because its attention reads it; which blocks belong to which
//! sequence is decided outside (by the scheduler) and handed in as block tables.

use crate::config::LlmConfig;
use candle_core::{DType, Device, Result, Tensor};

/// Preallocated key/value blocks for every LLM layer.
///
/// Each layer's keys are a [num_blocks · block_size, kv_heads, head_dim] tensor: slot
/// `block · block_size + offset` holds one token.
pub struct PagedKvCache {
    block_size: usize,
    num_blocks: usize,
    layers: Vec<(Tensor, Tensor)>,
}

impl PagedKvCache {
    pub fn new(
        cfg: &LlmConfig,
        num_blocks: usize,
        block_size: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if block_size == 0 || num_blocks == 0 {
            candle_core::bail!("a KV cache needs at least one block of at least one token");
        }
        let shape = (
            num_blocks * block_size,
            cfg.num_key_value_heads,
            cfg.head_dim(),
        );
        let layers = (0..cfg.num_hidden_layers)
            .map(|_| {
                Ok((
                    Tensor::zeros(shape, dtype, device)?,
                    Tensor::zeros(shape, dtype, device)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            block_size,
            num_blocks,
            layers,
        })
    }

    /// Bytes one block takes across all layers, keys and values: what a memory budget buys.
    pub fn bytes_per_block(cfg: &LlmConfig, block_size: usize, dtype: DType) -> usize {
        2 * cfg.num_hidden_layers
            * block_size
            * cfg.num_key_value_heads
            * cfg.head_dim()
            * dtype.size_in_bytes()
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub(crate) fn layer(&self, i: usize) -> (&Tensor, &Tensor) {
        let (k, v) = &self.layers[i];
        (k, v)
    }
}

/// One sequence's share of a batched forward: `len` new tokens starting at `start`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequenceSlice {
    /// Position of the first new token; the cache already holds positions `0..start`.
    pub start: usize,
    pub len: usize,
    /// Cache blocks of this sequence in position order; must cover `start + len` tokens.
    pub block_table: Vec<u32>,
    /// Whether the logits of this slice's last token are wanted.
    pub wants_logits: bool,
}

impl SequenceSlice {
    /// Cache slot of every token position `0..end`.
    pub(crate) fn slots(&self, end: usize, block_size: usize) -> Result<Vec<u32>> {
        let needed = end.div_ceil(block_size);
        if self.block_table.len() < needed {
            candle_core::bail!(
                "block table has {} blocks, {end} tokens need {needed}",
                self.block_table.len()
            );
        }
        Ok((0..end)
            .map(|p| self.block_table[p / block_size] * block_size as u32 + (p % block_size) as u32)
            .collect())
    }
}
