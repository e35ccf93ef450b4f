//! The KV cache as the scheduler sees it: blocks for sequences, and the prefix cache.
//!
//! The manager owns the [`BlockPool`]; nothing else takes blocks from it. A sequence's blocks
//! are a [`SeqBlocks`], whose contents only the manager changes: it allocates them to cover
//! the tokens a step will compute, finds the leading full blocks of a new prompt in the prefix
//! cache, and registers full blocks once computed, under the chained, image-aware hashes of
//! `prefix_hash`. Dropping a `SeqBlocks` frees its blocks.

use crate::block_pool::{Block, BlockHash, BlockPool};
use crate::config::EngineConfig;
use crate::prefix_hash::{block_hash, ImagePart};
use crate::seq_image::SeqImage;

/// One sequence's blocks, in token order, with the hashes of its full blocks.
#[derive(Default)]
pub(crate) struct SeqBlocks {
    blocks: Vec<Block>,
    /// Chained hashes of the full blocks of the sequence's tokens, computed as needed; they
    /// depend on the tokens only, so they outlive the blocks.
    hashes: Vec<BlockHash>,
    /// Leading blocks already registered in the prefix cache.
    registered: usize,
}

impl SeqBlocks {
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    pub fn ids(&self) -> Vec<u32> {
        self.blocks.iter().map(|b| b.id()).collect()
    }

    /// Gives the blocks back to the pool (keeping the hashes).
    pub fn clear(&mut self) {
        self.blocks.clear();
        self.registered = 0;
    }
}

/// Blocks and the prefix cache, for the scheduler.
pub(crate) struct KvCacheManager {
    pool: BlockPool,
    block_size: usize,
    num_blocks: usize,
    prefix_caching: bool,
}

