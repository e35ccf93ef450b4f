//! Names of cached content that a client cannot forge: SHA-256 digests.
//!
//! The prefix cache hands a block's keys and values, and the encoder cache an image's
//! features, to any request whose key matches, without comparing contents. A 64-bit
//! non-cryptographic hash lets a client find or craft a collision and read another user's
//! cache, so every cache key is a 32-byte SHA-256 digest, a type no `u64` converts into.

use sha2::{Digest, Sha256};

/// The SHA-256 digest of some content (an image file's bytes).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContentHash([u8; 32]);

impl ContentHash {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        ContentHash(Sha256::digest(bytes).into())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl From<[u8; 32]> for ContentHash {
    fn from(digest: [u8; 32]) -> Self {
        ContentHash(digest)
    }
}

/// Hex, as `sha256sum` prints it.
impl std::fmt::Debug for ContentHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_the_sha256_of_the_bytes() {
        // FIPS 180-2's test vector for "abc".
        assert_eq!(
            format!("{:?}", ContentHash::of(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(std::mem::size_of::<ContentHash>(), 32);
        assert_ne!(ContentHash::of(b"a"), ContentHash::of(b"b"));
    }
}
