//! The in-memory index of one partition replica: key → value of type `V`
//! (at run time a `Location`: segment slot, offset, value length).
//!
//! Memory is the design constraint (target: at most 48 bytes of overhead per
//! key besides the key bytes), and so are cache misses: an index update is
//! on every write's path. The table is open-addressed with linear probing
//! and holds 16-byte slots (for a `Location`):
//!
//! ```text
//! slot: key_ref u32 (EMPTY = 0) | tag u16 (hash >> 48) | value V (10 B)
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
//! A large table grows without stopping the shard: the doubled table is
//! allocated zeroed (a free slot is all zero bytes, so fresh memory needs
//! no initializing pass), and the entries move over a few slots per insert
//! (`drain`) while lookups look in both tables. Rehashing half a million
//! keys at once stopped the shard for 12 ms, two million for 160 ms. Small
//! tables (below `DRAIN_FROM_SLOTS`) still double at once: that takes well
//! under a millisecond, and keeps a second table from weighing on the
//! memory of the many small partitions.
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

/// `key_ref` of a free slot. Never a real reference: chunk numbers in a
/// reference start at 1 (see `KeyArena`), so a zeroed table is all free.
const EMPTY: u32 = 0;

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

/// Tables of at least this many slots grow incrementally (see the module
/// doc); smaller ones at once, rehashing at most 28,672 keys (7/8 of it).
const DRAIN_FROM_SLOTS: usize = 1 << 15;

/// Slots of the old table each insert looks at while the table grows. The
/// drain of a table of S slots takes S/8 inserts; the next doubling is
/// 7/8 S new keys away.
const DRAIN_SLOTS_PER_INSERT: usize = 8;

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
/// Chunk numbers in a reference start at 1 (0 would make `EMPTY`).
const CHUNKS_MAX: usize = (1 << (32 - CHUNK_OFFSET_BITS)) - 1;
const CHUNK_BYTES_MIN: usize = 256;
const LEN_PREFIX_BYTES: usize = 2;
const _: () = assert!(CHUNK_BYTES_MAX >= LEN_PREFIX_BYTES + super::format::KEY_BYTES_LIMIT);

/// Append-only storage for keys, addressed by ((chunk + 1) << 20 | offset).
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
        let chunk = &self.chunks[(key_ref >> CHUNK_OFFSET_BITS) as usize - 1];
        let off = (key_ref as usize) & (CHUNK_BYTES_MAX - 1);
        let len = usize::from(u16::from_le_bytes([chunk[off], chunk[off + 1]]));
        &chunk[off + LEN_PREFIX_BYTES..off + LEN_PREFIX_BYTES + len]
    }

    /// Starts loading the key at `key_ref` (a hint, see `probing::prefetch`).
    fn prefetch(&self, key_ref: u32) {
        if let Some(chunk) = self.chunks.get(((key_ref >> CHUNK_OFFSET_BITS) as usize).wrapping_sub(1)) {
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
        let key_ref = ((index as u32 + 1) << CHUNK_OFFSET_BITS) | off as u32;
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

/// A table of `count` free slots.
fn free_slots<V: Copy>(count: usize) -> Box<[Slot<V>]> {
    // (`Box::new_zeroed_slice` once the MSRV reaches 1.92.)
    assert!(count > 0);
    let layout = std::alloc::Layout::array::<Slot<V>>(count).expect("a table's size fits the address space");
    // SAFETY: the layout is not zero-sized (count > 0, slots are 16 bytes).
    let at = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<Slot<V>>();
    if at.is_null() {
        std::alloc::handle_alloc_error(layout);
    }
    // SAFETY: `at` is a live allocation of `count` slots from the global
    // allocator with the layout `Box` frees with, and all-zero bytes are a
    // valid slot, a free one (`key_ref` is `EMPTY`, the tag a plain
    // integer, `value` a `MaybeUninit`).
    unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(at, count)) }
}

