//! The in-memory index of one partition replica: key → value of type `V`
//! (at run time a `Location`: segment slot, offset, value length).
//!
//! Memory is the design constraint (target: at most 48 bytes of overhead per
//! key besides the key bytes). Entries are 14 bytes (a `u32` key reference and
//! a 10-byte packed `Location`) in a `hashbrown::HashTable` whose hash is xxh3
//! of the key, recomputed from the arena on resize rather than stored. Keys
//! live length-prefixed in an arena of chunks of at most 1 MiB; a key
//! reference is (chunk, offset). Chunks grow by half the arena's size (so at
//! most a third is slack), are sized exactly when the index is rebuilt from a
//! known set of keys (recovery), and no key moves until the arena is
//! compacted (when removed keys make up half of it).

use hashbrown::HashTable;
use xxhash_rust::xxh3::xxh3_64;

/// Where a live record is: the partition's segment slot, the record's byte
/// offset in the segment, and its value length (the record length follows).
/// Packed: the index holds one per key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(C, packed(2))]
pub struct Location {
    pub slot: u16,
    pub offset: u32,
    pub value_len: u32,
}

#[derive(Clone, Copy)]
#[repr(C, packed(2))]
struct Entry<V: Copy> {
    key_ref: u32,
    value: V,
}

const _: () = assert!(std::mem::size_of::<Location>() == 10);
const _: () = assert!(std::mem::size_of::<Entry<Location>>() == 14);

/// Most segments a partition can have at once (slots are u16).
pub const SEGMENT_SLOTS_MAX: usize = u16::MAX as usize + 1;

const CHUNK_OFFSET_BITS: u32 = 20;
const CHUNK_BYTES_MAX: usize = 1 << CHUNK_OFFSET_BITS;
const CHUNKS_MAX: usize = 1 << (32 - CHUNK_OFFSET_BITS);
const CHUNK_BYTES_MIN: usize = 256;
const LEN_PREFIX_BYTES: usize = 2;
const _: () = assert!(CHUNK_BYTES_MAX >= LEN_PREFIX_BYTES + super::format::KEY_BYTES_LIMIT);

/// Append-only storage for keys, addressed by (chunk << 20 | offset).
#[derive(Default)]
struct KeyArena {
    chunks: Vec<Vec<u8>>,
    /// Bytes still expected from a rebuild; sizes the next chunk exactly.
    planned_bytes: usize,
    used_bytes: usize,
    garbage_bytes: usize,
}

impl KeyArena {
    fn key(&self, key_ref: u32) -> &[u8] {
        let chunk = &self.chunks[(key_ref >> CHUNK_OFFSET_BITS) as usize];
        let off = (key_ref as usize) & (CHUNK_BYTES_MAX - 1);
        let len = usize::from(u16::from_le_bytes([chunk[off], chunk[off + 1]]));
        &chunk[off + LEN_PREFIX_BYTES..off + LEN_PREFIX_BYTES + len]
    }

    fn push(&mut self, key: &[u8]) -> u32 {
        let need = LEN_PREFIX_BYTES + key.len();
        let fits = self.chunks.last().is_some_and(|c| c.capacity() - c.len() >= need);
        if !fits {
            let planned = self.planned_bytes.min(CHUNK_BYTES_MAX);
            let grown = (self.allocated_bytes() / 2).clamp(CHUNK_BYTES_MIN, CHUNK_BYTES_MAX);
            let capacity = if planned > 0 { planned } else { grown }.max(need);
            assert!(self.chunks.len() < CHUNKS_MAX, "a partition's keys exceed the 4 GiB key arena");
            self.chunks.push(Vec::with_capacity(capacity));
        }
        let index = self.chunks.len() - 1;
        let chunk = &mut self.chunks[index];
        let off = chunk.len();
        chunk.extend_from_slice(&(key.len() as u16).to_le_bytes());
        chunk.extend_from_slice(key);
        self.used_bytes += need;
        self.planned_bytes = self.planned_bytes.saturating_sub(need);
        ((index as u32) << CHUNK_OFFSET_BITS) | off as u32
    }

