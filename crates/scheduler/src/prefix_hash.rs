//! Identity of a full KV block: its tokens, the images behind its placeholders, and (through
//! the parent's hash) everything before it.
//!
//! Image placeholders are all the same token id, so without the images' content hashes two
//! prompts with the same text and different images would share blocks.

use crate::block_pool::BlockHash;
use std::hash::{DefaultHasher, Hash, Hasher};

/// An image's part in a block: its content hash and the first of its rows the block holds.
pub type ImagePart = (u64, usize);

/// The chained hash of one full block.
pub fn block_hash(parent: Option<BlockHash>, tokens: &[u32], images: &[ImagePart]) -> BlockHash {
    // DefaultHasher::new() has fixed keys: hashes are stable for the life of the process.
    let mut hasher = DefaultHasher::new();
    parent.hash(&mut hasher);
    tokens.hash(&mut hasher);
    images.hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_and_parents_change_the_hash() {
        let tokens = [5, 5, 5, 5];
        let plain = block_hash(None, &tokens, &[]);
        assert_eq!(plain, block_hash(None, &tokens, &[]));
        assert_ne!(plain, block_hash(None, &tokens, &[(1, 0)]));
        assert_ne!(
            block_hash(None, &tokens, &[(1, 0)]),
            block_hash(None, &tokens, &[(2, 0)])
        );
        assert_ne!(
            block_hash(None, &tokens, &[(1, 0)]),
            block_hash(None, &tokens, &[(1, 4)])
        );
        assert_ne!(plain, block_hash(Some(plain), &tokens, &[]));
    }
}
