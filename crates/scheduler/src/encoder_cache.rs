//! Encoder outputs by image content, so a repeated image skips the vision encoder.

use crate::content_hash::ContentHash;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// An LRU cache of encoder outputs bounded in bytes.
pub struct EncoderCache<E> {
    capacity: usize,
    used: usize,
    entries: HashMap<ContentHash, Entry<E>>,
    /// Last use → content hash; the first is evicted first.
    order: BTreeMap<u64, ContentHash>,
    clock: u64,
    pub queries: u64,
    pub hits: u64,
}

struct Entry<E> {
    value: Arc<E>,
    bytes: usize,
    last_use: u64,
}

impl<E> EncoderCache<E> {
    pub fn new(capacity_bytes: usize) -> Self {
        Self {
            capacity: capacity_bytes,
            used: 0,
            entries: HashMap::new(),
            order: BTreeMap::new(),
            clock: 0,
            queries: 0,
            hits: 0,
        }
    }

    /// Whether `hash` is cached, without counting a query or refreshing it.
    pub fn contains(&self, hash: ContentHash) -> bool {
        self.entries.contains_key(&hash)
    }

    pub fn get(&mut self, hash: ContentHash) -> Option<Arc<E>> {
        self.queries += 1;
        self.clock += 1;
        let entry = self.entries.get_mut(&hash)?;
        self.hits += 1;
        self.order.remove(&entry.last_use);
        entry.last_use = self.clock;
        self.order.insert(self.clock, hash);
        Some(entry.value.clone())
    }

    /// Keeps `value` unless it alone exceeds the capacity, evicting the least recently used.
    pub fn insert(&mut self, hash: ContentHash, value: Arc<E>, bytes: usize) {
        if bytes > self.capacity || self.entries.contains_key(&hash) {
            return;
        }
        while self.used + bytes > self.capacity {
            let Some((_, old)) = self.order.pop_first() else {
                break;
            };
            if let Some(entry) = self.entries.remove(&old) {
                self.used -= entry.bytes;
            }
        }
        self.clock += 1;
        self.order.insert(self.clock, hash);
        self.used += bytes;
        self.entries.insert(
            hash,
            Entry {
                value,
                bytes,
                last_use: self.clock,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u8) -> ContentHash {
        ContentHash::of(&[i])
    }

    #[test]
    fn evicts_least_recently_used_within_budget() {
        let mut cache = EncoderCache::new(10);
        cache.insert(key(1), Arc::new("a"), 4);
        cache.insert(key(2), Arc::new("b"), 4);
        assert!(cache.get(key(1)).is_some());
        cache.insert(key(3), Arc::new("c"), 4); // evicts 2, used less recently than 1
        assert!(cache.get(key(2)).is_none());
        assert!(cache.get(key(1)).is_some() && cache.get(key(3)).is_some());
        assert_eq!(cache.used, 8);
        cache.insert(key(4), Arc::new("too big"), 11);
        assert!(cache.get(key(4)).is_none());
        assert_eq!((cache.queries, cache.hits), (5, 3));
    }
}
