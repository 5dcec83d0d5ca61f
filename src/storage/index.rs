//! The in-memory index of one partition replica: key → value of type `V`
//! (at run time a `Location`: segment slot, offset, value length).
//!
//! Memory is the design constraint (target: at most 48 bytes of overhead per
//! key besides the key bytes), and so are cache misses: an index update is
//! on every write's path. The table is open-addressed with linear probing
//! and holds 16-byte slots (for a `Location`):
//!
//! ```text
//! slot: key_ref u32 (EMPTY = u32::MAX) | tag u16 (hash >> 48) | value V (10 B)
//! home slot = xxh3(key) & mask; at most 7/8 of the slots are used
//! ```
//!
//! A probe compares tags and reads a key from the arena only when the tag
//! matches, so it usually touches one cache line of the table and, for a
//! key that is present, one of the arena. Writers prefetch that line before
//! they encode the record (`prefetch`), so its miss overlaps other work;
//! `hashbrown::HashTable`, used before, offers no way to do that, and its
//! separate control bytes and buckets were two misses. Deletion shifts the
//! rest of the probe run back (no tombstones). The hash is not stored: a
//! resize recomputes it from the arena.
//!
//! Keys live length-prefixed in an arena of chunks of at most 1 MiB; a key
//! reference is (chunk, offset). Chunks grow by half the arena's size (so at
//! most a third is slack), are sized exactly when the index is rebuilt from a
//! known set of keys (recovery), and no key moves until the arena is
//! compacted (when removed keys make up half of it).

use std::mem::MaybeUninit;

use xxhash_rust::xxh3::xxh3_64;

use super::probing::{prefetch, shift_back};

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

/// A table slot. `value` is initialized exactly when `key_ref != EMPTY`.
#[derive(Clone, Copy)]
#[repr(C, packed(2))]
struct Slot<V: Copy> {
    key_ref: u32,
    tag: u16,
    value: MaybeUninit<V>,
}

/// `key_ref` of a free slot. Never a real reference: a key at the last
/// offset of a chunk would need its length prefix beyond the chunk's end.
const EMPTY: u32 = u32::MAX;

impl<V: Copy> Slot<V> {
    const FREE: Self = Self { key_ref: EMPTY, tag: 0, value: MaybeUninit::uninit() };

    fn is_free(&self) -> bool {
        self.key_ref == EMPTY
    }

    fn value(&self) -> V {
        debug_assert!(!self.is_free());
        let value = self.value;
        // SAFETY: used slots are always written with a value (`put`), and
        // free ones are never read (callers check `is_free` first).
        unsafe { value.assume_init() }
    }
}

const _: () = assert!(std::mem::size_of::<Location>() == 10);
const _: () = assert!(std::mem::size_of::<Slot<Location>>() == 16);

/// Slots of the first table.
const SLOTS_MIN: usize = 8;

fn tag_of(hash: u64) -> u16 {
    (hash >> 48) as u16
}

/// Slots for `keys` keys at most 7/8 full. As hashbrown's limit: at 3/4
/// the table was twice as large for some sizes (100k keys: 4 MiB instead
/// of 2), and lookups twice as slow (60 ns against 31 in the codec bench)
/// on the cache misses; the longer probe runs of linear probing at 7/8 cost
/// less, since tags keep a probe off the arena and runs stay short on
/// average (mean displacement 1.6 slots at 100k keys in 128k slots).
fn slots_for(keys: usize) -> usize {
    (keys + keys.div_ceil(7)).next_power_of_two().max(SLOTS_MIN)
}

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

    /// Starts loading the key at `key_ref` (a hint, see `probing::prefetch`).
    fn prefetch(&self, key_ref: u32) {
        if let Some(chunk) = self.chunks.get((key_ref >> CHUNK_OFFSET_BITS) as usize) {
            if let Some(at) = chunk.get((key_ref as usize) & (CHUNK_BYTES_MAX - 1)) {
                prefetch(at);
            }
        }
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
        let key_ref = ((index as u32) << CHUNK_OFFSET_BITS) | off as u32;
        debug_assert_ne!(key_ref, EMPTY);
        key_ref
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
    /// A power of two long, or empty before the first insert.
    slots: Box<[Slot<V>]>,
    len: usize,
    arena: KeyArena,
    key_bytes: usize,
}

