//! The per-shard value cache: (partition, key) → the key's current value,
//! bounded by bytes, with CLOCK eviction over an open-addressed table.
//!
//! A hit answers a read without touching the partition's index, with two
//! dependent cache misses: the table slot (found by linear probing from the
//! hash; at most three quarters of the slots are used, so a probe mostly
//! stays within its first cache line or two) and one allocation
//! holding the key (compared) and the value next to each other. quick_cache,
//! used before, took four (control bytes, bucket, slab entry, allocation);
//! a read through the index and a location-keyed cache took about seven.
//!
//! ```text
//! slot (32 B): value: Option<Value> (Rc<[key ‖ value]> + key length) 24 B
//!              mixed: u32   low bits of hash ^ partition mix; home = mixed & mask
//!              partition: u16, referenced: Cell<bool> (CLOCK's bit)
//! ```
//! Deletion shifts the following entries of the probe run back (no
//! tombstones), so a probe ends at the first empty slot. The table starts
//! small and doubles at 3/4 load, up to two slots per entry of the expected
//! size the budget holds (lighter entries are then bounded by the same 3/4
//! load limit). Doubling at half load, as first built, took up to twice
//! the table for the same entries, and near a doubling point a second
//! table prepared early (node RSS at ~980k keys, two shards: 546 MB
//! against 426 MB) for no measured speed (Redis-port A/B: SET 0.98x, GET
//! 1.00x). Doubling never stops the shard: the next
//! table is initialized a few slots per insert ahead of time, and after the
//! switch the entries move over a few per insert while lookups consult
//! both tables (at two million entries a stop-the-world doubling took
//! 0.6 s, mostly first-touch page faults); its memory comes on top of the byte budget,
//! as quick_cache's did (taking it out of the budget cost a quarter of the
//! entries, and GET through the Redis port with the default 64 MiB cache and
//! 630k keys fell from 355k to 209k ops/s on the extra disk reads). Growing
//! keeps it dense: a sparse table sized for the whole budget
//! made every lookup of a small data set touch a new page (measured: GET
//! 0.96x of the quick_cache version; dense, see the README).
//!
//! Coherence rule: the cache never holds a value the index does not point
//! at. Every index change that changes a key's value updates or drops the
//! key's entry in the same synchronous step (`segment.rs`, appends); a
//! compaction move keeps the value and so the entry; a read that filled
//! from the disk inserts only if the index still points where it read
//! (`store.rs`). Entries are matched by partition and key bytes, so keys
//! with equal hashes are distinct entries.

use std::cell::Cell;
use std::fmt;
use std::ops::Deref;
use std::rc::Rc;

use xxhash_rust::xxh3::xxh3_64;

use super::probing::{prefetch, prefetch_bytes, shift_back};

/// A value read from the store: the key and value in one shared
/// allocation; dereferences to the value bytes. Cloning is a
/// reference-count increment.
#[derive(Clone)]
pub struct Value {
    record: Rc<[u8]>,
    key_len: u16,
}

impl Value {
    /// A value for `key` (copies both into one allocation). Built in place:
    /// `Rc::from(Vec)` allocates twice and copies twice, and every SET
    /// makes one of these (malloc and free were ~7% of a SET profile).
    pub fn new(key: &[u8], value: &[u8]) -> Self {
        let key_len = u16::try_from(key.len()).expect("keys are at most 64 KiB");
        let mut record = Rc::<[u8]>::new_uninit_slice(key.len() + value.len());
        let bytes = Rc::get_mut(&mut record).expect("a new Rc is unique").as_mut_ptr().cast::<u8>();
        // SAFETY: `bytes` points at key.len() + value.len() writable bytes
        // that no slice overlaps; both copies together initialize them all,
        // which is what `assume_init` requires.
        let record = unsafe {
            std::ptr::copy_nonoverlapping(key.as_ptr(), bytes, key.len());
            std::ptr::copy_nonoverlapping(value.as_ptr(), bytes.add(key.len()), value.len());
            record.assume_init()
        };
        Self { record, key_len }
    }

    /// The key this value was made for.
    pub fn key(&self) -> &[u8] {
        &self.record[..usize::from(self.key_len)]
    }