/// Key → `V` map for one partition.
pub struct KeyIndex<V: Copy> {
    /// A power of two long, or empty before the first insert.
    slots: Box<[Slot<V>]>,
    /// While the table grows: the previous table, holding the entries not
    /// yet moved (see `drain`). Empty otherwise.
    old: Box<[Slot<V>]>,
    /// Where the drain started (a free slot of `old`), the slot it looks at
    /// next, and how many it has left to look at (it goes once round).
    /// The slots from `drain_from` to `drain_at` (the drained arc) are all
    /// free, and entries are taken out of it without shifting the rest of
    /// their probe runs back, so a probe of `old` whose home slot is in
    /// the arc starts at `drain_at` instead (see `old_start`).
    drain_from: usize,
    drain_at: usize,
    drain_left: usize,
    /// Entries in both tables.
    len: usize,
    arena: KeyArena,
    key_bytes: usize,
}

impl<V: Copy> Default for KeyIndex<V> {
    fn default() -> Self {
        Self {
            slots: Box::new([]),
            old: Box::new([]),
            drain_from: 0,
            drain_at: 0,
            drain_left: 0,
            len: 0,
            arena: KeyArena::default(),
            key_bytes: 0,
        }
    }
}

/// Where `key` (whose xxh3 is `hash`) is in `slots` (a power-of-two table
/// with a free slot), probing from slot `start`, or the free slot that ends
/// its probe run.
fn probe<V: Copy>(slots: &[Slot<V>], arena: &KeyArena, start: usize, hash: u64, key: &[u8]) -> Result<usize, usize> {
    let (mask, tag) = (slots.len() - 1, tag_of(hash));
    let mut i = start;
    loop {
        let slot = &slots[i];
        if slot.is_free() {
            return Err(i);
        }
        if slot.tag == tag && arena.key(slot.key_ref) == key {
            return Ok(i);
        }
        i = (i + 1) & mask;
    }
}

/// `home`, or `to` if `home` is in the arc of a `mask + 1` slot table
/// from `from` up to (not including) `to`.
fn past_arc(home: usize, from: usize, to: usize, mask: usize) -> usize {
    if home.wrapping_sub(from) & mask < to.wrapping_sub(from) & mask {
        to
    } else {
        home
    }
}

/// Where a key is.
#[derive(Clone, Copy)]
enum Place {
    New(usize),
    Old(usize),
}

impl<V: Copy> KeyIndex<V> {
    /// An empty index sized for `keys` keys totalling `key_bytes` bytes.
    pub fn with_capacity(keys: usize, key_bytes: usize) -> Self {
        let arena = KeyArena { planned_bytes: key_bytes + keys * LEN_PREFIX_BYTES, ..KeyArena::default() };
        let slots = if keys == 0 { Box::new([]) as Box<[Slot<V>]> } else { free_slots(slots_for(keys)) };
        Self { slots, arena, ..Self::default() }
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

    /// Where `key` is, if anywhere: the new table first (a key is in one
    /// table only).
    fn place(&self, hash: u64, key: &[u8]) -> Option<Place> {
        if self.len == 0 {
            return None;
        }
        if let Ok(at) = probe(&self.slots, &self.arena, hash as usize & self.mask(), hash, key) {
            return Some(Place::New(at));
        }
        if self.drain_left == 0 {
            return None;
        }
        let start = self.old_start(hash as usize & (self.old.len() - 1));
        probe(&self.old, &self.arena, start, hash, key).ok().map(Place::Old)
    }

    /// Where a probe of the old table for an entry whose home slot is
    /// `home` starts: past the drained arc, whose entries are gone (the
    /// rest of their probe runs starts at `drain_at`).
    fn old_start(&self, home: usize) -> usize {
        past_arc(home, self.drain_from, self.drain_at, self.old.len() - 1)
    }

    /// The table holding `place`, and the slot's index in it.
    fn table_mut(&mut self, place: Place) -> (&mut [Slot<V>], usize) {
        match place {
            Place::New(at) => (&mut self.slots, at),
            Place::Old(at) => (&mut self.old, at),
        }
    }

    pub fn get(&self, key: &[u8]) -> Option<V> {
        let place = self.place(xxh3_64(key), key)?;
        let (table, at) = match place {
            Place::New(at) => (&self.slots, at),
            Place::Old(at) => (&self.old, at),
        };
        Some(table[at].value())
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
            self.grow();
        }
        let previous = match self.place(hash, key) {
            // Updated in place, in either table (the drain moves it).
            Some(place) => {
                let (table, at) = self.table_mut(place);
                let previous = table[at].value();
                table[at].value = MaybeUninit::new(value);
                Some(previous)
            }
            None => {
                let key_ref = self.arena.push(key);
                self.key_bytes += key.len();
                self.put_new(hash, Slot { key_ref, tag: tag_of(hash), value: MaybeUninit::new(value) });
                self.len += 1;
                None
            }
        };
        self.drain(DRAIN_SLOTS_PER_INSERT);
        previous
    }