impl<V: Copy> Default for KeyIndex<V> {
    fn default() -> Self {
        Self { slots: Box::new([]), len: 0, arena: KeyArena::default(), key_bytes: 0 }
    }
}

impl<V: Copy> KeyIndex<V> {
    /// An empty index sized for `keys` keys totalling `key_bytes` bytes.
    pub fn with_capacity(keys: usize, key_bytes: usize) -> Self {
        let arena = KeyArena { planned_bytes: key_bytes + keys * LEN_PREFIX_BYTES, ..KeyArena::default() };
        let slots = if keys == 0 { Box::new([]) as Box<[Slot<V>]> } else { vec![Slot::FREE; slots_for(keys)].into() };
        Self { slots, len: 0, arena, key_bytes: 0 }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn mask(&self) -> usize {
        self.slots.len().wrapping_sub(1)
    }

    /// The slot holding `key` (whose xxh3 is `hash`), or the free slot
    /// that ends its probe run. The table must not be empty; it always has
    /// a free slot (at most 7/8 are used), so the probe ends.
    fn find(&self, hash: u64, key: &[u8]) -> Result<usize, usize> {
        let (mask, tag) = (self.mask(), tag_of(hash));
        let mut i = hash as usize & mask;
        loop {
            let slot = &self.slots[i];
            if slot.is_free() {
                return Err(i);
            }
            if slot.tag == tag && self.arena.key(slot.key_ref) == key {
                return Ok(i);
            }
            i = (i + 1) & mask;
        }
    }

    /// Starts loading the table line where a key with xxh3 `hash` is
    /// looked up (see the module doc).
    pub fn prefetch(&self, hash: u64) {
        if !self.slots.is_empty() {
            prefetch(&self.slots[hash as usize & self.mask()]);
        }
    }

    /// After `prefetch` (once its line has had time to arrive): starts
    /// loading the arena key of the home slot, if its tag matches, which
    /// is what an update of an existing key compares against.
    pub fn prefetch_key(&self, hash: u64) {
        if let Some(slot) = self.slots.get(hash as usize & self.mask()) {
            if !slot.is_free() && slot.tag == tag_of(hash) {
                self.arena.prefetch(slot.key_ref);
            }
        }
    }

    /// The slot holding `key`, if any (`find` for a possibly empty table).
    fn position(&self, key: &[u8]) -> Option<usize> {
        if self.len == 0 {
            return None;
        }
        self.find(xxh3_64(key), key).ok()
    }

    pub fn get(&self, key: &[u8]) -> Option<V> {
        self.position(key).map(|i| self.slots[i].value())
    }

    /// Inserts or replaces; returns the previous value.
    pub fn insert(&mut self, key: &[u8], value: V) -> Option<V> {
        self.insert_hashed(xxh3_64(key), key, value)
    }

    /// `insert` for a caller that has the key's xxh3 hash already (the
    /// value cache is keyed by the same hash).
    pub fn insert_hashed(&mut self, hash: u64, key: &[u8], value: V) -> Option<V> {
        debug_assert_eq!(hash, xxh3_64(key));
        if (self.len + 1) * 8 > self.slots.len() * 7 {
            self.resize((self.slots.len() * 2).max(SLOTS_MIN));
        }
        match self.find(hash, key) {
            Ok(i) => {
                let slot = &mut self.slots[i];
                let previous = slot.value();
                slot.value = MaybeUninit::new(value);
                Some(previous)
            }
            Err(i) => {
                let key_ref = self.arena.push(key);
                self.key_bytes += key.len();
                self.slots[i] = Slot { key_ref, tag: tag_of(hash), value: MaybeUninit::new(value) };
                self.len += 1;
                None
            }
        }
    }

    /// Moves every entry into a table of `slot_count` slots (a power of
    /// two), rehashing the keys from the arena.
    fn resize(&mut self, slot_count: usize) {
        let old = std::mem::replace(&mut self.slots, vec![Slot::FREE; slot_count].into());
        let mask = slot_count - 1;
        for slot in old.iter().filter(|slot| !slot.is_free()) {
            let mut i = xxh3_64(self.arena.key(slot.key_ref)) as usize & mask;
            while !self.slots[i].is_free() {
                i = (i + 1) & mask;
            }
            self.slots[i] = *slot;
        }
    }

    /// Replaces the value only if it is still `expected` (compaction moving a
    /// record must not undo a newer write). Returns whether it replaced.
    pub fn replace_if(&mut self, key: &[u8], expected: V, value: V) -> bool
    where
        V: PartialEq,
    {
        match self.position(key) {
            Some(i) if self.slots[i].value() == expected => {
                self.slots[i].value = MaybeUninit::new(value);
                true
            }
            _ => false,
        }
    }

    pub fn remove(&mut self, key: &[u8]) -> Option<V> {
        let at = self.position(key)?;
        let removed = self.slots[at].value();
        self.slots[at] = Slot::FREE;
        self.len -= 1;
        let (arena, mask) = (&self.arena, self.mask());
        shift_back(&mut self.slots, at, Slot::is_free, |slot| xxh3_64(arena.key(slot.key_ref)) as usize & mask);
        self.arena.release(key.len());
        self.key_bytes -= key.len();
        self.maybe_compact_arena();
        Some(removed)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&[u8], V)> {
        self.slots.iter().filter(|slot| !slot.is_free()).map(|slot| (self.arena.key(slot.key_ref), slot.value()))
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
        std::mem::size_of_val(&*self.slots) + self.arena.allocated_bytes() - self.key_bytes
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
        for slot in self.slots.iter_mut().filter(|slot| !slot.is_free()) {
            slot.key_ref = arena.push(self.arena.key(slot.key_ref));
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
            let listed: HashMap<Vec<u8>, u32> = index.iter().map(|(k, v)| (k.to_vec(), v)).collect();
            prop_assert_eq!(&listed, &model);
            let rebuilt = index.map_values(|v| (v % 2 == 0).then_some(v));
            prop_assert_eq!(rebuilt.len(), model.values().filter(|v| *v % 2 == 0).count());
            for (k, v) in &model {
                prop_assert_eq!(rebuilt.get(k), (v % 2 == 0).then_some(*v));
                prop_assert!(!index.replace_if(k, v.wrapping_add(1), 0));
                prop_assert!(index.replace_if(k, *v, v.wrapping_add(1)));
                prop_assert_eq!(index.get(k), Some(v.wrapping_add(1)));
            }
        }
    }

    /// Two keys with the same tag and the same home slot: the tag alone
    /// must never decide a match.
    #[test]
    fn keys_sharing_tag_and_home_slot_stay_distinct() {
        let mut seen = HashMap::new();
        let (first, second) = (0u32..)
            .find_map(|i| {
                let key = format!("collide-{i}").into_bytes();
                let hash = xxh3_64(&key);
                // Top 16 bits (the tag) and low 10 (the home slot in any
                // table of up to 1024 slots); found by the birthday bound
                // within a few thousand keys.
                let class = (hash >> 48, hash & 0x3ff);
                seen.insert(class, key.clone()).map(|earlier| (earlier, key))
            })
            .expect("a pair exists");
        let mut index = KeyIndex::default();
        assert_eq!(index.insert(&first, 1u32), None);
        assert_eq!(index.insert(&second, 2), None);
        assert_eq!((index.get(&first), index.get(&second)), (Some(1), Some(2)));
        assert_eq!(index.insert(&second, 3), Some(2));
        assert_eq!(index.remove(&first), Some(1));
        assert_eq!((index.get(&first), index.get(&second)), (None, Some(3)));
        assert_eq!(index.remove(&second), Some(3));
        assert!(index.is_empty());
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
        // Overhead per key besides the key: the table (16-byte slots, at
        // most 7/8 used) plus the 2-byte length prefix.
        let per_key = rebuilt.overhead_bytes() as f64 / rebuilt.len() as f64;
        assert!(per_key < 48.0, "{per_key}");
    }
}
