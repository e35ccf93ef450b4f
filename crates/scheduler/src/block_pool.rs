//! The pool of KV-cache blocks, and the handle that returns a block to it when dropped.
//!
//! A block is owned through [`Block`] handles only: a sequence's block table is a `Vec<Block>`,
//! so finishing, cancelling or preempting a sequence frees its blocks by dropping the table,
//! and no code path can forget to. Blocks that hold a full, hashed prefix stay findable after
//! their last owner goes, until the pool needs them back (least recently freed first).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

/// Index of a block in the KV cache's storage.
pub type BlockId = u32;

pub use crate::prefix_hash::BlockHash;

/// A shared pool of `num_blocks` blocks of `block_size` tokens.
#[derive(Clone)]
pub struct BlockPool {
    inner: Arc<Mutex<PoolState>>,
}

struct PoolState {
    ref_counts: Vec<u32>,
    /// Unowned blocks by the time they were freed: the first is evicted first.
    free: BTreeMap<u64, BlockId>,
    /// Key of each unowned block in `free`.
    free_key: Vec<Option<u64>>,
    next_key: u64,
    hash_of: Vec<Option<BlockHash>>,
    cached: HashMap<BlockHash, BlockId>,
}

/// Shared ownership of one block; the block goes back to the pool when the last is dropped.
pub struct Block {
    id: BlockId,
    pool: Arc<Mutex<PoolState>>,
}

impl BlockPool {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        assert!(block_size > 0, "blocks hold at least one token");
        let mut state = PoolState {
            ref_counts: vec![0; num_blocks],
            free: BTreeMap::new(),
            free_key: vec![None; num_blocks],
            next_key: 0,
            hash_of: vec![None; num_blocks],
            cached: HashMap::new(),
        };
        for id in 0..num_blocks as BlockId {
            state.push_free(id);
        }
        Self {
            inner: Arc::new(Mutex::new(state)),
        }
    }

    fn state(&self) -> MutexGuard<'_, PoolState> {
        lock(&self.inner)
    }

    /// Blocks no sequence owns (cached prefixes included: they can be evicted).
    pub fn num_free(&self) -> usize {
        self.state().free.len()
    }

    /// Takes `n` blocks, evicting cached prefixes as needed; all or nothing.
    pub fn allocate(&self, n: usize) -> Option<Vec<Block>> {
        let mut state = self.state();
        if state.free.len() < n {
            return None;
        }
        let blocks = (0..n)
            .map(|_| {
                let (_, id) = state.free.pop_first().expect("counted above");
                state.free_key[id as usize] = None;
                if let Some(hash) = state.hash_of[id as usize].take() {
                    if state.cached.get(&hash) == Some(&id) {
                        state.cached.remove(&hash);
                    }
                }
                state.ref_counts[id as usize] = 1;
                Block {
                    id,
                    pool: self.inner.clone(),
                }
            })
            .collect();
        Some(blocks)
    }

    /// The cached block holding exactly `hash`, if any, now also owned by the caller.
    pub fn lookup(&self, hash: BlockHash) -> Option<Block> {
        let mut state = self.state();
        let id = *state.cached.get(&hash)?;
        if let Some(key) = state.free_key[id as usize].take() {
            state.free.remove(&key);
        }
        state.ref_counts[id as usize] += 1;
        Some(Block {
            id,
            pool: self.inner.clone(),
        })
    }

    /// Records that `block` is full and holds the prefix identified by `hash`.
    pub fn register(&self, block: &Block, hash: BlockHash) {
        let mut state = self.state();
        state.hash_of[block.id as usize] = Some(hash);
        state.cached.entry(hash).or_insert(block.id);
    }
}

impl PoolState {
    fn push_free(&mut self, id: BlockId) {
        let key = self.next_key;
        self.next_key += 1;
        self.free.insert(key, id);
        self.free_key[id as usize] = Some(key);
    }
}

fn lock(state: &Mutex<PoolState>) -> MutexGuard<'_, PoolState> {
    // A panic while holding the lock leaves counts consistent (every update is one step).
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl Block {
    pub fn id(&self) -> BlockId {
        self.id
    }
}

impl Clone for Block {
    fn clone(&self) -> Self {
        lock(&self.pool).ref_counts[self.id as usize] += 1;
        Block {
            id: self.id,
            pool: self.pool.clone(),
        }
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        let mut state = lock(&self.pool);
        let count = &mut state.ref_counts[self.id as usize];
        *count -= 1;
        if *count == 0 {
            state.push_free(self.id);
        }
    }
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Block({})", self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prefix_hash::block_hash;

    fn hash(i: u32) -> BlockHash {
        block_hash(None, &[i], &[])
    }

    #[test]
    fn dropping_returns_blocks() {
        let pool = BlockPool::new(4, 16);
        let blocks = pool.allocate(3).unwrap();
        assert_eq!(pool.num_free(), 1);
        assert!(pool.allocate(2).is_none(), "all or nothing");
        assert_eq!(pool.num_free(), 1);
        let shared = blocks[0].clone();
        drop(blocks);
        assert_eq!(pool.num_free(), 3, "a shared block stays owned");
        drop(shared);
        assert_eq!(pool.num_free(), 4);
    }

    #[test]
    fn cached_blocks_survive_until_evicted() {
        let pool = BlockPool::new(2, 4);
        let block = pool.allocate(1).unwrap().pop().unwrap();
        let id = block.id();
        pool.register(&block, hash(42));
        drop(block);
        assert_eq!(pool.num_free(), 2);
        let hit = pool.lookup(hash(42)).expect("cached after its owner left");
        assert_eq!(hit.id(), id);
        assert_eq!(
            pool.num_free(),
            1,
            "a hit takes the block out of the free list"
        );
        drop(hit);
        // Two allocations need both blocks: the cached one is evicted.
        let all = pool.allocate(2).unwrap();
        assert!(pool.lookup(hash(42)).is_none());
        drop(all);
    }

    #[test]
    fn least_recently_freed_is_evicted_first() {
        let pool = BlockPool::new(3, 4);
        let mut blocks = pool.allocate(3).unwrap();
        for (i, b) in blocks.iter().enumerate() {
            pool.register(b, hash(i as u32));
        }
        let third = blocks.pop().unwrap();
        let second = blocks.pop().unwrap();
        let first = blocks.pop().unwrap();
        drop(second);
        drop(first);
        drop(third);
        let _taken = pool.allocate(1).unwrap();
        assert!(pool.lookup(hash(1)).is_none(), "freed first, evicted first");
        assert!(pool.lookup(hash(0)).is_some());
        assert!(pool.lookup(hash(2)).is_some());
    }
}
