//! Dotted version vector sets (DVVSet; Almeida, Baquero et al., as in Riak
//! 2.0's `dvvset`): the causality of one key's versions. Pure logic, no I/O.
//!
//! A `VersionSet` holds, per actor (a node incarnation), the highest counter
//! seen and the values written at the latest dots of that actor that are not
//! yet superseded: `values[i]` has the dot (actor, counter - i). Values not
//! yet tagged with a dot (a client's new write before the coordinator's
//! event) are "anonymous". The version vector of the set (`join`) is the
//! causal context handed to clients.
//!
//! - A write with a context supersedes exactly the values whose dots the
//!   context covers; a write without one (a blind write) adds a sibling.
//!   Two blind writes through one node both survive (plain per-server
//!   vector clocks lose one of them or grow siblings without bound).
//! - `sync` merges two replicas' sets; it is commutative, associative and
//!   idempotent, and never drops a value unless the other side's counters
//!   prove that value was superseded.
//! - A delete is a write of a tombstone; a key whose every value is a
//!   tombstone reads as not found.

use rkyv::{Archive, Deserialize, Serialize};

/// A node incarnation (fresh for each data directory), the author of dots.
pub type Actor = u64;

/// One value with the metadata that travels with it.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
#[rkyv(derive(Debug))]
pub struct Sibling {
    pub value: Vec<u8>,
    pub tombstone: bool,
    /// Coordinator's wall clock at the write, milliseconds since the epoch.
    /// Never orders data: it only picks which sibling a last-writer-wins
    /// view (the Redis port's GET) shows.
    pub written_ms: u64,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Entry {
    pub actor: Actor,
    pub counter: u64,
    /// Newest first: `values[i]` has dot (actor, counter - i).
    pub values: Vec<Sibling>,
}

/// All versions of one key and their causality.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct VersionSet {
    /// Sorted by actor, actors unique.
    pub entries: Vec<Entry>,
    pub anonymous: Vec<Sibling>,
}

/// A version vector: the causal context a client reads and writes back.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Context(pub Vec<(Actor, u64)>);

impl Context {
    /// Fixed-width little-endian: count u32, then (actor u64, counter u64)s.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + 16 * self.0.len());
        out.extend_from_slice(&(self.0.len() as u32).to_le_bytes());
        for (actor, counter) in &self.0 {
            out.extend_from_slice(&actor.to_le_bytes());
            out.extend_from_slice(&counter.to_le_bytes());
        }
        out
    }

    /// Decodes; `None` for malformed bytes (empty bytes are the empty context).
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.is_empty() {
            return Some(Self::default());
        }
        let count = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
        if bytes.len() != 4 + 16 * count {
            return None;
        }
        let mut pairs: Vec<(Actor, u64)> = bytes[4..]
            .chunks_exact(16)
            .map(|c| (u64::from_le_bytes(c[..8].try_into().unwrap()), u64::from_le_bytes(c[8..].try_into().unwrap())))
            .collect();
        pairs.sort_unstable();
        pairs.dedup_by_key(|(a, _)| *a);
        Some(Self(pairs))
    }

    pub fn covers(&self, actor: Actor, counter: u64) -> bool {
        self.0.iter().any(|(a, c)| *a == actor && *c >= counter)
    }
}

/// Trims `values` (newest first, dots counter, counter-1, ...) to those whose
/// counter is above `floor`.
fn keep_above(counter: u64, values: &[Sibling], floor: u64) -> Vec<Sibling> {
    let keep = counter.saturating_sub(floor).min(values.len() as u64) as usize;
    values[..keep].to_vec()
}

/// Merges one actor's entries from two replicas (dvvset's `merge/5`).
fn merge_entry(actor: Actor, (n1, l1): (u64, &[Sibling]), (n2, l2): (u64, &[Sibling])) -> Entry {
    let (ll1, ll2) = (l1.len() as u64, l2.len() as u64);
    // A side with a higher counter saw every write of the other; of its own
    // values, keep those the other side has not proven superseded.
    if n1 >= n2 {
        if n1 - ll1 >= n2 - ll2 {
            Entry { actor, counter: n1, values: l1.to_vec() }
        } else {
            Entry { actor, counter: n1, values: keep_above(n1, l1, n2 - ll2) }
        }
    } else if n2 - ll2 >= n1 - ll1 {
        Entry { actor, counter: n2, values: l2.to_vec() }
    } else {
        Entry { actor, counter: n2, values: keep_above(n2, l2, n1 - ll1) }
    }
}

