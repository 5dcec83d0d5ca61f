//! The in-memory index of one partition replica: key → value of type `V`
//! (at run time a `Location`: segment slot, offset, value length).
//!
//! Memory is the design constraint (target: at most 48 bytes of overhead per
//! key besides the key bytes). Entries are 16 bytes (`u32` key reference and a
//! 12-byte `Location`) in a `hashbrown::HashTable` whose hash is xxh3 of the
//! key, recomputed from the arena on resize rather than stored. Keys live
//! length-prefixed in an arena of chunks that grow from 256 bytes to 1 MiB, so
//! small partitions do not pay for a large chunk and no key is ever moved
//! until the arena is compacted (when removed keys make up half of it).

use hashbrown::HashTable;
use xxhash_rust::xxh3::xxh3_64;

/// Where a live record is: the partition's segment slot, the record's byte
/// offset in the segment, and its value length (the record length follows).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Location {
    pub slot: u32,
    pub offset: u32,
    pub value_len: u32,
}

#[derive(Clone, Copy)]
struct Entry<V> {
    key_ref: u32,
    value: V,
}

const _: () = assert!(std::mem::size_of::<Entry<Location>>() == 16);

const FIRST_CHUNK_BYTES: usize = 256;
const DOUBLING_CHUNKS: u32 = 13; // 256 B .. 1 MiB
const MAX_CHUNK_BYTES: usize = FIRST_CHUNK_BYTES << (DOUBLING_CHUNKS - 1);
/// Total bytes covered by the doubling chunks.
const DOUBLING_SPAN: u64 = (FIRST_CHUNK_BYTES as u64) * ((1u64 << DOUBLING_CHUNKS) - 1);
const LEN_PREFIX_BYTES: usize = 2;
const _: () = assert!(MAX_CHUNK_BYTES == 1 << 20);
const _: () = assert!(MAX_CHUNK_BYTES >= LEN_PREFIX_BYTES + super::format::KEY_BYTES_LIMIT);

/// Start of chunk `c` in the arena's global byte space.
fn chunk_start(c: u32) -> u64 {
    if c < DOUBLING_CHUNKS {
        (FIRST_CHUNK_BYTES as u64) * ((1u64 << c) - 1)
    } else {
        DOUBLING_SPAN + u64::from(c - DOUBLING_CHUNKS) * MAX_CHUNK_BYTES as u64
    }
}

fn chunk_bytes(c: u32) -> usize {
    FIRST_CHUNK_BYTES << c.min(DOUBLING_CHUNKS - 1)
}

/// Chunk and offset inside it of a global arena position.
fn locate(pos: u64) -> (u32, usize) {
    if pos < DOUBLING_SPAN {
        let c = 63 - (pos / FIRST_CHUNK_BYTES as u64 + 1).leading_zeros();
        (c, (pos - chunk_start(c)) as usize)
    } else {
        let rel = pos - DOUBLING_SPAN;
        (DOUBLING_CHUNKS + (rel / MAX_CHUNK_BYTES as u64) as u32, (rel % MAX_CHUNK_BYTES as u64) as usize)
    }
}

/// Append-only storage for keys, addressed by a u32 position.
#[derive(Default)]
struct KeyArena {
    chunks: Vec<Vec<u8>>,
    /// Global position of the next free byte.
    end: u64,
    garbage_bytes: usize,
}

impl KeyArena {
    fn key(&self, key_ref: u32) -> &[u8] {
        let (c, off) = locate(u64::from(key_ref));
        let chunk = &self.chunks[c as usize];
        let len = usize::from(u16::from_le_bytes([chunk[off], chunk[off + 1]]));
        &chunk[off + LEN_PREFIX_BYTES..off + LEN_PREFIX_BYTES + len]
    }

    fn push(&mut self, key: &[u8]) -> u32 {
        let need = LEN_PREFIX_BYTES + key.len();
        let (mut c, mut off) = locate(self.end);
        while off + need > chunk_bytes(c) {
            // Keys never straddle chunks; the rest of this one is left unused.
            c += 1;
            off = 0;
        }
        while self.chunks.len() <= c as usize {
            self.chunks.push(Vec::new());
        }
        let chunk = &mut self.chunks[c as usize];
        if chunk.capacity() == 0 {
            chunk.reserve_exact(chunk_bytes(c));
        }
        debug_assert_eq!(chunk.len(), off);
        chunk.extend_from_slice(&(key.len() as u16).to_le_bytes());
        chunk.extend_from_slice(key);
        let pos = chunk_start(c) + off as u64;
        self.end = pos + need as u64;
        u32::try_from(pos).expect("a partition's keys exceed the 4 GiB key arena")
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
    pub fn with_capacity(keys: usize) -> Self {
        Self { table: HashTable::with_capacity(keys), ..Self::default() }
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
        let hash = xxh3_64(key);
        let arena = &self.arena;
        if let Some(entry) = self.table.find_mut(hash, |e| arena.key(e.key_ref) == key) {
            return Some(std::mem::replace(&mut entry.value, value));
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
            Some(entry) if entry.value == expected => {
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

    /// Keeps only entries for which `keep` returns true.
    pub fn retain(&mut self, mut keep: impl FnMut(&[u8], &mut V) -> bool) {
        let arena = &mut self.arena;
        let mut released = 0usize;
        self.table.retain(|e| {
            let key = arena.key(e.key_ref);
            let kept = keep(key, &mut e.value);
            if !kept {
                released += key.len();
                arena.garbage_bytes += LEN_PREFIX_BYTES + key.len();
            }
            kept
        });
        self.key_bytes -= released;
        self.maybe_compact_arena();
    }

    /// A copy with values mapped by `f` (entries where it returns None are
    /// dropped), keys copied into a fresh, compact arena.
    pub fn map_values<W: Copy>(&self, mut f: impl FnMut(V) -> Option<W>) -> KeyIndex<W> {
        let mut out = KeyIndex::with_capacity(self.len());
        for (key, v) in self.iter() {
            if let Some(w) = f(v) {
                out.insert(key, w);
            }
        }
        out
    }

    /// Heap bytes used by the table and the arena, minus the key bytes.
    pub fn overhead_bytes(&self) -> usize {
        let table = self.table.capacity() * (std::mem::size_of::<Entry<V>>() + 1);
        table + self.arena.allocated_bytes() - self.key_bytes
    }

    pub fn key_bytes(&self) -> usize {
        self.key_bytes
    }

    /// Rebuilds the arena when removed keys occupy more than half of it.
    fn maybe_compact_arena(&mut self) {
        let used = (self.arena.end as usize).max(1);
        if self.arena.garbage_bytes < 64 * 1024 || self.arena.garbage_bytes * 2 < used {
            return;
        }
        let mut arena = KeyArena::default();
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
    fn arena_positions_are_contiguous_across_chunk_kinds() {
        for c in 0..20 {
            assert_eq!(chunk_start(c) + chunk_bytes(c) as u64, chunk_start(c + 1));
            assert_eq!(locate(chunk_start(c)), (c, 0));
            assert_eq!(locate(chunk_start(c + 1) - 1), (c, chunk_bytes(c) - 1));
        }
    }

    #[test]
    fn long_keys_skip_small_chunks() {
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
        assert!(index.arena.garbage_bytes * 2 < index.arena.end as usize);
    }
}