    /// Doubles the table: at once when small, else by starting a drain.
    fn grow(&mut self) {
        self.drain(usize::MAX);
        let slot_count = (self.slots.len() * 2).max(SLOTS_MIN);
        self.old = std::mem::replace(&mut self.slots, free_slots(slot_count));
        // Draining from a free slot on, no probe run crosses that slot
        // (nothing is inserted into the old table), so every run left
        // in it starts at or after `drain_at`.
        self.drain_from = self.old.iter().position(Slot::is_free).unwrap_or(0);
        self.drain_at = self.drain_from;
        self.drain_left = self.old.len();
        if self.old.len() < DRAIN_FROM_SLOTS {
            self.drain(usize::MAX);
        }
    }

    /// Moves the entries of up to `slots` slots of the old table into the
    /// new one.
    fn drain(&mut self, slots: usize) {
        for _ in 0..slots.min(self.drain_left) {
            let slot = std::mem::replace(&mut self.old[self.drain_at], Slot::FREE);
            if !slot.is_free() {
                let hash = xxh3_64(self.arena.key(slot.key_ref));
                self.put_new(hash, slot);
            }
            self.drain_at = (self.drain_at + 1) & (self.old.len() - 1);
            self.drain_left -= 1;
        }
        if self.drain_left == 0 && !self.old.is_empty() {
            self.old = Box::new([]);
        }
    }

    /// Puts an entry whose key the new table does not hold into it.
    fn put_new(&mut self, hash: u64, slot: Slot<V>) {
        let mask = self.mask();
        let mut i = hash as usize & mask;
        while !self.slots[i].is_free() {
            i = (i + 1) & mask;
        }
        self.slots[i] = slot;
    }

    /// Replaces the value only if it is still `expected` (compaction moving a
    /// record must not undo a newer write). Returns whether it replaced.
    pub fn replace_if(&mut self, key: &[u8], expected: V, value: V) -> bool
    where
        V: PartialEq,
    {
        let Some(place) = self.place(xxh3_64(key), key) else { return false };
        let (table, at) = self.table_mut(place);
        let slot = &mut table[at];
        if slot.value() != expected {
            return false;
        }
        slot.value = MaybeUninit::new(value);
        true
    }

    pub fn remove(&mut self, key: &[u8]) -> Option<V> {
        let place = self.place(xxh3_64(key), key)?;
        // In the old table the hole is never in the drained arc, so an
        // entry whose home is there may always move back into it, as it
        // may from a home at `drain_at`: true homes serve in both tables.
        let (table, at) = match place {
            Place::New(at) => (&mut self.slots, at),
            Place::Old(at) => (&mut self.old, at),
        };
        let removed = table[at].value();
        table[at] = Slot::FREE;
        let (arena, mask) = (&self.arena, table.len() - 1);
        shift_back(table, at, Slot::is_free, |slot| xxh3_64(arena.key(slot.key_ref)) as usize & mask);
        self.len -= 1;
        self.arena.release(key.len());
        self.key_bytes -= key.len();
        self.maybe_compact_arena();
        Some(removed)
    }