impl VersionSet {
    /// A client's write before it is tagged: `value` under `context`.
    pub fn from_context(context: &Context, value: Sibling) -> Self {
        let entries = context.0.iter().map(|&(actor, counter)| Entry { actor, counter, values: Vec::new() }).collect();
        Self { entries, anonymous: vec![value] }
    }

    /// Every value, anonymous ones first.
    pub fn values(&self) -> impl Iterator<Item = &Sibling> {
        self.anonymous.iter().chain(self.entries.iter().flat_map(|e| e.values.iter()))
    }

    /// Values with their dots (anonymous values have none).
    pub fn dotted_values(&self) -> impl Iterator<Item = (Option<(Actor, u64)>, &Sibling)> {
        self.anonymous.iter().map(|v| (None, v)).chain(
            self.entries.iter().flat_map(|e| {
                e.values.iter().enumerate().map(move |(i, v)| (Some((e.actor, e.counter - i as u64)), v))
            }),
        )
    }

    pub fn len(&self) -> usize {
        self.values().count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The version vector (what a client must send back to supersede
    /// everything it read).
    pub fn join(&self) -> Context {
        Context(self.entries.iter().map(|e| (e.actor, e.counter)).collect())
    }

    /// Whether every value is a tombstone (the key reads as not found).
    pub fn is_deleted(&self) -> bool {
        self.values().all(|v| v.tombstone)
    }

    /// True when `self` is strictly causally older than `other`
    /// (dvvset's `less/2`).
    pub fn less(&self, other: &Self) -> bool {
        greater(&other.entries, &self.entries)
    }

    /// Merges two replicas' sets.
    pub fn sync(&self, other: &Self) -> Self {
        if self == other {
            return self.clone();
        }
        let anonymous = if self.less(other) {
            other.anonymous.clone()
        } else if other.less(self) {
            self.anonymous.clone()
        } else {
            let mut merged = self.anonymous.clone();
            for v in &other.anonymous {
                if !merged.contains(v) {
                    merged.push(v.clone());
                }
            }
            merged
        };
        let mut entries = Vec::with_capacity(self.entries.len().max(other.entries.len()));
        let (mut a, mut b) = (self.entries.iter().peekable(), other.entries.iter().peekable());
        loop {
            match (a.peek(), b.peek()) {
                (Some(x), Some(y)) if x.actor == y.actor => {
                    entries.push(merge_entry(x.actor, (x.counter, &x.values), (y.counter, &y.values)));
                    a.next();
                    b.next();
                }
                (Some(x), Some(y)) if x.actor < y.actor => entries.push(a.next().cloned().expect("peeked")),
                (Some(_), Some(_)) => entries.push(b.next().cloned().expect("peeked")),
                (Some(_), None) => entries.push(a.next().cloned().expect("peeked")),
                (None, Some(_)) => entries.push(b.next().cloned().expect("peeked")),
                (None, None) => break,
            }
        }
        Self { entries, anonymous }
    }

    /// The coordinator's update: the client's write (`from_context`) is
    /// merged with the stored set and tagged with a new dot of `actor`.
    /// Values the context covers are superseded; the rest stay as siblings.
    pub fn update(client: &Self, server: &Self, actor: Actor) -> Self {
        assert_eq!(client.anonymous.len(), 1, "a client write carries exactly one value");
        let value = client.anonymous[0].clone();
        let context_only = Self { entries: client.entries.clone(), anonymous: Vec::new() };
        let synced = context_only.sync(server);
        Self { entries: event(synced.entries, actor, value), anonymous: synced.anonymous }
    }

    /// Applies a client's write with `context` to the stored set (if any).
    pub fn write(stored: Option<&Self>, context: &Context, value: Sibling, actor: Actor) -> Self {
        let client = Self::from_context(context, value);
        Self::update(&client, stored.unwrap_or(&Self::default()), actor)
    }

    /// The value a last-writer-wins reader sees: the newest by coordinator
    /// clock, ties broken by dot, so that every replica picks the same.
    pub fn last_written(&self) -> Option<&Sibling> {
        self.dotted_values().max_by_key(|(dot, v)| (v.written_ms, *dot)).map(|(_, v)| v)
    }
}

impl ArchivedVersionSet {
    /// Values with their dots, read in place.
    fn archived_values(&self) -> impl Iterator<Item = (Option<(Actor, u64)>, &ArchivedSibling)> {
        self.anonymous.iter().map(|v| (None, v)).chain(self.entries.iter().flat_map(|e| {
            let (actor, counter) = (e.actor.to_native(), e.counter.to_native());
            e.values.iter().enumerate().map(move |(i, v)| (Some((actor, counter - i as u64)), v))
        }))
    }

    /// `VersionSet::last_written`, without deserializing.
    pub fn last_written(&self) -> Option<&ArchivedSibling> {
        self.archived_values().max_by_key(|(dot, v)| (v.written_ms.to_native(), *dot)).map(|(_, v)| v)
    }

    pub fn is_deleted(&self) -> bool {
        self.archived_values().all(|(_, v)| v.tombstone)
    }

    pub fn join(&self) -> Context {
        Context(self.entries.iter().map(|e| (e.actor.to_native(), e.counter.to_native())).collect())
    }

    /// A write superseding every version here (its context is this set's
    /// version vector): the result keeps only the counters, plus `value` at
    /// a new dot of `actor`. Equal to `VersionSet::write(Some(self),
    /// &self.join(), value, actor)`, without copying the old values.
    pub fn overwrite(&self, value: Sibling, actor: Actor) -> VersionSet {
        let entries = self
            .entries
            .iter()
            .map(|e| Entry { actor: e.actor.to_native(), counter: e.counter.to_native(), values: Vec::new() })
            .collect();
        VersionSet { entries: event(entries, actor, value), anonymous: Vec::new() }
    }
}

/// `event/3`: a new dot of `actor` for `value` on top of `entries`.
fn event(mut entries: Vec<Entry>, actor: Actor, value: Sibling) -> Vec<Entry> {
    match entries.binary_search_by_key(&actor, |e| e.actor) {
        Ok(i) => {
            let e = &mut entries[i];
            e.counter += 1;
            e.values.insert(0, value);
        }
        Err(i) => entries.insert(i, Entry { actor, counter: 1, values: vec![value] }),
    }
    entries
}

/// `greater/3` of dvvset: whether `a`'s counters dominate `b`'s strictly.
fn greater(a: &[Entry], b: &[Entry]) -> bool {
    let (mut i, mut j, mut strict) = (0, 0, false);
    loop {
        match (a.get(i), b.get(j)) {
            (None, None) => return strict,
            (Some(_), None) => return true,
            (None, Some(_)) => return false,
            (Some(x), Some(y)) if x.actor == y.actor => {
                if x.counter < y.counter {
                    return false;
                }
                strict |= x.counter > y.counter;
                i += 1;
                j += 1;
            }
            (Some(x), Some(y)) if x.actor < y.actor => {
                strict = true;
                i += 1;
            }
            _ => return false,
        }
    }
}

/// Stored and shipped form: a 16-byte header (magic, format version) then the
/// rkyv archive of a `VersionSet` (16-byte aligned after the header).
pub mod encoding {
    use super::{ArchivedVersionSet, VersionSet};

    pub const MAGIC: [u8; 6] = *b"RKVDVV";
    pub const FORMAT_VERSION: u16 = 1;
    pub const HEADER_BYTES: usize = 16;

    /// Why bytes are not a version set.
    #[derive(Debug, thiserror::Error)]
    pub enum DecodeError {
        #[error("version set bytes too short")]
        Truncated,
        #[error("not a version set (bad magic)")]
        BadMagic,
        #[error("version set format {found}, this build reads {FORMAT_VERSION}")]
        UnsupportedVersion { found: u16 },
        #[error("version set archive invalid: {0}")]
        Invalid(String),
    }

    pub fn encode(set: &VersionSet) -> Vec<u8> {
        let archived = rkyv::to_bytes::<rkyv::rancor::Error>(set).expect("serializing to memory cannot fail");
        let mut out = Vec::with_capacity(HEADER_BYTES + archived.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&[0u8; 8]);
        out.extend_from_slice(&archived);
        out
    }

    fn archive(bytes: &[u8]) -> Result<&[u8], DecodeError> {
        if bytes.len() < HEADER_BYTES {
            return Err(DecodeError::Truncated);
        }
        if bytes[..6] != MAGIC {
            return Err(DecodeError::BadMagic);
        }
        let version = u16::from_le_bytes([bytes[6], bytes[7]]);
        if version != FORMAT_VERSION {
            return Err(DecodeError::UnsupportedVersion { found: version });
        }
        Ok(&bytes[HEADER_BYTES..])
    }

    /// Validates bytes (from the network or disk) and gives a zero-copy view.
    /// The archive must be 16-byte aligned: copy into an aligned buffer if
    /// it may not be (`decode` does).
    pub fn access(bytes: &[u8]) -> Result<&ArchivedVersionSet, DecodeError> {
        validate(archive(bytes)?)
    }

    /// Validates an aligned archive. A version set holds no shared
    /// pointers, so rkyv's low-level validator (bounds, alignment, layout)
    /// checks all there is, without the high-level one's shared-pointer
    /// registry.
    fn validate(body: &[u8]) -> Result<&ArchivedVersionSet, DecodeError> {
        rkyv::api::low::access::<ArchivedVersionSet, rkyv::rancor::BoxedError>(body)
            .map_err(|e| DecodeError::Invalid(e.to_string()))
    }

    /// Encodes into `out` (cleared first), reusing its allocation: the
    /// header, then the archive (which rkyv aligns relative to the buffer
    /// start, so it stays 16-byte aligned after the 16-byte header).
    pub fn encode_into(set: &VersionSet, out: &mut rkyv::util::AlignedVec<16>) {
        out.clear();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&[0u8; 8]);
        let writer = std::mem::take(out);
        *out = rkyv::api::high::to_bytes_in::<_, rkyv::rancor::Error>(set, writer)
            .expect("serializing to memory cannot fail");
    }

    /// Runs `f` on a validated zero-copy view of `bytes`, copying into an
    /// aligned buffer first only if `bytes` is not 16-byte aligned.
    pub fn with_view<T>(bytes: &[u8], f: impl FnOnce(&ArchivedVersionSet) -> T) -> Result<T, DecodeError> {
        let body = archive(bytes)?;
        if (body.as_ptr() as usize).is_multiple_of(16) {
            return access(bytes).map(f);
        }
        let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(body.len());
        aligned.extend_from_slice(body);
        let archived = validate(&aligned)?;
        Ok(f(archived))
    }

    /// Validates and deserializes, whatever the alignment of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<VersionSet, DecodeError> {
        let body = archive(bytes)?;
        let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(body.len());
        aligned.extend_from_slice(body);
        let archived = validate(&aligned)?;
        rkyv::deserialize::<VersionSet, rkyv::rancor::BoxedError>(archived)
            .map_err(|e| DecodeError::Invalid(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    fn v(s: &str) -> Sibling {
        Sibling { value: s.as_bytes().to_vec(), tombstone: false, written_ms: 0 }
    }

    fn names(set: &VersionSet) -> BTreeSet<String> {
        set.values().map(|s| String::from_utf8(s.value.clone()).unwrap()).collect()
    }

    #[test]
    fn blind_writes_through_one_node_both_survive() {
        let a = VersionSet::write(None, &Context::default(), v("x"), 1);
        let b = VersionSet::write(Some(&a), &Context::default(), v("y"), 1);
        assert_eq!(names(&b), ["x", "y"].map(String::from).into());
    }

    #[test]
    fn a_write_with_context_supersedes_exactly_what_it_read() {
        let a = VersionSet::write(None, &Context::default(), v("x"), 1);
        let read = a.join();
        let b = VersionSet::write(Some(&a), &Context::default(), v("y"), 1); // concurrent
        let c = VersionSet::write(Some(&b), &read, v("z"), 1);
        assert_eq!(names(&c), ["y", "z"].map(String::from).into(), "x superseded, y concurrent");
        let d = VersionSet::write(Some(&c), &c.join(), v("w"), 1);
        assert_eq!(names(&d), ["w"].map(String::from).into());
    }

    #[test]
    fn a_delete_with_context_reads_as_not_found() {
        let a = VersionSet::write(None, &Context::default(), v("x"), 7);
        let tomb = Sibling { value: Vec::new(), tombstone: true, written_ms: 1 };
        let d = VersionSet::write(Some(&a), &a.join(), tomb, 7);
        assert!(d.is_deleted());
        let e = VersionSet::write(Some(&d), &Context::default(), v("back"), 7);
        assert!(!e.is_deleted());
    }

    /// riak_test's pattern: two clients interleave read-resolve-write on one
    /// key through one node; each resolves by union of what it read.
    #[test]
    fn interleaved_read_resolve_write_keeps_at_most_two_siblings_and_every_write() {
        let mut stored: Option<VersionSet> = None;
        let mut reads: [(Context, BTreeSet<String>); 2] = Default::default();
        let mut written = BTreeSet::new();
        for round in 0..100 {
            for read in reads.iter_mut() {
                // Read (both clients read before either writes: interleaving).
                let set = stored.clone().unwrap_or_default();
                *read = (set.join(), set.values().flat_map(|s| decode_items(&s.value)).collect());
            }
            for (client, (context, seen)) in reads.iter().enumerate() {
                let item = format!("c{client}-r{round}");
                written.insert(item.clone());
                let mut items = seen.clone();
                items.insert(item);
                let value = Sibling { value: encode_items(&items), tombstone: false, written_ms: 0 };
                stored = Some(VersionSet::write(stored.as_ref(), context, value, 42));
                assert!(stored.as_ref().unwrap().len() <= 2, "sibling explosion at round {round}");
            }
        }
        let held: BTreeSet<String> = stored.unwrap().values().flat_map(|s| decode_items(&s.value)).collect();
        assert_eq!(held, written, "a write was lost");
    }

    fn encode_items(items: &BTreeSet<String>) -> Vec<u8> {
        items.iter().cloned().collect::<Vec<_>>().join(",").into_bytes()
    }

    fn decode_items(bytes: &[u8]) -> Vec<String> {
        String::from_utf8(bytes.to_vec()).unwrap().split(',').filter(|s| !s.is_empty()).map(String::from).collect()
    }

    #[test]
    fn archived_views_agree_with_owned_sets() {
        let a = VersionSet::write(None, &Context::default(), v("x"), 3);
        let mut b = VersionSet::write(
            Some(&a),
            &Context::default(),
            Sibling { value: b"y".to_vec(), tombstone: false, written_ms: 5 },
            9,
        );
        b = VersionSet::write(
            Some(&b),
            &Context::default(),
            Sibling { value: b"z".to_vec(), tombstone: true, written_ms: 7 },
            3,
        );
        let mut buf = rkyv::util::AlignedVec::<16>::new();
        encoding::encode_into(&b, &mut buf);
        assert_eq!(encoding::decode(&buf).unwrap(), b);
        encoding::with_view(&buf, |view| {
            assert_eq!(view.join(), b.join());
            assert_eq!(view.is_deleted(), b.is_deleted());
            let last = view.last_written().unwrap();
            assert_eq!(last.value.as_slice(), b.last_written().unwrap().value.as_slice());
            let new = Sibling { value: b"w".to_vec(), tombstone: false, written_ms: 9 };
            assert_eq!(view.overwrite(new.clone(), 4), VersionSet::write(Some(&b), &b.join(), new, 4));
        })
        .unwrap();
        // A misaligned copy is viewed through an aligned copy.
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(&buf);
        assert_eq!(encoding::with_view(&shifted[1..], |v| v.join()).unwrap(), b.join());
    }

    #[test]
    fn encoding_round_trips_and_refuses_foreign_bytes() {
        let a = VersionSet::write(None, &Context::default(), v("x"), 3);
        let b = VersionSet::write(Some(&a), &Context::default(), v("y"), 9);
        let bytes = encoding::encode(&b);
        assert_eq!(encoding::decode(&bytes).unwrap(), b);
        let mut aligned = rkyv::util::AlignedVec::<16>::new();
        aligned.extend_from_slice(&bytes);
        assert_eq!(encoding::access(&aligned).unwrap().entries.len(), 2);
        assert!(matches!(encoding::decode(b"not a version set!!"), Err(encoding::DecodeError::BadMagic)));
        let mut future = bytes.clone();
        future[6] = 2;
        assert!(matches!(encoding::decode(&future), Err(encoding::DecodeError::UnsupportedVersion { found: 2 })));
        let mut garbage = bytes.clone();
        let last = garbage.len() - 4;
        garbage[last..].copy_from_slice(&[0xff; 4]);
        assert!(encoding::decode(&garbage).is_err());
        assert_eq!(Context::decode(&b.join().encode()), Some(b.join()));
        assert_eq!(Context::decode(&[1, 2, 3]), None);
    }

    /// Validation is what stands between stored or received bytes and a
    /// view that follows their relative pointers: no corruption of a
    /// pointer or length may yield a view that reads out of bounds.
    #[test]
    fn every_corrupted_byte_is_refused_or_reads_within_bounds() {
        let a = VersionSet::write(None, &Context::default(), v("x"), 3);
        let b = VersionSet::write(Some(&a), &Context::default(), v("yy"), 9);
        let bytes = encoding::encode(&b);
        let mut refused = 0;
        for at in encoding::HEADER_BYTES..bytes.len() {
            for bad in [0x00, 0x7f, 0xff] {
                let mut corrupt = bytes.clone();
                if corrupt[at] == bad {
                    continue;
                }
                corrupt[at] = bad;
                match encoding::with_view(&corrupt, |view| {
                    view.archived_values().map(|(_, s)| s.value.len()).sum::<usize>()
                }) {
                    Ok(total) => assert!(total <= corrupt.len(), "byte {at} = {bad:#x}: a view past the end"),
                    Err(_) => refused += 1,
                }
            }
        }
        assert!(refused > 0, "some corruptions must be refused");
    }

    /// A random history: replicas (actors) take client writes with contexts
    /// read earlier from any replica, and sync with each other. Records every
    /// write's dot and the context it was written under.
    #[derive(Debug, Clone)]
    enum Op {
        Read { replica: usize },
        Write { replica: usize, read: usize },
        Sync { from: usize, to: usize },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..3usize).prop_map(|replica| Op::Read { replica }),
            (0..3usize, 0..8usize).prop_map(|(replica, read)| Op::Write { replica, read }),
            (0..3usize, 0..3usize).prop_map(|(from, to)| Op::Sync { from, to }),
        ]
    }

    struct History {
        replicas: Vec<VersionSet>,
        /// Written dot -> the context it was written with.
        writes: BTreeMap<(Actor, u64), Context>,
        contexts_written: Vec<Context>,
    }

    fn run(ops: &[Op]) -> History {
        let mut h =
            History { replicas: vec![VersionSet::default(); 3], writes: BTreeMap::new(), contexts_written: Vec::new() };
        let mut reads: Vec<Context> = vec![Context::default()];
        for (n, op) in ops.iter().enumerate() {
            match *op {
                Op::Read { replica } => reads.push(h.replicas[replica].join()),
                Op::Write { replica, read } => {
                    let context = reads[read % reads.len()].clone();
                    let actor = replica as Actor + 1;
                    let value = Sibling { value: format!("w{n}").into_bytes(), tombstone: false, written_ms: n as u64 };
                    let next = VersionSet::write(Some(&h.replicas[replica]), &context, value, actor);
                    let dot = (actor, next.entries.iter().find(|e| e.actor == actor).unwrap().counter);
                    h.writes.insert(dot, context.clone());
                    h.contexts_written.push(context);
                    h.replicas[replica] = next;
                }
                Op::Sync { from, to } => h.replicas[to] = h.replicas[to].sync(&h.replicas[from]),
            }
        }
        h
    }

    type Normalized = (Vec<(Actor, u64, Vec<Sibling>)>, BTreeSet<Vec<u8>>);

    fn normalized(s: &VersionSet) -> Normalized {
        (
            s.entries.iter().map(|e| (e.actor, e.counter, e.values.clone())).collect(),
            s.anonymous.iter().map(|v| v.value.clone()).collect(),
        )
    }

    proptest! {
        #[test]
        fn sync_is_commutative_associative_idempotent(ops in proptest::collection::vec(op(), 0..40)) {
            let h = run(&ops);
            let [a, b, c] = [&h.replicas[0], &h.replicas[1], &h.replicas[2]];
            prop_assert_eq!(normalized(&a.sync(b)), normalized(&b.sync(a)));
            prop_assert_eq!(normalized(&a.sync(b).sync(c)), normalized(&a.sync(&b.sync(c))));
            prop_assert_eq!(normalized(&a.sync(a)), normalized(a));
        }

        #[test]
        fn siblings_form_an_antichain(ops in proptest::collection::vec(op(), 0..40)) {
            let h = run(&ops);
            for replica in &h.replicas {
                let dots: Vec<(Actor, u64)> = replica.dotted_values().filter_map(|(d, _)| d).collect();
                for d1 in &dots {
                    for d2 in &dots {
                        // No value is in the causal past of another present value.
                        prop_assert!(d1 == d2 || !h.writes[d2].covers(d1.0, d1.1), "{:?} covers {:?}", d2, d1);
                    }
                }
            }
        }

        #[test]
        fn no_dot_disappears_unless_a_covering_context_was_written(ops in proptest::collection::vec(op(), 0..40)) {
            let h = run(&ops);
            let all = h.replicas.iter().skip(1).fold(h.replicas[0].clone(), |acc, r| acc.sync(r));
            let present: BTreeSet<(Actor, u64)> = all.dotted_values().filter_map(|(d, _)| d).collect();
            for dot in h.writes.keys() {
                let covered = h.contexts_written.iter().any(|c| c.covers(dot.0, dot.1));
                prop_assert!(present.contains(dot) || covered, "dot {:?} lost", dot);
            }
        }
    }
}
