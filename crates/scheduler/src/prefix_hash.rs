//! Identity of a full KV block: its tokens, the images behind its placeholders, and (through
//! the parent's hash) everything before it.
//!
//! Image placeholders are all the same token id, so without the images' content hashes two
//! prompts with the same text and different images would share blocks.
//!
//! The identity is a SHA-256 digest of an unambiguous encoding: a domain tag, the parent's
//! digest (or a marker for the first block), the token count and every token as 4 bytes
//! little-endian, the image count and each image's 32-byte content hash and first row as
//! 8 bytes little-endian. Fixed widths and counts mean no two different blocks encode alike,
//! and SHA-256 means no client can find two encodings with the same digest.

use crate::content_hash::ContentHash;
use sha2::{Digest, Sha256};

/// An image's part in a block: its content hash and the first of its rows the block holds.
pub type ImagePart = (ContentHash, usize);

/// The chained digest of one full block and everything before it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockHash([u8; 32]);

impl std::fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlockHash(")?;
        self.0[..8].iter().try_for_each(|b| write!(f, "{b:02x}"))?;
        write!(f, "…)")
    }
}

/// Separates these digests from any other SHA-256 use, and this encoding from later ones.
const DOMAIN: &[u8] = b"internvl/kv-block/v1\0";

/// The chained hash of one full block.
pub fn block_hash(parent: Option<BlockHash>, tokens: &[u32], images: &[ImagePart]) -> BlockHash {
    let mut hasher = Sha256::new();
    hasher.update(DOMAIN);
    match parent {
        None => hasher.update([0u8]),
        Some(BlockHash(digest)) => {
            hasher.update([1u8]);
            hasher.update(digest);
        }
    }
    hasher.update((tokens.len() as u64).to_le_bytes());
    for token in tokens {
        hasher.update(token.to_le_bytes());
    }
    hasher.update((images.len() as u64).to_le_bytes());
    for (content, first_row) in images {
        hasher.update(content.as_bytes());
        hasher.update((*first_row as u64).to_le_bytes());
    }
    BlockHash(hasher.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(seed: u8) -> ContentHash {
        ContentHash::of(&[seed])
    }

    #[test]
    fn images_and_parents_change_the_hash() {
        let tokens = [5, 5, 5, 5];
        let plain = block_hash(None, &tokens, &[]);
        assert_eq!(plain, block_hash(None, &tokens, &[]));
        assert_ne!(plain, block_hash(None, &tokens, &[(image(1), 0)]));
        assert_ne!(
            block_hash(None, &tokens, &[(image(1), 0)]),
            block_hash(None, &tokens, &[(image(2), 0)])
        );
        assert_ne!(
            block_hash(None, &tokens, &[(image(1), 0)]),
            block_hash(None, &tokens, &[(image(1), 4)])
        );
        assert_ne!(plain, block_hash(Some(plain), &tokens, &[]));
    }

    /// Inputs that a concatenation without counts or widths would serialize alike.
    #[test]
    fn token_and_image_boundaries_are_part_of_the_identity() {
        let a = image(1);
        // [1, 2] with no image vs [1] with an image: tokens cannot spill into images.
        assert_ne!(
            block_hash(None, &[1, 2], &[]),
            block_hash(None, &[1], &[(a, 2)])
        );
        assert_ne!(
            block_hash(None, &[1, 2], &[(a, 0)]),
            block_hash(None, &[1], &[(a, 0)])
        );
        // Token 0x0201 vs tokens 1 and 2 as bytes: every token is four bytes.
        assert_ne!(
            block_hash(None, &[0x0201], &[]),
            block_hash(None, &[1, 2], &[])
        );
        // The first block vs one whose parent digest starts with the marker byte.
        let parent = block_hash(None, &[], &[]);
        assert_ne!(
            block_hash(None, &[], &[]),
            block_hash(Some(parent), &[], &[])
        );
        // Two images vs one: the count is hashed.
        assert_ne!(
            block_hash(None, &[7], &[(a, 0), (a, 0)]),
            block_hash(None, &[7], &[(a, 0)])
        );
        assert_eq!(std::mem::size_of::<BlockHash>(), 32);
    }
}