    /// Writes `value` over this value's bytes, if this is the only handle
    /// on the allocation (no reader holds a clone) and the lengths match;
    /// says whether it did.
    fn overwrite(&mut self, value: &[u8]) -> bool {
        let key_len = usize::from(self.key_len);
        if self.record.len() != key_len + value.len() {
            return false;
        }
        match Rc::get_mut(&mut self.record) {
            Some(record) => {
                record[key_len..].copy_from_slice(value);
                true
            }
            None => false,
        }
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

/// The hash the cache is keyed by (with the partition).
pub fn key_hash(key: &[u8]) -> u64 {
    xxh3_64(key)
}

/// Spreads partition ids over the table (same key hash, other partition:
/// another home slot).
const PARTITION_MIX: u64 = 0x9E37_79B9_7F4A_7C15;

/// Odd, so that multiplying by it permutes the slots (see `hand_slot`).
const HAND_SCRAMBLE: usize = 0x9E37_79B9_7F4A_7C15_u64 as usize;

/// Slots per expected entry at the table's largest.
const SLOTS_PER_EXPECTED_ENTRY: usize = 2;

#[derive(Default)]
struct Slot {
    value: Option<Value>,
    mixed: u32,
    partition: u16,
    referenced: Cell<bool>,
}

const _: () = assert!(std::mem::size_of::<Slot>() == 32);

pub struct ValueCache {
    slots: Box<[Slot]>,
    mask: usize,
    /// While the table grows: the previous table, still holding the entries
    /// not yet moved (see `drain`). Empty otherwise.
    old: Box<[Slot]>,
    /// The slot of `old` the drain looks at next, and how many it has left
    /// to look at (it walks once round `old` from a slot that was empty).
    drain_at: usize,
    drain_left: usize,
    /// The next, twice as large table, initialized a few slots per insert
    /// ahead of the doubling (see `prepare_next`). Empty at the largest size.
    next: Vec<Slot>,
    /// Entries in both tables.
    len: usize,
    /// Most entries (three quarters of the slots): past it the table
    /// grows or, at its largest, an entry is evicted whatever its weight.
    len_max: usize,
    /// The table's largest size, from the capacity and expected entry size.
    slot_count_max: usize,
    weight: u64,
    /// Bytes entries may weigh (the capacity; the table comes on top).
    weight_max: u64,
    /// CLOCK's hand: counts the slots eviction has looked at (see
    /// `hand_slot` for where it points).
    hand: usize,
}

/// Slots of a probe run whose value `prefetch_value` looks for.
const PREFETCH_PROBE_SLOTS: usize = 2;

/// Slots of a new table; it doubles as entries arrive, so a data set much
/// smaller than the budget keeps a small, dense (cache-friendly) table.
const INITIAL_SLOTS: usize = 64;

/// Slots of the old table each insert looks at while the table grows. A
/// doubling then costs each insert a few slot moves instead of stopping
/// the shard to rehash everything at once (measured before: 155 ms at
/// half a million entries, 609 ms at two million). At 8 per insert the old
/// table is empty long before the new one is due to grow again (that takes
/// three eighths of its slots in inserts; the drain needs a sixteenth).
const DRAIN_SLOTS_PER_INSERT: usize = 8;

/// Slots of the next table each insert initializes once the table is three
/// quarters of the way to doubling. Initializing a large table at once was
/// the rest of a doubling's stop (first touches of fresh memory are page
/// faults: 555 ms for the 256 MiB of 8M slots here). From there the
/// doubling is three sixteenths of the current table's slots in inserts
/// away; the next table has twice its slots, so at 32 per insert it is
/// ready after a third of that. A cache that stops growing short of it
/// never allocates it.
const PREPARE_SLOTS_PER_INSERT: usize = 32;

impl ValueCache {
    /// A cache of at most `capacity_bytes` of keys, values and a fixed
    /// overhead per entry, plus its table (32 bytes a slot, at most two
    /// slots per `expected_entry_bytes` of capacity, rounded up to a power
    /// of two).
    pub fn new(capacity_bytes: u64, expected_entry_bytes: u64) -> Self {
        let items = (capacity_bytes / expected_entry_bytes.max(1)).clamp(8, 1 << 24) as usize;
        let slot_count_max = (items * SLOTS_PER_EXPECTED_ENTRY).next_power_of_two();
        let mut cache = Self {
            slots: Box::new([]),
            mask: 0,
            old: Box::new([]),
            drain_at: 0,
            drain_left: 0,
            next: Vec::new(),
            len: 0,
            len_max: 0,
            slot_count_max,
            weight: 0,
            weight_max: capacity_bytes,
            hand: 0,
        };
        cache.resize(INITIAL_SLOTS.min(slot_count_max));
        cache
    }

    /// Starts moving to a table of `slot_count` slots (a power of two); the
    /// entries follow a few at a time (`drain`).
    fn resize(&mut self, slot_count: usize) {
        self.drain(usize::MAX);
        let mut fresh = std::mem::take(&mut self.next);
        if fresh.capacity() != slot_count {
            fresh = Vec::with_capacity(slot_count);
        }
        fresh.resize_with(slot_count, Slot::default);
        self.old = std::mem::replace(&mut self.slots, fresh.into_boxed_slice());
        self.mask = slot_count - 1;
        self.hand = 0;
        // Draining from an empty slot on, every probe run is drained from
        // its start, and no run crosses that slot (nothing is inserted into
        // the old table), so the shifts of `take_old` never move an entry
        // behind the drain.
        self.drain_at = self.old.iter().position(|slot| slot.value.is_none()).unwrap_or(0);
        self.drain_left = self.old.len();
        self.len_max = slot_count / 4 * 3;
    }

    /// Initializes up to `slots` more slots of the next table, if the table
    /// can still grow and is close to it.
    fn prepare_next(&mut self, slots: usize) {
        let target = self.slots.len() * 2;
        if target > self.slot_count_max || self.len * 4 < self.len_max * 3 {
            return;
        }
        if self.next.capacity() != target {
            self.next = Vec::with_capacity(target);
        }
        let count = slots.min(target - self.next.len());
        self.next.extend((0..count).map(|_| Slot::default()));
    }

    /// Moves the entries of up to `slots` slots of the old table into the
    /// new one.
    fn drain(&mut self, mut slots: usize) {
        while slots > 0 && self.drain_left > 0 {
            slots -= 1;
            match self.take_old(self.drain_at) {
                // The shift may have moved another entry here: look again.
                Some(slot) => self.put_new(slot),
                None => self.step_drain(),
            }
        }
    }

    /// Moves the drain past an empty slot of the old table; frees the old
    /// table once the drain has been all round it.
    fn step_drain(&mut self) {
        self.drain_at = (self.drain_at + 1) & (self.old.len() - 1);
        self.drain_left -= 1;
        if self.drain_left == 0 {
            self.old = Box::new([]);
        }
    }

    /// Takes the entry at `at` of the old table out (shifting back the
    /// rest of its probe run), if there is one. Counts stay: the caller
    /// moves it or forgets it.
    fn take_old(&mut self, at: usize) -> Option<Slot> {
        self.old[at].value.as_ref()?;
        let slot = std::mem::take(&mut self.old[at]);
        let mask = self.old.len() - 1;
        shift_back(&mut self.old, at, |slot| slot.value.is_none(), |slot| slot.mixed as usize & mask);
        Some(slot)
    }

    /// Puts an entry whose key the new table does not hold into it.
    fn put_new(&mut self, slot: Slot) {
        let mut i = self.home(slot.mixed);
        while self.slots[i].value.is_some() {
            i = (i + 1) & self.mask;
        }
        self.slots[i] = slot;
    }

    fn mix(partition: u32, hash: u64) -> u32 {
        (hash ^ u64::from(partition).wrapping_mul(PARTITION_MIX)) as u32
    }

    fn home(&self, mixed: u32) -> usize {
        mixed as usize & self.mask
    }

    /// The slot of the (new) table holding `key` of `partition`, or the
    /// free slot where it would go.
    fn find(&self, partition: u32, mixed: u32, key: &[u8]) -> Result<usize, usize> {
        probe(&self.slots, partition, mixed, key)
    }

    /// The slot of the old table holding `key` of `partition`, while the
    /// table grows.
    fn find_old(&self, partition: u32, mixed: u32, key: &[u8]) -> Option<usize> {
        if self.old.is_empty() {
            return None;
        }
        probe(&self.old, partition, mixed, key).ok()
    }

    /// The cached value of `key`, whose `key_hash` is `hash`.
    pub fn get(&self, partition: u32, hash: u64, key: &[u8]) -> Option<Value> {
        let mixed = Self::mix(partition, hash);
        let slot = match self.find(partition, mixed, key) {
            Ok(at) => &self.slots[at],
            Err(_) => &self.old[self.find_old(partition, mixed, key)?],
        };
        slot.referenced.set(true);
        slot.value.clone()
    }

    /// Caches `value` as `key`'s current value.
    pub fn insert(&mut self, partition: u32, hash: u64, key: &[u8], value: &[u8]) {
        debug_assert_eq!(key_hash(key), hash);
        self.insert_any_hash(partition, hash, key, value);
    }

    /// `insert` for any hash (tests forge collisions with it).
    fn insert_any_hash(&mut self, partition: u32, hash: u64, key: &[u8], value: &[u8]) {
        if !self.overwrite_in_place(partition, hash, key, value) {
            self.place(partition, hash, Value::new(key, value));
        }
    }

    /// Writes `value` into the allocation of `key`'s cached value, where
    /// that allocation is the cache's alone and has the right length (an
    /// overwrite replaces a version set with one of the same size); says
    /// whether it did. Allocating the new value and freeing the old one
    /// was ~7% of a one-shard SET profile. Only the new table is looked
    /// at: a key still in the old one moves over on the general path.
    fn overwrite_in_place(&mut self, partition: u32, hash: u64, key: &[u8], value: &[u8]) -> bool {
        let Ok(at) = self.find(partition, Self::mix(partition, hash), key) else {
            return false;
        };
        let slot = &mut self.slots[at];
        let overwritten = slot.value.as_mut().is_some_and(|cached| cached.overwrite(value));
        if overwritten {
            // Just written: as recent as a read.
            slot.referenced.set(true);
            // The drain keeps its pace of one step per insert, whichever
            // path the insert takes.
            self.drain(DRAIN_SLOTS_PER_INSERT);
        }
        overwritten
    }

    /// Caches a `Value` made for its key. A value heavier than the whole
    /// budget is not cached (and the key's old entry goes).
    pub fn insert_value(&mut self, partition: u32, hash: u64, value: Value) {
        debug_assert_eq!(key_hash(value.key()), hash);
        self.place(partition, hash, value);
    }

    /// `insert_value` for any hash (tests forge collisions with it).
    fn place(&mut self, partition: u32, hash: u64, value: Value) {
        let partition_id = u16::try_from(partition).expect("partition ids fit 16 bits (partition_count <= 65536)");
        let mixed = Self::mix(partition, hash);
        self.drain(DRAIN_SLOTS_PER_INSERT);
        self.prepare_next(PREPARE_SLOTS_PER_INSERT);
        // A key still in the old table leaves it: the new value goes into
        // the new one.
        if let Some(at) = self.find_old(partition, mixed, value.key()) {
            self.forget_old(at);
        }
        let weight = value.weight();
        if weight > self.weight_max {
            if let Ok(at) = self.find(partition, mixed, value.key()) {
                self.remove_at(at);
            }
            return;
        }
        match self.find(partition, mixed, value.key()) {
            Ok(at) => {
                let slot = &mut self.slots[at];
                let old = slot.value.replace(value).expect("found slots hold a value");
                // Just written: as recent as a read.
                slot.referenced.set(true);
                self.weight = self.weight - old.weight() + weight;
                while self.weight > self.weight_max {
                    self.evict_one();
                }
            }
            Err(mut at) => {
                let mut moved = false;
                while self.len + 1 > self.len_max {
                    if self.slots.len() < self.slot_count_max {
                        self.resize(self.slots.len() * 2);
                    } else {
                        self.evict_one();
                    }
                    moved = true;
                }
                while self.weight + weight > self.weight_max {
                    self.evict_one();
                    moved = true;
                }
                if moved {
                    // Growing and eviction move entries: probe again.
                    at = self.find(partition, mixed, value.key()).expect_err("the key was absent");
                }
                self.slots[at] =
                    Slot { value: Some(value), mixed, partition: partition_id, referenced: Cell::new(false) };
                self.len += 1;
                self.weight += weight;
            }
        }
    }

    /// Forgets `key`'s value.
    pub fn invalidate(&mut self, partition: u32, hash: u64, key: &[u8]) {
        let mixed = Self::mix(partition, hash);
        if let Ok(at) = self.find(partition, mixed, key) {
            self.remove_at(at);
        } else if let Some(at) = self.find_old(partition, mixed, key) {
            self.forget_old(at);
        }
    }

    /// Removes the entry at `at` of the old table.
    fn forget_old(&mut self, at: usize) {
        let slot = self.take_old(at).expect("forgetting a used slot");
        self.uncount(slot);
    }

    /// Takes a removed entry off the counts.
    fn uncount(&mut self, slot: Slot) {
        self.len -= 1;
        self.weight -= slot.value.expect("a removed entry").weight();
    }

    /// Removes the entry at `at` and shifts back the entries after it whose
    /// probe run passes through the hole, so every probe still finds them.
    fn remove_at(&mut self, at: usize) {
        let removed = std::mem::take(&mut self.slots[at]);
        self.uncount(removed);
        let mask = self.mask;
        shift_back(&mut self.slots, at, |slot| slot.value.is_none(), |slot| slot.mixed as usize & mask);
    }

    /// Where the hand points: the hand counts up, and an odd multiplier
    /// turns the count into a permutation of the slots. A hand sweeping the
    /// slots in order would evict a contiguous stretch and leave the slots
    /// just ahead of it, untouched for a whole sweep, nearly full: linear
    /// probing then builds runs thousands of slots long (measured: mean
    /// displacement 170 slots, longest 65,000, and ingest 20x slower).
    /// Scrambled, evictions land evenly over the table and every slot is
    /// still visited once per sweep.
    fn hand_slot(&self) -> usize {
        self.hand.wrapping_mul(HAND_SCRAMBLE) & self.mask
    }

    /// Evicts one entry: the first unreferenced one from the hand on,
    /// clearing reference bits on the way (at most one sweep).
    fn evict_one(&mut self) {
        debug_assert!(self.len > 0, "evicting from an empty cache");
        // While the table grows, the drain is the hand: an entry read since
        // it was cached moves on (its bit cleared), the first one that was
        // not goes.
        while self.drain_left > 0 {
            match self.take_old(self.drain_at) {
                Some(slot) if slot.referenced.replace(false) => self.put_new(slot),
                Some(slot) => return self.uncount(slot),
                None => self.step_drain(),
            }
        }
        loop {
            let at = self.hand_slot();
            let slot = &self.slots[at];
            if slot.value.is_some() && !slot.referenced.replace(false) {
                // The hand stays: a shifted-back entry may now be here.
                self.remove_at(at);
                return;
            }
            self.hand = self.hand.wrapping_add(1) & self.mask;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Bytes held by entries, by the cache's own weighing.
    pub fn weight(&self) -> u64 {
        self.weight
    }

    /// Starts loading what inserting `partition`'s key with `hash` will
    /// touch: its home slot and, once the cache is full, the slots at the
    /// eviction hand and the allocation of the entry there (its reference
    /// count drops on eviction). A writer calls this before the work it does
    /// anyway (encoding, the index update), so these cache misses overlap
    /// with that work instead of following one another: in an ingest they
    /// were five serial misses per put.
    pub fn prefetch_insert(&self, partition: u32, hash: u64) {
        prefetch(&self.slots[self.home(Self::mix(partition, hash))]);
        if self.len < self.len_max && self.weight + NEAR_FULL_MARGIN_BYTES < self.weight_max {
            return;
        }
        // After an eviction the hand rests on the slot it emptied, so the
        // next victim is usually one step on; that slot was prefetched by
        // the previous insert (as two steps on).
        let ahead = |steps: usize| self.hand.wrapping_add(steps).wrapping_mul(HAND_SCRAMBLE) & self.mask;
        prefetch(&self.slots[ahead(2)]);
        let victim = self.slots[ahead(0)].value.as_ref().or(self.slots[ahead(1)].value.as_ref());
        // An `Rc`'s reference counts sit just before its data.
        if let Some(victim) = victim {
            prefetch(Rc::as_ptr(&victim.record).cast::<u8>().wrapping_sub(2 * std::mem::size_of::<usize>()));
        }
    }

    /// Starts loading the slot where a lookup of `partition`'s key with
    /// `hash` starts (see `ShardStore::prefetch_slots`).
    pub fn prefetch_slot(&self, partition: u32, hash: u64) {
        let home = self.home(Self::mix(partition, hash));
        prefetch(&self.slots[home]);
        // A probe run often reaches the next slot, which may start the
        // next cache line.
        prefetch(&self.slots[(home + 1) & self.mask]);
    }

    /// After `prefetch_slot`: starts loading the value in that slot, if its
    /// tag matches: the key compare reads its start, a version set's view
    /// its end (see `prefetch_bytes`).
    pub fn prefetch_value(&self, partition: u32, hash: u64) {
        let mixed = Self::mix(partition, hash);
        let home = self.home(mixed);
        // The first slots of the probe run (those `prefetch_slot` loaded):
        // at the table's load limits most keys sit within them.
        for step in 0..PREFETCH_PROBE_SLOTS {
            let slot = &self.slots[(home + step) & self.mask];
            match &slot.value {
                None => return,
                Some(value) if slot.mixed == mixed => return prefetch_bytes(&value.record),
                Some(_) => {}
            }
        }
    }
}

/// The slot of `slots` (a power-of-two table) holding `key` of `partition`,
/// or the free slot where it would go. Terminates: at most 3/4 of the
/// slots are used, and a probe run ends at the first empty slot.
fn probe(slots: &[Slot], partition: u32, mixed: u32, key: &[u8]) -> Result<usize, usize> {
    let mask = slots.len() - 1;
    let mut i = mixed as usize & mask;
    loop {
        let slot = &slots[i];
        match &slot.value {
            None => return Err(i),
            Some(value) if slot.mixed == mixed && u32::from(slot.partition) == partition && value.key() == key => {
                return Ok(i)
            }
            Some(_) => i = (i + 1) & mask,
        }
    }
}

/// `prefetch_insert` treats a cache this close to its byte budget as
/// about to evict (exactness does not matter: a wrong guess wastes a
/// prefetch or leaves one miss serial).
const NEAR_FULL_MARGIN_BYTES: u64 = 8192;

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    /// A budget that fills while the table grows: eviction then takes its
    /// victims from the drain, and the cache stays within its budget and
    /// right about every key.
    #[test]
    fn eviction_during_a_drain_keeps_the_budget_and_the_values() {
        // Room for about 400 entries of ~84 bytes, and a table that could
        // grow far beyond that: the budget fills while the drain after the
        // doubling at 384 entries (to 1,024 slots) is under way.
        let mut cache = ValueCache::new(33_600, 8);
        let keys: Vec<Vec<u8>> = (0..3_000u32).map(|i| format!("k{i}").into_bytes()).collect();
        let mut evicted_while_draining = 0;
        for (n, key) in keys.iter().enumerate() {
            let (len_before, draining) = (cache.len(), cache.drain_left > 0);
            cache.insert(1, key_hash(key), key, &[n as u8; 16]);
            if draining && cache.len() <= len_before {
                evicted_while_draining += 1;
            }
            assert!(cache.weight() <= 33_600, "insert {n}: over budget");
            assert_eq!(cache.get(1, key_hash(key), key).as_deref(), Some(&[n as u8; 16][..]), "insert {n}");
            for (m, other) in keys[..=n].iter().enumerate().step_by(37) {
                if let Some(value) = cache.get(1, key_hash(other), other) {
                    assert_eq!(&*value, &[m as u8; 16][..], "key {m} after insert {n}");
                }
            }
            if n % 10 == 0 {
                let readable = keys[..=n].iter().filter(|k| cache.get(1, key_hash(k), k).is_some()).count();
                assert_eq!(readable, cache.len(), "insert {n}: the count of entries is off");
            }
        }
        assert!(evicted_while_draining > 0, "no eviction happened during a drain");
    }

    /// Growing moves entries a few at a time: every key stays readable at
    /// every step, each insert looks at no more than its share of the old
    /// table, and each drain ends before the next doubling needs it to.
    #[test]
    fn the_table_grows_a_few_entries_at_a_time() {
        let mut cache = ValueCache::new(1 << 30, 64);
        let keys: Vec<Vec<u8>> = (0..20_000u32).map(|i| format!("key-{i}").into_bytes()).collect();
        // Short of three quarters of the way to doubling, no next table.
        for key in &keys[..20] {
            cache.insert(0, key_hash(key), key, key);
        }
        assert_eq!(cache.next.capacity(), 0, "a next table for a cache that is not growing");
        for key in &keys[..20] {
            cache.invalidate(0, key_hash(key), key);
        }
        let mut doublings = 0;
        let mut inserts_while_draining = 0;
        for (n, key) in keys.iter().enumerate() {
            let (slots_before, left_before, prepared) = (cache.slots.len(), cache.drain_left, cache.next.len());
            cache.insert(n as u32 % 7, key_hash(key), key, key);
            if cache.slots.len() != slots_before {
                doublings += 1;
                assert_eq!(left_before, 0, "insert {n}: a doubling had to finish the last one's drain");
                // (The insert itself prepares a last few.)
                let due = 2 * slots_before - PREPARE_SLOTS_PER_INSERT;
                assert!(prepared >= due, "insert {n}: the next table was not ready");
            } else {
                assert!(
                    left_before - cache.drain_left <= DRAIN_SLOTS_PER_INSERT,
                    "insert {n} looked at too many slots"
                );
            }
            inserts_while_draining += usize::from(cache.drain_left > 0);
            // Every 101st key so far, and the last few, are readable.
            for m in (0..=n).step_by(101).chain(n.saturating_sub(8)..=n) {
                let got = cache.get(m as u32 % 7, key_hash(&keys[m]), &keys[m]);
                assert_eq!(got.as_deref(), Some(&keys[m][..]), "key {m} after insert {n}");
            }
        }
        assert!(doublings >= 8, "{doublings} doublings");
        assert!(inserts_while_draining > 1000, "{inserts_while_draining} inserts while draining");
        assert_eq!(cache.len(), keys.len());
        // Replacing and forgetting reach keys in either table.
        for (n, key) in keys.iter().enumerate().step_by(3) {
            cache.invalidate(n as u32 % 7, key_hash(key), key);
        }
        for (n, key) in keys.iter().enumerate() {
            let expected = (n % 3 != 0).then_some(&key[..]);
            assert_eq!(cache.get(n as u32 % 7, key_hash(key), key).as_deref(), expected, "key {n}");
        }
    }

    #[test]
    fn a_hit_needs_the_same_partition_and_key() {
        let mut cache = ValueCache::new(1 << 20, 128);
        let hash = key_hash(b"k");
        cache.insert(3, hash, b"k", b"v1");
        assert_eq!(cache.get(3, hash, b"k").as_deref(), Some(&b"v1"[..]));
        assert!(cache.get(4, hash, b"k").is_none());
        cache.insert(3, hash, b"k", b"v2");
        assert_eq!(cache.get(3, hash, b"k").as_deref(), Some(&b"v2"[..]));
        assert_eq!(cache.len(), 1);
        cache.invalidate(3, hash, b"k");
        assert!(cache.get(3, hash, b"k").is_none());
        assert!(cache.is_empty());
        assert_eq!(cache.weight(), 0);
    }

    #[test]
    fn an_overwrite_of_the_same_size_reuses_the_allocation_unless_a_reader_holds_it() {
        let mut cache = ValueCache::new(1 << 20, 128);
        let hash = key_hash(b"k");
        cache.insert(0, hash, b"k", b"v1");
        let first = cache.get(0, hash, b"k").expect("cached");
        let first_at = first.as_ptr();
        // A reader holds `first`: the overwrite takes a new allocation.
        cache.insert(0, hash, b"k", b"v2");
        assert_eq!(&*first, b"v1");
        let second_at = cache.get(0, hash, b"k").expect("cached").as_ptr();
        assert_ne!(second_at, first_at);
        drop(first);
        // No reader: same size, same allocation, new bytes.
        cache.insert(0, hash, b"k", b"v3");
        let third = cache.get(0, hash, b"k").expect("cached");
        assert_eq!((&*third, third.as_ptr()), (&b"v3"[..], second_at));
        drop(third);
        // Another size: a new allocation, and the weight follows.
        cache.insert(0, hash, b"k", b"longer");
        assert_eq!(cache.get(0, hash, b"k").as_deref(), Some(&b"longer"[..]));
        assert_eq!(cache.weight(), (1 + 6 + 64) as u64);
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn keys_with_equal_hashes_are_distinct_entries() {
        let mut cache = ValueCache::new(1 << 20, 128);
        let hash = key_hash(b"k");
        cache.place(0, hash, Value::new(b"other", b"x"));
        assert!(cache.get(0, hash, b"k").is_none());
        cache.place(0, hash, Value::new(b"k", b"v"));
        assert_eq!(cache.get(0, hash, b"k").as_deref(), Some(&b"v"[..]));
        assert_eq!(cache.get(0, hash, b"other").as_deref(), Some(&b"x"[..]));
        cache.invalidate(0, hash, b"other");
        assert_eq!(cache.get(0, hash, b"k").as_deref(), Some(&b"v"[..]));
    }

    #[test]
    fn the_cache_stays_within_its_byte_budget() {
        let mut cache = ValueCache::new(64 << 10, 128);
        for i in 0..10_000u32 {
            let key = i.to_le_bytes();
            cache.insert(0, key_hash(&key), &key, &[7; 100]);
            assert!(cache.weight() <= cache.weight_max, "weight {}", cache.weight());
        }
        // The table comes on top, bounded by the capacity.
        assert!(cache.slots.len() * 32 <= 64 << 10);
        assert!(!cache.is_empty());
    }

    #[test]
    fn a_value_read_since_the_last_sweep_outlives_one_that_was_not() {
        let mut cache = ValueCache::new(64 << 10, 128);
        let hot = b"hot";
        cache.insert(0, key_hash(hot), hot, &[1; 100]);
        for i in 0..10_000u32 {
            assert!(cache.get(0, key_hash(hot), hot).is_some(), "evicted after {i} inserts");
            let key = i.to_le_bytes();
            cache.insert(0, key_hash(&key), &key, &[7; 100]);
        }
        let cold = 0u32.to_le_bytes();
        assert!(cache.get(0, key_hash(&cold), &cold).is_none());
    }

    /// Longest and mean distance of the entries from their home slots.
    fn displacement(cache: &ValueCache) -> (usize, f64) {
        let distances: Vec<usize> = (0..cache.slots.len())
            .filter(|&at| cache.slots[at].value.is_some())
            .map(|at| at.wrapping_sub(cache.home(cache.slots[at].mixed)) & cache.mask)
            .collect();
        let mean = distances.iter().sum::<usize>() as f64 / distances.len().max(1) as f64;
        (distances.into_iter().max().unwrap_or(0), mean)
    }

    /// Eviction must not pack parts of the table: with a hand sweeping the
    /// slots in order, probe runs grew to tens of thousands of slots (mean
    /// displacement 170) and every insert and removal walked them.
    #[test]
    fn probe_runs_stay_short_under_steady_eviction() {
        let mut cache = ValueCache::new(4 << 20, 256);
        for i in 0..400_000u64 {
            let mut key = [0u8; 16];
            key[..8].copy_from_slice(&i.to_le_bytes());
            cache.insert((i % 256) as u32, key_hash(&key), &key, &[7; 100]);
        }
        assert!(cache.len() * 4 < 400_000, "the cache must have been evicting: {} entries", cache.len());
        let (longest, mean) = displacement(&cache);
        assert!(longest < 256 && mean < 2.0, "longest {longest}, mean {mean:.1}");
    }

    #[derive(Clone, Debug)]
    enum Op {
        Insert {
            partition: u32,
            key: u8,
            value_len: u8,
        },
        Invalidate {
            partition: u32,
            key: u8,
        },
        /// An insert through the in-place path, with few value lengths so
        /// that equal lengths recur; `hold` keeps a reader's clone across it.
        Overwrite {
            partition: u32,
            key: u8,
            value_len: u8,
            fill: u8,
            hold: bool,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0u32..3, 0u8..40, 0u8..100).prop_map(|(partition, key, value_len)| Op::Insert { partition, key, value_len }),
            1 => (0u32..3, 0u8..40).prop_map(|(partition, key)| Op::Invalidate { partition, key }),
            3 => (0u32..3, 0u8..40, 0u8..3, any::<u8>(), any::<bool>())
                .prop_map(|(partition, key, value_len, fill, hold)| Op::Overwrite { partition, key, value_len, fill, hold }),
        ]
    }

    /// A forged hash with many collisions, so probe runs are long, wrap
    /// around the table and cross each other.
    fn colliding_hash(key: u8) -> u64 {
        u64::from(key % 7) * 13 + 60
    }

    type Model = HashMap<(u32, u8), Vec<u8>>;

    /// Applies `op` to both the cache and the model of what it may hold.
    fn apply(cache: &mut ValueCache, model: &mut Model, op: Op) {
        match op {
            Op::Insert { partition, key, value_len } => {
                let value = vec![key ^ value_len; usize::from(value_len)];
                cache.place(partition, colliding_hash(key), Value::new(&[key], &value));
                model.insert((partition, key), value);
            }
            Op::Invalidate { partition, key } => {
                cache.invalidate(partition, colliding_hash(key), &[key]);
                model.remove(&(partition, key));
            }
            Op::Overwrite { partition, key, value_len, fill, hold } => {
                let value = vec![fill; usize::from(value_len)];
                let held = hold.then(|| cache.get(partition, colliding_hash(key), &[key])).flatten();
                let before = held.as_ref().map(|held| held.to_vec());
                cache.insert_any_hash(partition, colliding_hash(key), &[key], &value);
                // A reader's clone keeps the bytes it was given.
                assert_eq!(held.as_ref().map(|held| held.to_vec()), before);
                model.insert((partition, key), value);
            }
        }
    }

    proptest! {
        /// Without eviction (budget and table both large enough), the cache
        /// is exactly a map: deletions that shift probe runs lose nothing.
        #[test]
        fn without_eviction_it_is_a_map(ops in proptest::collection::vec(op(), 1..400)) {
            // 120 keys at most; sized for 128 items: 256 slots, a 256 KiB
            // budget.
            let mut cache = ValueCache::new(256 << 10, 2 << 10);
            let mut model = Model::new();
            for op in ops {
                apply(&mut cache, &mut model, op);
                for partition in 0..3 {
                    for key in 0..40u8 {
                        let got = cache.get(partition, colliding_hash(key), &[key]);
                        prop_assert_eq!(got.as_deref(), model.get(&(partition, key)).map(|v| &v[..]));
                    }
                }
                prop_assert_eq!(cache.len(), model.len());
            }
        }

        /// Under eviction: never a value that is not the key's latest, and
        /// always within budget.
        #[test]
        fn under_eviction_a_hit_is_always_the_latest_value(ops in proptest::collection::vec(op(), 1..400)) {
            let mut cache = ValueCache::new(4 << 10, 200);
            let mut model = Model::new();
            for op in ops {
                apply(&mut cache, &mut model, op);
                prop_assert!(cache.weight() <= cache.weight_max);
                prop_assert!(cache.len() <= cache.len_max);
                let mut held = 0;
                for partition in 0..3 {
                    for key in 0..40u8 {
                        if let Some(got) = cache.get(partition, colliding_hash(key), &[key]) {
                            held += 1;
                            prop_assert_eq!(Some(&got[..]), model.get(&(partition, key)).map(|v| &v[..]));
                        }
                    }
                }
                prop_assert_eq!(held, cache.len());
            }
        }
    }
}
