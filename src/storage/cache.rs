//! The per-shard value cache: (partition, key) → the key's current value,
//! bounded by bytes, with quick_cache's S3-FIFO eviction.
//!
//! A hit answers a read without touching the partition's index: one probe
//! of the cache's table, its slab entry, and one allocation holding the key
//! (compared, since the table is keyed by a 64-bit hash of the key) and the
//! value next to each other. On this machine a read through the index and a
//! location-keyed cache took about seven dependent cache misses; this takes
//! four.
//!
//! Coherence rule: the cache never holds a value the index does not point
//! at. Every index change that changes a key's value updates or drops the
//! key's entry in the same synchronous step (`segment.rs`, appends); a
//! compaction move keeps the value and so the entry; a read that filled
//! from the disk inserts only if the index still points where it read
//! (`store.rs`). Two keys of one partition with equal hashes share a slot:
//! the key compare turns the other's entry into a miss, and an insert
//! simply replaces it.

use std::fmt;
use std::ops::Deref;
use std::rc::Rc;

use xxhash_rust::xxh3::xxh3_64;

/// A value read from the store: the key and value in one shared
/// allocation; dereferences to the value bytes. Cloning is a
/// reference-count increment.
#[derive(Clone)]
pub struct Value {
    record: Rc<[u8]>,
    key_len: u16,
}

impl Value {
    /// A value for `key` (copies both into one allocation).
    pub fn new(key: &[u8], value: &[u8]) -> Self {
        let key_len = u16::try_from(key.len()).expect("keys are at most 64 KiB");
        let mut record = Vec::with_capacity(key.len() + value.len());
        record.extend_from_slice(key);
        record.extend_from_slice(value);
        Self { record: Rc::from(record), key_len }
    }

    /// The key this value was made for.
    pub fn key(&self) -> &[u8] {
        &self.record[..usize::from(self.key_len)]
    }

    /// Bytes of memory this value holds, for the cache's budget: a fixed
    /// overhead keeps empty values from being free.
    fn weight(&self) -> u64 {
        self.record.len() as u64 + 64
    }
}

impl Deref for Value {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.record[usize::from(self.key_len)..]
    }
}

impl AsRef<[u8]> for Value {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl fmt::Debug for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Value").field("len", &self.len()).finish()
    }
}

impl PartialEq<[u8]> for Value {
    fn eq(&self, other: &[u8]) -> bool {
        **self == *other
    }
}

struct Weighter;

impl quick_cache::Weighter<(u32, u64), Value> for Weighter {
    fn weight(&self, _key: &(u32, u64), value: &Value) -> u64 {
        value.weight()
    }
}

/// The hash the cache is keyed by (with the partition).
pub fn key_hash(key: &[u8]) -> u64 {
    xxh3_64(key)
}

pub struct ValueCache {
    entries: quick_cache::unsync::Cache<(u32, u64), Value, Weighter>,
}

impl ValueCache {
    /// A cache of at most `capacity_bytes` (keys, values and a fixed
    /// overhead per entry); `expected_entry_bytes` sizes its table.
    pub fn new(capacity_bytes: u64, expected_entry_bytes: u64) -> Self {
        let capacity_bytes = capacity_bytes.max(1);
        let items = (capacity_bytes / expected_entry_bytes.max(1)).clamp(16, 1 << 24) as usize;
        Self { entries: quick_cache::unsync::Cache::with_weighter(items, capacity_bytes, Weighter) }
    }

    /// The cached value of `key`, whose `key_hash` is `hash`.
    pub fn get(&self, partition: u32, hash: u64, key: &[u8]) -> Option<Value> {
        self.entries.get(&(partition, hash)).filter(|v| v.key() == key).cloned()
    }

    /// Caches `value` as `key`'s current value.
    pub fn insert(&mut self, partition: u32, hash: u64, key: &[u8], value: &[u8]) {
        self.insert_value(partition, hash, Value::new(key, value));
    }

    /// Caches a `Value` made for its key.
    pub fn insert_value(&mut self, partition: u32, hash: u64, value: Value) {
        debug_assert_eq!(key_hash(value.key()), hash);
        self.entries.insert((partition, hash), value);
    }

    /// Forgets `key`'s value (and any other key's sharing its slot).
    pub fn invalidate(&mut self, partition: u32, hash: u64) {
        self.entries.remove(&(partition, hash));
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes held, by the cache's own weighing.
    pub fn weight(&self) -> u64 {
        self.entries.weight()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hit_needs_the_same_partition_and_key() {
        let mut cache = ValueCache::new(1 << 20, 128);
        let hash = key_hash(b"k");
        cache.insert(3, hash, b"k", b"v1");
        assert_eq!(cache.get(3, hash, b"k").as_deref(), Some(&b"v1"[..]));
        assert!(cache.get(4, hash, b"k").is_none());
        cache.insert(3, hash, b"k", b"v2");
        assert_eq!(cache.get(3, hash, b"k").as_deref(), Some(&b"v2"[..]));
        cache.invalidate(3, hash);
        assert!(cache.get(3, hash, b"k").is_none());
    }

    #[test]
    fn a_colliding_key_is_a_miss_not_a_wrong_value() {
        let mut cache = ValueCache::new(1 << 20, 128);
        // Forge a collision: "other" stored under "k"'s hash.
        let hash = key_hash(b"k");
        cache.entries.insert((0, hash), Value::new(b"other", b"x"));
        assert!(cache.get(0, hash, b"k").is_none());
        cache.insert(0, hash, b"k", b"v");
        assert_eq!(cache.get(0, hash, b"k").as_deref(), Some(&b"v"[..]));
        assert!(cache.get(0, hash, b"other").is_none());
    }

    #[test]
    fn the_cache_stays_within_its_byte_budget() {
        let mut cache = ValueCache::new(64 << 10, 128);
        for i in 0..10_000u32 {
            let key = i.to_le_bytes();
            cache.insert(0, key_hash(&key), &key, &[7; 100]);
        }
        assert!(cache.weight() <= 64 << 10, "weight {}", cache.weight());
        assert!(!cache.is_empty());
    }
}