impl KvCacheManager {
    pub fn new(config: &EngineConfig) -> Self {
        Self {
            pool: BlockPool::new(config.num_blocks, config.block_size),
            block_size: config.block_size,
            num_blocks: config.num_blocks,
            prefix_caching: config.enable_prefix_caching,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks no sequence owns (cached prefixes included: they can be evicted).
    pub fn num_free(&self) -> usize {
        self.pool.num_free()
    }

    /// Blocks some sequence owns.
    pub fn num_used(&self) -> usize {
        self.num_blocks - self.pool.num_free()
    }

    /// Makes `blocks` cover `tokens` tokens, all or nothing; false when the pool is short.
    pub fn allocate(&self, blocks: &mut SeqBlocks, tokens: usize) -> bool {
        // A rounding-up division: cannot overflow.
        let need = tokens
            .div_ceil(self.block_size)
            .saturating_sub(blocks.len());
        match self.pool.allocate(need) {
            Some(new) => {
                blocks.blocks.extend(new);
                true
            }
            None => false,
        }
    }

    /// Fills the empty `blocks` of a sequence about to start with the cached blocks of its
    /// leading full blocks, up to the first miss, registered already. At least the last token
    /// stays to be run: its logits give the next token. Returns the tokens looked up.
    pub fn take_cached_prefix<P, E>(
        &self,
        blocks: &mut SeqBlocks,
        tokens: &[u32],
        images: &[SeqImage<P, E>],
    ) -> usize {
        if !self.prefix_caching {
            return 0;
        }
        let reusable = (tokens.len() - 1) / self.block_size;
        self.hash(blocks, reusable, tokens, images);
        for hash in &blocks.hashes[..reusable] {
            match self.pool.lookup(*hash) {
                Some(block) => blocks.blocks.push(block),
                None => break,
            }
        }
        blocks.registered = blocks.blocks.len();
        reusable * self.block_size
    }

    /// Registers in the prefix cache the full blocks among the first `computed` tokens not
    /// registered yet. Only computed blocks are: a failed forward's are never found.
    pub fn register_full<P, E>(
        &self,
        blocks: &mut SeqBlocks,
        computed: usize,
        tokens: &[u32],
        images: &[SeqImage<P, E>],
    ) {
        if !self.prefix_caching {
            return;
        }
        let full = computed / self.block_size;
        self.hash(blocks, full, tokens, images);
        for k in blocks.registered..full {
            self.pool.register(&blocks.blocks[k], blocks.hashes[k]);
        }
        blocks.registered = full;
    }

    /// The first `shared` of `blocks`, shared (for the other completions of a prompt).
    pub fn share(&self, blocks: &SeqBlocks, shared: usize) -> SeqBlocks {
        let mut hashes = blocks.hashes.clone();
        hashes.truncate(shared);
        SeqBlocks {
            blocks: blocks.blocks[..shared].to_vec(),
            hashes,
            registered: shared.min(blocks.registered),
        }
    }

    /// Extends the hashes of `blocks` to cover the first `full_blocks` blocks of `tokens`.
    fn hash<P, E>(
        &self,
        blocks: &mut SeqBlocks,
        full_blocks: usize,
        tokens: &[u32],
        images: &[SeqImage<P, E>],
    ) {
        while blocks.hashes.len() < full_blocks {
            let b = blocks.hashes.len();
            let span = b * self.block_size..(b + 1) * self.block_size;
            let parts: Vec<ImagePart> = images
                .iter()
                .filter_map(|img| Some((img.content_hash(), img.rows_in(&span)?.start)))
                .collect();
            let parent = blocks.hashes.last().copied();
            blocks
                .hashes
                .push(block_hash(parent, &tokens[span], &parts));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::content_hash::ContentHash;
    use crate::request::ImageInput;
    use std::sync::Arc;

    const NO_IMAGES: &[SeqImage<(), ()>] = &[];

    fn manager(enable_prefix_caching: bool) -> KvCacheManager {
        let mut config = EngineConfig::new(8, 4, 64);
        config.enable_prefix_caching = enable_prefix_caching;
        KvCacheManager::new(&config)
    }

    /// An image behind the placeholders at 2..6: rows 0..2 in block 0, 2..4 in block 1.
    fn image(seed: u8) -> SeqImage<(), ()> {
        SeqImage::new(ImageInput {
            offset: 2,
            num_tokens: 4,
            content_hash: ContentHash::of(&[seed]),
            pixels: Arc::new(()),
        })
    }

    #[test]
    fn computed_full_blocks_serve_later_prompts_but_never_their_last_token() {
        let kv = manager(true);
        let tokens: Vec<u32> = (0..10).collect();
        let mut first = SeqBlocks::default();
        assert!(kv.allocate(&mut first, 10));
        assert_eq!((first.len(), kv.num_used()), (3, 3));
        kv.register_full(&mut first, 10, &tokens, NO_IMAGES);
        drop(first);
        assert_eq!(kv.num_used(), 0);

        let mut longer = SeqBlocks::default();
        assert_eq!(
            kv.take_cached_prefix(&mut longer, &tokens[..9], NO_IMAGES),
            8
        );
        assert_eq!(longer.len(), 2);
        // Eight tokens are two full blocks, but the last token must run: one block found.
        let mut exact = SeqBlocks::default();
        assert_eq!(
            kv.take_cached_prefix(&mut exact, &tokens[..8], NO_IMAGES),
            4
        );
        assert_eq!(exact.len(), 1);

        let off = manager(false);
        let mut blocks = SeqBlocks::default();
        assert!(off.allocate(&mut blocks, 10));
        off.register_full(&mut blocks, 10, &tokens, NO_IMAGES);
        drop(blocks);
        let mut again = SeqBlocks::default();
        assert_eq!(off.take_cached_prefix(&mut again, &tokens, NO_IMAGES), 0);
        assert!(again.is_empty());
    }

    #[test]
    fn another_image_behind_the_same_placeholders_is_a_miss() {
        let kv = manager(true);
        let tokens = vec![7u32; 9];
        let mut first = SeqBlocks::default();
        assert!(kv.allocate(&mut first, 9));
        kv.register_full(&mut first, 9, &tokens, &[image(1)]);
        let mut same = SeqBlocks::default();
        kv.take_cached_prefix(&mut same, &tokens, &[image(1)]);
        assert_eq!(same.ids(), first.ids()[..2]);
        let mut other = SeqBlocks::default();
        kv.take_cached_prefix(&mut other, &tokens, &[image(2)]);
        assert!(other.is_empty());
    }
}