    fn release(&mut self, key_len: usize) {
        self.garbage_bytes += LEN_PREFIX_BYTES + key_len;
    }

    fn allocated_bytes(&self) -> usize {
        self.chunks.iter().map(Vec::capacity).sum()
    }
}

/// Key → `V` map for one partition.
pub struct KeyIndex<V: Copy> {
    table: HashTable<Entry<V>>,
    arena: KeyArena,
    key_bytes: usize,
}

impl<V: Copy> Default for KeyIndex<V> {
    fn default() -> Self {
        Self { table: HashTable::new(), arena: KeyArena::default(), key_bytes: 0 }
    }
}

impl<V: Copy> KeyIndex<V> {
    /// An empty index sized for `keys` keys totalling `key_bytes` bytes.
    pub fn with_capacity(keys: usize, key_bytes: usize) -> Self {
        let arena = KeyArena { planned_bytes: key_bytes + keys * LEN_PREFIX_BYTES, ..KeyArena::default() };
        Self { table: HashTable::with_capacity(keys), arena, key_bytes: 0 }
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    pub fn get(&self, key: &[u8]) -> Option<V> {
        let arena = &self.arena;
        self.table.find(xxh3_64(key), |e| arena.key(e.key_ref) == key).map(|e| e.value)
    }

    /// Inserts or replaces; returns the previous value.
    pub fn insert(&mut self, key: &[u8], value: V) -> Option<V> {
        self.insert_hashed(xxh3_64(key), key, value)
    }

    /// `insert` for a caller that has the key's xxh3 hash already (the
    /// value cache is keyed by the same hash).
    pub fn insert_hashed(&mut self, hash: u64, key: &[u8], value: V) -> Option<V> {
        debug_assert_eq!(hash, xxh3_64(key));
        let arena = &self.arena;
        if let Some(entry) = self.table.find_mut(hash, |e| arena.key(e.key_ref) == key) {
            let previous = entry.value;
            entry.value = value;
            return Some(previous);
        }
        let key_ref = self.arena.push(key);
        self.key_bytes += key.len();
        let arena = &self.arena;
        self.table.insert_unique(hash, Entry { key_ref, value }, |e| xxh3_64(arena.key(e.key_ref)));
        None
    }

    /// Replaces the value only if it is still `expected` (compaction moving a
    /// record must not undo a newer write). Returns whether it replaced.
    pub fn replace_if(&mut self, key: &[u8], expected: V, value: V) -> bool
    where
        V: PartialEq,
    {
        let arena = &self.arena;
        match self.table.find_mut(xxh3_64(key), |e| arena.key(e.key_ref) == key) {
            Some(entry) if { entry.value } == expected => {
                entry.value = value;
                true
            }
            _ => false,
        }
    }

    pub fn remove(&mut self, key: &[u8]) -> Option<V> {
        let arena = &self.arena;
        let found = self.table.find_entry(xxh3_64(key), |e| arena.key(e.key_ref) == key).ok()?;
        let (entry, _) = found.remove();
        self.arena.release(key.len());
        self.key_bytes -= key.len();
        self.maybe_compact_arena();
        Some(entry.value)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&[u8], V)> {
        self.table.iter().map(|e| (self.arena.key(e.key_ref), e.value))
    }

    /// A copy with values mapped by `f` (entries where it returns None are
    /// dropped), table and arena sized exactly for what is kept.
    pub fn map_values<W: Copy>(&self, mut f: impl FnMut(V) -> Option<W>) -> KeyIndex<W> {
        let (mut keys, mut key_bytes) = (0, 0);
        for (key, v) in self.iter() {
            if f(v).is_some() {
                keys += 1;
                key_bytes += key.len();
            }
        }
        let mut out = KeyIndex::with_capacity(keys, key_bytes);
        for (key, v) in self.iter() {
            if let Some(w) = f(v) {
                out.insert(key, w);
            }
        }
        out
    }

    /// Heap bytes used by the table and the arena, minus the key bytes.
    pub fn overhead_bytes(&self) -> usize {
        let table = self.table.capacity().div_ceil(7) * 8 * (std::mem::size_of::<Entry<V>>() + 1);
        table + self.arena.allocated_bytes() - self.key_bytes
    }

    pub fn key_bytes(&self) -> usize {
        self.key_bytes
    }

    /// Rebuilds the arena when removed keys occupy more than half of it.
    fn maybe_compact_arena(&mut self) {
        let used = self.arena.used_bytes.max(1);
        if self.arena.garbage_bytes < 64 * 1024 || self.arena.garbage_bytes * 2 < used {
            return;
        }
        let live = used - self.arena.garbage_bytes;
        let mut arena = KeyArena { planned_bytes: live, ..KeyArena::default() };
        for entry in self.table.iter_mut() {
            entry.key_ref = arena.push(self.arena.key(entry.key_ref));
        }
        self.arena = arena;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[test]
    fn long_keys_get_a_chunk_of_their_own_size() {
        let mut index = KeyIndex::default();
        let long = vec![7u8; 60_000];
        index.insert(b"a", 1u32);
        index.insert(&long, 2);
        index.insert(b"b", 3);
        assert_eq!(index.get(&long), Some(2));
        assert_eq!(index.get(b"a"), Some(1));
        assert_eq!(index.get(b"b"), Some(3));
    }

    proptest! {
        #[test]
        fn behaves_like_a_hashmap(ops in proptest::collection::vec((0u8..3, 0u16..300, any::<u32>()), 1..3000)) {
            let mut index = KeyIndex::default();
            let mut model = HashMap::new();
            for (op, k, v) in ops {
                let key = format!("key-{k}").repeat(usize::from(k % 7) + 1).into_bytes();
                match op {
                    0 | 1 => prop_assert_eq!(index.insert(&key, v), model.insert(key.clone(), v)),
                    _ => prop_assert_eq!(index.remove(&key), model.remove(&key)),
                }
            }
            prop_assert_eq!(index.len(), model.len());
            for (k, v) in &model {
                prop_assert_eq!(index.get(k), Some(*v));
            }
            let keys: usize = model.keys().map(Vec::len).sum();
            prop_assert_eq!(index.key_bytes(), keys);
        }
    }

    #[test]
    fn arena_compaction_keeps_every_live_key() {
        let mut index = KeyIndex::default();
        for i in 0..50_000u32 {
            index.insert(format!("key-{i:08}").as_bytes(), i);
        }
        for i in (0..50_000u32).filter(|i| i % 4 != 0) {
            assert_eq!(index.remove(format!("key-{i:08}").as_bytes()), Some(i));
        }
        for i in 0..50_000u32 {
            let expected = (i % 4 == 0).then_some(i);
            assert_eq!(index.get(format!("key-{i:08}").as_bytes()), expected);
        }
        assert!(index.arena.garbage_bytes * 2 < index.arena.used_bytes);
    }

    #[test]
    fn a_rebuilt_index_wastes_no_arena_space() {
        let mut index = KeyIndex::default();
        for i in 0..100_000u32 {
            index.insert(format!("key-{i:012}").as_bytes(), i);
        }
        let rebuilt = index.map_values(Some);
        // Only the tail of each full chunk (less than one key) is unused.
        assert!(rebuilt.arena.allocated_bytes() - rebuilt.arena.used_bytes <= rebuilt.arena.chunks.len() * 32);
        // Overhead per key besides the key: the table (14 B entry + 1 control
        // byte per bucket) plus the 2-byte length prefix.
        let per_key = rebuilt.overhead_bytes() as f64 / rebuilt.len() as f64;
        assert!(per_key < 48.0, "{per_key}");
    }
}
