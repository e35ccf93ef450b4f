//! What every layer of one forward shares: the batch's positions, rotary tables and cache
//! slots, computed and checked once before the first layer (the attention backend's own plan
//! of the batch is made from these slots, in `attention`).

use super::rotary::Rotary;
use crate::kv_cache::{PagedKvCache, SequenceSlice};
use candle_core::{Result, Tensor};

/// Positions, cache slots and layout of one batch, shared by every layer.
pub(super) struct BatchPlan<'a> {
    pub(super) slices: &'a [SequenceSlice],
    /// Rotary cos and sin at every packed token's position.
    pub(super) rope: (Tensor, Tensor),
    /// Cache slot every packed token is written to, broadcast to [tokens, kv_heads, head_dim]
    /// as `scatter_set` wants it.
    pub(super) write_index: Tensor,
    /// Per sequence: cache slots of positions `0..start + len`, read by attention.
    pub(super) read_slots: Vec<Vec<u32>>,
}

/// The model's dimensions a plan is checked against and shaped by.
pub(super) struct PlanShape<'a> {
    pub(super) rotary: &'a Rotary,
    pub(super) max_positions: usize,
    pub(super) num_kv_heads: usize,
    pub(super) head_dim: usize,
}

impl<'a> BatchPlan<'a> {
    /// The plan of `slices` over `embeddings` [tokens, hidden]; fails where the slices do not
    /// cover the embeddings, a position passes the model's limit or a block lies past the
    /// cache.
    pub(super) fn new(
        embeddings: &Tensor,
        slices: &'a [SequenceSlice],
        cache: &PagedKvCache,
        shape: &PlanShape,
    ) -> Result<Self> {
        let (tokens, device) = (embeddings.dim(0)?, embeddings.device());
        let packed: usize = slices.iter().map(|s| s.len).sum();
        if packed != tokens || slices.iter().any(|s| s.len == 0) {
            candle_core::bail!("batch slices cover {packed} tokens, embeddings have {tokens}");
        }
        let total_slots = (cache.num_blocks() * cache.block_size()) as u32;
        let mut positions = Vec::with_capacity(tokens);
        let mut write_slots = Vec::with_capacity(tokens);
        let mut read_slots = Vec::with_capacity(slices.len());
        for slice in slices {
            let end = slice.start + slice.len;
            if end > shape.max_positions {
                candle_core::bail!(
                    "position {end} exceeds max_position_embeddings {}",
                    shape.max_positions
                );
            }
            let slots = slice.slots(end, cache.block_size())?;
            if slots.iter().any(|&s| s >= total_slots) {
                candle_core::bail!(
                    "block table refers to a block past the cache's {}",
                    cache.num_blocks()
                );
            }
            positions.extend(slice.start as u32..end as u32);
            write_slots.extend_from_slice(&slots[slice.start..]);
            read_slots.push(slots);
        }
        Ok(Self {
            slices,
            rope: shape.rotary.at(&Tensor::new(positions, device)?)?,
            write_index: Tensor::new(write_slots, device)?
                .reshape((tokens, 1, 1))?
                .broadcast_as((tokens, shape.num_kv_heads, shape.head_dim))?
                .contiguous()?,
            read_slots,
        })
    }
}