    fn used_slots(&self) -> impl Iterator<Item = &Slot<V>> {
        self.slots.iter().chain(self.old.iter()).filter(|slot| !slot.is_free())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&[u8], V)> {
        self.used_slots().map(|slot| (self.arena.key(slot.key_ref), slot.value()))
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

    /// Heap bytes used by the tables and the arena, minus the key bytes.
    pub fn overhead_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.slots) + std::mem::size_of_val(&*self.old) + self.arena.allocated_bytes()
            - self.key_bytes
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
        for slot in self.slots.iter_mut().chain(self.old.iter_mut()).filter(|slot| !slot.is_free()) {
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

    /// Across doublings that drain (tables of `DRAIN_FROM_SLOTS` and more),
    /// inserts, updates, removals and conditional replaces of keys in
    /// either table behave as on a map, and the old table goes once drained.
    #[test]
    fn a_table_that_grows_in_steps_behaves_like_a_hashmap() {
        let mut index = KeyIndex::default();
        let mut model = HashMap::new();
        let mut seen_draining = 0;
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        // Enough keys for two draining doublings (at 28,673 and 57,345 keys).
        for step in 0..150_000u32 {
            let r = next();
            let key = format!("k{}", r % 70_000).into_bytes();
            match (r >> 32) % 8 {
                0 => assert_eq!(index.remove(&key), model.remove(&key)),
                1 => {
                    let current = model.get(&key).copied();
                    let replaced = current.is_some_and(|v| index.replace_if(&key, v, step));
                    assert_eq!(replaced, current.is_some());
                    if replaced {
                        model.insert(key.clone(), step);
                    }
                    assert!(!index.replace_if(&key, u32::MAX, 0));
                }
                2 => assert_eq!(index.get(&key), model.get(&key).copied()),
                _ => assert_eq!(index.insert(&key, step), model.insert(key, step)),
            }
            if index.drain_left > 0 {
                seen_draining += 1;
            }
            assert_eq!(index.len(), model.len());
        }
        assert!(seen_draining > 1_000, "the drain was never seen in progress ({seen_draining} steps)");
        let listed: HashMap<Vec<u8>, u32> = index.iter().map(|(k, v)| (k.to_vec(), v)).collect();
        assert_eq!(listed, model);
        for (k, v) in &model {
            assert_eq!(index.get(k), Some(*v));
        }
        // Updates alone finish a pending drain and free the old table.
        for key in model.keys().take(20_000) {
            index.insert(key, 0);
        }
        assert_eq!((index.drain_left, index.old.len()), (0, 0));
    }

    /// The entries of the old table's probe run at the drain's position
    /// (whose run began in the drained arc) stay reachable through a slot
    /// at a time of the drain, and when one of them is removed.
    #[test]
    fn probe_runs_cut_by_the_drain_stay_reachable() {
        let mut index = KeyIndex::default();
        let mut model = HashMap::new();
        let mut key_of = 0u32..;
        // One key past 7/8 of `DRAIN_FROM_SLOTS`: that insert starts a drain.
        while index.drain_left == 0 {
            let i = key_of.next().unwrap();
            let key = format!("run-{i}").into_bytes();
            index.insert(&key, i);
            model.insert(key, i);
        }
        let (mut checked, mut removed) = (0, 0);
        while index.drain_left > 0 {
            let mask = index.old.len() - 1;
            let run: Vec<Vec<u8>> = (0..)
                .map(|step| &index.old[(index.drain_at + step) & mask])
                .take_while(|slot| !slot.is_free())
                .map(|slot| index.arena.key(slot.key_ref).to_vec())
                .collect();
            if run.len() > 2 && index.drain_at % 7 == 0 {
                let gone = &run[index.drain_at % run.len()];
                assert_eq!(index.remove(gone), model.remove(gone));
                removed += 1;
            }
            for key in run.iter().filter(|key| model.contains_key(*key)) {
                assert_eq!(index.get(key), model.get(key).copied(), "{}", String::from_utf8_lossy(key));
                checked += 1;
            }
            index.drain(1);
        }
        assert!(checked > 10_000 && removed > 100, "{checked} checked, {removed} removed");
        assert_eq!(index.len(), model.len());
        for (key, value) in &model {
            assert_eq!(index.get(key), Some(*value));
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
        // Overhead per key besides the key: the table (16-byte slots, at
        // most 7/8 used) plus the 2-byte length prefix.
        let per_key = rebuilt.overhead_bytes() as f64 / rebuilt.len() as f64;
        assert!(per_key < 48.0, "{per_key}");
    }
}
