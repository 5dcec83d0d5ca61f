//! One shard (core): executes requests for the partitions it owns, routes
//! the others to their owners in batches, and serves batches sent by other
//! shards. Everything here runs on the shard's own executor.
//!
//! A write is a read-modify-write of the key's version set (DVVSet): read
//! the stored set, apply the write with its causal context and a new dot of
//! this node's actor, store the result. Writes to one key are serialized by
//! a striped lock, held until the write is in the open commit batch; in
//! `group` mode the key is then *pending* until durable, and a second writer
//! builds on it only within the same commit batch (see `write_base`), so a
//! second writer always builds on the first one's result and never on a
//! write that could still fail in another batch.
//!
//! A batch of operations has the effects of running them in order
//! (`execute_batch`); in `group` mode it runs in two passes so that its
//! writes share commit batches without one allocation per operation. Either
//! way it prefetches the lookups of the next operations while one runs
//! (`prefetch_ahead`).
//!
//! Routing works in turns: a connection parses everything it has received,
//! and `Dispatch` groups the operations by owning shard: one batch runs
//! here, every other one travels as one message over a bounded channel (so
//! a cross-core hop is paid per batch, not per request), and the replies
//! come back in request order. Each operation carries its partition as the
//! router computed it (`Route`), so the key is hashed with SHA-1 once.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use futures::channel::oneshot;

use crate::config::Config;
use crate::logic::dvv::{encoding, Actor, Context, Sibling, VersionSet};
use crate::logic::ring::{partition_of, shard_of};
use crate::protocol::frame::{Opcode, Status};
use crate::protocol::messages::{batch, decode_request, NodeStatus, Request};
use crate::runtime::DmaDisk;
use crate::storage::cache::key_hash;
use crate::storage::sync::Notify;
use crate::storage::{Queued, ShardStore, StorageError, TryPut, Value};

/// Peer-only operations (the Redis port's semantics); refused from clients.
pub mod internal {
    /// Public: `Opcode::Overwrite` (Redis SET).
    pub const OVERWRITE: u8 = crate::protocol::frame::Opcode::Overwrite as u8;
    /// Public: `Opcode::DeleteAll` (Redis DEL).
    pub const DELETE_ALL: u8 = crate::protocol::frame::Opcode::DeleteAll as u8;
    /// key: the last-written sibling's value (Redis GET).
    pub const GET_LATEST: u8 = 0x82;
    /// key: Ok if a live value exists (Redis EXISTS).
    pub const EXISTS: u8 = 0x83;

    pub fn is_internal(opcode: u8) -> bool {
        opcode >= 0x80
    }
}

/// What one shard sends another.
pub enum PeerMessage {
    /// A batch of requests, and where to send the replies.
    Batch {
        body: Vec<u8>,
        /// Each operation's partition, as routed (see `Route`).
        partitions: Vec<u32>,
        /// The request buffers come back with the replies, for reuse.
        reply: oneshot::Sender<BatchDone>,
    },
    /// An idle Redis-protocol connection to serve from now on (see
    /// `balance`): nothing read ahead, nothing in flight.
    RedisConnection(std::os::fd::OwnedFd),
}

/// A batch's request buffers (for reuse) and its replies.
pub type BatchDone = (Vec<u8>, Vec<u32>, Vec<u8>);

/// Where an operation runs: the owning shard, and the partition its key
/// hashes to (SHA-1 of the key, computed once by the router and carried
/// with the operation; `NO_PARTITION` for operations without a key).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub shard: u32,
    pub partition: u32,
}

/// The partition of an operation that has no key.
pub const NO_PARTITION: u32 = u32::MAX;

const LOCK_STRIPES: usize = 256;

/// Counters of a shard's request handling.
#[derive(Clone, Copy, Debug, Default)]
pub struct ShardStats {
    pub requests: u64,
    pub forwarded_batches: u64,
    pub connections_refused: u64,
    /// Redis connections handed to other shards, and taken from them (see
    /// `balance`).
    pub connections_handed_over: u64,
    pub connections_taken_over: u64,
}

pub struct Shard {
    pub index: u32,
    pub shard_count: u32,
    pub partition_count: u32,
    pub actor: Actor,
    pub store: ShardStore<DmaDisk>,
    pub config: Rc<Config>,
    pub peers: Vec<async_channel::Sender<PeerMessage>>,
    locks: Box<[futures::lock::Mutex<()>]>,
    /// Reused by writes to encode version sets.
    encode_buffer: Cell<rkyv::util::AlignedVec<16>>,
    /// Keys with a write not yet durable (group mode), see `write`.
    /// Each entry's `bytes` holds the key (see `Value`), so an entry costs
    /// one allocation.
    pending: RefCell<hashbrown::HashTable<Pending>>,
    /// The completion shared by the pending writes of the open commit batch
    /// (they succeed or fail together), by batch sequence number.
    open_batch_done: RefCell<Option<(u64, Rc<PendingDone>)>>,
    pub stats: RefCell<ShardStats>,
    /// Set when the node is stopping: stop accepting and reading.
    pub stopping: Cell<bool>,
    pub stop: Notify,
    pub connections: Cell<usize>,
    pub connection_closed: Notify,
    /// Which shard serves a Redis connection (see `balance`).
    pub balancer: crate::balance::Balancer,
    pub client_port: u16,
    pub redis_port: u16,
    /// Replies waiting to leave in a burst (see `outbox`).
    pub outbox: Rc<crate::outbox::Outbox>,
    /// Fault injection for supervision tests (debug builds only): a request
    /// for this key panics the shard that executes it.
    #[cfg(debug_assertions)]
    fault_panic_key: Option<Vec<u8>>,
    /// Fault injection for handoff tests (debug builds only): every idle
    /// Redis connection moves to the next shard after each turn.
    #[cfg(debug_assertions)]
    fault_handoff_every_turn: bool,
}

fn status_of(error: &StorageError) -> Status {
    match error {
        StorageError::KeyTooLarge { .. } => Status::KeyTooLarge,
        StorageError::ValueTooLarge { .. } => Status::ValueTooLarge,
        StorageError::EmptyKey => Status::BadRequest,
        StorageError::StorageFull { .. } => Status::StorageFull,
        StorageError::Unhealthy { .. } | StorageError::Closed => Status::Unavailable,
        _ => Status::Internal,
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// What a write does to a key's version set.
enum WriteKind<'a> {
    /// A value (or tombstone) under a context; no context: supersede
    /// everything this node holds. The value stays in the request buffer
    /// until the new version set is built (one copy, not two).
    Value { context: Option<Context>, value: &'a [u8], tombstone: bool },
    /// A tombstone superseding everything, only if a live value exists.
    DeleteIfLive,
}

/// A write in a commit batch that is not durable yet (group mode).
struct Pending {
    bytes: Value,
    batch: u64,
    done: Rc<PendingDone>,
}

#[derive(Default)]
struct PendingDone {
    finished: Cell<bool>,
    notify: Notify,
}

/// A pending write as the base of another write to the same key.
enum PendingBase {
    /// In the open commit batch: build on it.
    Open(Value),
    /// In a batch being written: wait until it is settled.
    Wait(Rc<PendingDone>),
    /// None pending (or settled): the store has the base.
    None,
}

/// A failed operation: its status and a message for the reply body.
struct Fail {
    status: Status,
    message: String,
}

impl Fail {
    fn new(status: Status, message: impl Into<String>) -> Self {
        Self { status, message: message.into() }
    }

    /// Writes the failure as a reply body; gives its status.
    fn reply(self, out: &mut Vec<u8>) -> Status {
        out.extend_from_slice(self.message.as_bytes());
        self.status
    }
}

/// What a read answers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ReadKind {
    /// Every sibling and the context (`Opcode::Get`).
    Versions,
    /// The last-written live sibling's value (Redis GET).
    Latest,
    /// Whether a live value exists (Redis EXISTS).
    Exists,
}

/// How a write's outcome is replied.
#[derive(Clone, Copy)]
enum WriteReply {
    /// The new causal context (PUT, DELETE).
    Context,
    /// Nothing (Redis SET).
    Empty,
    /// 1 if a live value was deleted, else 0 (Redis DEL).
    Deleted,
}

impl WriteReply {
    /// `written`: the new context (empty unless this reply needs it);
    /// `None` when nothing was written.
    fn write(self, written: Option<&[u8]>, out: &mut Vec<u8>) -> Status {
        match self {
            Self::Context => out.extend_from_slice(written.unwrap_or_default()),
            Self::Empty => {}
            Self::Deleted => out.push(u8::from(written.is_some())),
        }
        Status::Ok
    }
}

/// A decoded, checked operation.
enum Op<'a> {
    Ping(&'a [u8]),
    Status,
    Read { key: &'a [u8], partition: u32, kind: ReadKind },
    Write { key: &'a [u8], partition: u32, kind: WriteKind<'a>, reply: WriteReply },
}

impl<'a> Op<'a> {
    fn key(&self) -> Option<&'a [u8]> {
        match self {
            Self::Read { key, .. } | Self::Write { key, .. } => Some(key),
            Self::Ping(_) | Self::Status => None,
        }
    }
}

/// A write in the open commit batch; what is left is to wait until durable.
struct Enqueued<'a> {
    queued: Queued<'a, DmaDisk>,
    /// The key's `key_hash`.
    hash: u64,
    /// Its batch's completion in `Shard::pending` (group mode).
    done: Option<Rc<PendingDone>>,
    /// The new causal context, if the reply needs it.
    context: Vec<u8>,
}

/// One try of a write.
enum Attempt<'a> {
    /// Nothing to write: a delete found no live value.
    Nothing,
    /// The commit batch or the buffers are full.
    WouldWait,
    Enqueued(Enqueued<'a>),
}

/// An operation after `Shard::execute_now`.
enum Now<'a> {
    /// Answered; the reply body is written.
    Done(Status),
    /// In the open commit batch; replied once durable.
    Write { enqueued: Enqueued<'a>, reply: WriteReply },
    /// Must wait for something besides its own durability.
    Later,
}

/// What is left of a batch's operation after the first pass (see
/// `Shard::execute_batch_group`).
enum Plan<'s, 'b> {
    Write { enqueued: Enqueued<'s>, reply: WriteReply, key: Option<&'b [u8]> },
    Later { opcode: u8, body: &'b [u8], partition: u32, key: Option<&'b [u8]> },
}

impl<'b> Plan<'_, 'b> {
    fn key(&self) -> Option<&'b [u8]> {
        match self {
            Self::Write { key, .. } | Self::Later { key, .. } => *key,
        }
    }
}

/// What an earlier operation of a batch did to a key.
#[derive(Clone, Copy, Default)]
struct Touched {
    written: bool,
    deferred: bool,
}

impl Shard {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        index: u32,
        shard_count: u32,
        actor: Actor,
        store: ShardStore<DmaDisk>,
        config: Rc<Config>,
        peers: Vec<async_channel::Sender<PeerMessage>>,
        client_port: u16,
        redis_port: u16,
        balancer: crate::balance::Balancer,
    ) -> Self {
        Self {
            index,
            shard_count,
            partition_count: config.node.partition_count,
            actor,
            store,
            peers,
            locks: (0..LOCK_STRIPES).map(|_| futures::lock::Mutex::new(())).collect(),
            encode_buffer: Cell::new(rkyv::util::AlignedVec::new()),
            pending: RefCell::new(hashbrown::HashTable::new()),
            open_batch_done: RefCell::new(None),
            stats: RefCell::new(ShardStats::default()),
            stopping: Cell::new(false),
            stop: Notify::default(),
            connections: Cell::new(0),
            connection_closed: Notify::default(),
            balancer,
            outbox: crate::outbox::Outbox::new(config.node.reply_burst_max),
            config,
            client_port,
            redis_port,
            #[cfg(debug_assertions)]
            fault_panic_key: std::env::var_os("RINGKV_FAULT_PANIC_KEY").map(|k| k.into_encoded_bytes()),
            #[cfg(debug_assertions)]
            fault_handoff_every_turn: std::env::var_os("RINGKV_FAULT_HANDOFF_EVERY_TURN").is_some(),
        }
    }

    /// The shard an idle Redis connection of this shard, whose last turn
    /// ran `operations` key operations, should move to now, if any (see
    /// `balance`).
    pub fn redis_handoff_target(&self, operations: usize) -> Option<u32> {
        #[cfg(debug_assertions)]
        if self.fault_handoff_every_turn && self.shard_count > 1 {
            return Some((self.index + 1) % self.shard_count);
        }
        if operations < self.config.node.connection_balance_operations_min {
            return None;
        }
        self.balancer.take_move()
    }

    pub fn partition(&self, key: &[u8]) -> u32 {
        partition_of(key, self.partition_count)
    }

    /// Where an operation on `key` runs.
    pub fn route(&self, key: &[u8]) -> Route {
        let partition = self.partition(key);
        Route { shard: shard_of(partition, self.shard_count), partition }
    }

    /// Where an operation without a key runs: here.
    pub fn here(&self) -> Route {
        Route { shard: self.index, partition: NO_PARTITION }
    }

    fn check_key(&self, key: &[u8]) -> Result<(), Fail> {
        if key.is_empty() {
            return Err(Fail::new(Status::BadRequest, "empty key"));
        }
        let limit = self.config.storage.key_bytes_max;
        if key.len() > limit {
            return Err(Fail::new(
                Status::KeyTooLarge,
                format!("key of {} bytes is over the limit of {limit}", key.len()),
            ));
        }
        Ok(())
    }

    /// The stored bytes of a key's version set.
    async fn read_raw(&self, partition: u32, key: &[u8]) -> Result<Option<Value>, Fail> {
        self.store.get(partition, key).await.map_err(|e| Fail::new(status_of(&e), e.to_string()))
    }

    /// Rejects a write over the limits before anything else happens.
    fn check_write(&self, key: &[u8], kind: &WriteKind<'_>) -> Result<(), Fail> {
        self.check_key(key)?;
        if let WriteKind::Value { value, tombstone: false, .. } = kind {
            if value.len() > self.config.node.value_bytes_max {
                let limit = self.config.node.value_bytes_max;
                return Err(Fail::new(
                    Status::ValueTooLarge,
                    format!("value of {} bytes is over the limit of {limit}", value.len()),
                ));
            }
        }
        Ok(())
    }

    /// The stripe lock of the key whose `key_hash` is `hash`.
    fn lock_of(&self, hash: u64) -> &futures::lock::Mutex<()> {
        &self.locks[(hash as usize) % LOCK_STRIPES]
    }

    /// The version set a write to `key` builds on.
    ///
    /// In `group` mode a write is visible only once durable, so the key lock
    /// would have to be held across the fdatasync and a hot key would take
    /// one write per commit batch (a convoy under zipfian load). Instead the
    /// lock is held only until the write is in the open batch, and the key
    /// is noted as pending: a later writer builds on a pending write only if
    /// it is still in the open batch (then both share one fdatasync and
    /// succeed or fail together); otherwise it waits for that write to be
    /// durable and reads the stored state. No write ever builds on one that
    /// could still fail in another batch.
    async fn write_base(&self, partition: u32, key: &[u8], hash: u64) -> Result<Option<Value>, Fail> {
        loop {
            match self.pending_base(key, hash) {
                PendingBase::Open(bytes) => return Ok(Some(bytes)),
                PendingBase::Wait(done) => {
                    let listen = done.notify.listen();
                    if !done.finished.get() {
                        listen.await;
                    }
                }
                PendingBase::None => return self.read_raw(partition, key).await,
            }
        }
    }

    /// `write_base` if it needs no waiting and no I/O.
    fn write_base_now(&self, partition: u32, key: &[u8], hash: u64) -> Option<Option<Value>> {
        match self.pending_base(key, hash) {
            PendingBase::Open(bytes) => Some(Some(bytes)),
            PendingBase::Wait(_) => None,
            PendingBase::None => self.store.get_now(partition, key),
        }
    }

    /// What a pending write of `key` means for a write that builds on it.
    fn pending_base(&self, key: &[u8], hash: u64) -> PendingBase {
        let pending = self.pending.borrow();
        match pending.find(hash, |p| p.bytes.key() == key) {
            Some(p) if p.batch == self.store.open_batch() => PendingBase::Open(p.bytes.clone()),
            Some(p) if !p.done.finished.get() => PendingBase::Wait(p.done.clone()),
            _ => PendingBase::None,
        }
    }

    /// Applies the write to `base` and puts the result into the open commit
    /// batch. The caller holds the key's lock.
    fn try_enqueue(
        &self,
        partition: u32,
        key: &[u8],
        hash: u64,
        kind: &WriteKind<'_>,
        base: Option<Value>,
        reply: WriteReply,
    ) -> Result<Attempt<'_>, Fail> {
        let unreadable =
            |e: encoding::DecodeError| Fail::new(Status::Internal, format!("stored version set unreadable: {e}"));
        let next = match (base.as_deref(), kind) {
            (Some(bytes), WriteKind::DeleteIfLive) => {
                let live = encoding::with_view(bytes, |view| !view.is_deleted()).map_err(unreadable)?;
                if !live {
                    return Ok(Attempt::Nothing);
                }
                let tombstone = Sibling { value: Vec::new(), tombstone: true, written_ms: now_ms() };
                encoding::with_view(bytes, |view| view.overwrite(tombstone, self.actor)).map_err(unreadable)?
            }
            (None, WriteKind::DeleteIfLive) => return Ok(Attempt::Nothing),
            (base, WriteKind::Value { context, value, tombstone }) => {
                let value = Sibling { value: value.to_vec(), tombstone: *tombstone, written_ms: now_ms() };
                match (base, context) {
                    (None, context) => {
                        VersionSet::write(None, context.as_ref().unwrap_or(&Context::default()), value, self.actor)
                    }
                    (Some(bytes), None) => {
                        encoding::with_view(bytes, |view| view.overwrite(value, self.actor)).map_err(unreadable)?
                    }
                    (Some(bytes), Some(context)) => {
                        let set = encoding::decode(bytes).map_err(unreadable)?;
                        VersionSet::write(Some(&set), context, value, self.actor)
                    }
                }
            }
        };
        // Let go of the base before the put: the cache then holds the only
        // handle on the key's value and can overwrite it in place.
        drop(base);
        if next.len() > self.config.node.siblings_max {
            return Err(Fail::new(
                Status::BadRequest,
                format!("the write would leave {} siblings (limit {}): read the key and write back a resolved value with its context", next.len(), self.config.node.siblings_max),
            ));
        }
        // Encode into the shard's reusable buffer (taken out while in use:
        // a concurrent write simply allocates its own).
        let mut bytes = self.encode_buffer.take();
        encoding::encode_into(&next, &mut bytes);
        // In group mode the write stays pending (readable by later
        // operations) until durable, then becomes the cached value: one
        // allocation serves both.
        let group = self.config.storage.sync_mode == crate::config::SyncMode::Group;
        let shared = group.then(|| Value::new(key, &bytes));
        let attempt = match &shared {
            Some(value) => self.store.try_put_value(partition, value),
            None => self.store.try_put(partition, key, &bytes),
        };
        let attempt = match attempt {
            Ok(TryPut::Queued(queued)) => {
                let done = shared.map(|value| self.note_pending(hash, value, queued.batch_seq));
                // Built now so that the version set is freed at once: a
                // commit batch keeps hundreds of writes waiting, and
                // glibc's per-thread cache holds only a few freed blocks
                // of each size.
                let context = match reply {
                    WriteReply::Context => next.join().encode(),
                    WriteReply::Empty | WriteReply::Deleted => Vec::new(),
                };
                Ok(Attempt::Enqueued(Enqueued { queued, hash, done, context }))
            }
            Ok(TryPut::WouldWait) => Ok(Attempt::WouldWait),
            Err(e) => Err(Fail::new(status_of(&e), e.to_string())),
        };
        self.encode_buffer.replace(bytes);
        attempt
    }

    /// Notes a write to `key` in commit batch `batch` as pending (group
    /// mode); gives the batch's completion.
    fn note_pending(&self, hash: u64, bytes: Value, batch: u64) -> Rc<PendingDone> {
        let done = {
            let mut open = self.open_batch_done.borrow_mut();
            match &*open {
                Some((seq, done)) if *seq == batch => done.clone(),
                _ => {
                    let done = Rc::new(PendingDone::default());
                    *open = Some((batch, done.clone()));
                    done
                }
            }
        };
        let mut pending = self.pending.borrow_mut();
        let key = bytes.key();
        let found = pending.find_mut(hash, |p| p.bytes.key() == key);
        let entry = Pending { bytes, batch, done: done.clone() };
        match found {
            Some(slot) => *slot = entry,
            None => {
                pending.insert_unique(hash, entry, |p| key_hash(p.bytes.key()));
            }
        }
        done
    }

    /// Waits until an enqueued write is durable; gives the new causal
    /// context if its reply needs one.
    async fn finish(&self, key: &[u8], enqueued: Enqueued<'_>) -> Result<Vec<u8>, Fail> {
        let Enqueued { queued, hash, done, context } = enqueued;
        let batch = queued.batch_seq;
        let result = queued.durable().await;
        if let Some(done) = done {
            // The whole commit batch is settled (its writes share one
            // fdatasync): waiters on any of them can read the store.
            done.finished.set(true);
            done.notify.notify();
            let mut pending = self.pending.borrow_mut();
            if let Ok(entry) = pending.find_entry(hash, |p| p.bytes.key() == key) {
                if entry.get().batch == batch {
                    entry.remove();
                }
            }
        }
        result.map_err(|e| Fail::new(status_of(&e), e.to_string()))?;
        Ok(context)
    }

    /// Read-modify-write of a key's version set under its stripe lock;
    /// gives the new context if `reply` needs it, `None` when a delete
    /// found nothing live to delete.
    async fn write(
        &self,
        key: &[u8],
        partition: u32,
        kind: WriteKind<'_>,
        reply: WriteReply,
    ) -> Result<Option<Vec<u8>>, Fail> {
        self.check_write(key, &kind)?;
        let hash = key_hash(key);
        let guard = self.lock_of(hash).lock().await;
        loop {
            let base = self.write_base(partition, key, hash).await?;
            match self.try_enqueue(partition, key, hash, &kind, base, reply)? {
                Attempt::Nothing => return Ok(None),
                // The batch or the buffers are full: wait, then start over
                // (the base may have become durable meanwhile).
                Attempt::WouldWait => self.store.wait_to_write().await,
                Attempt::Enqueued(enqueued) => {
                    drop(guard);
                    return self.finish(key, enqueued).await.map(Some);
                }
            }
        }
    }

    /// `write` up to the point of waiting for durability, if nothing else
    /// needs waiting for (the lock, a pending write of an older batch, the
    /// disk, room in the batch); `None` otherwise.
    fn write_now(
        &self,
        key: &[u8],
        partition: u32,
        kind: &WriteKind<'_>,
        reply: WriteReply,
    ) -> Option<Result<Attempt<'_>, Fail>> {
        if let Err(fail) = self.check_write(key, kind) {
            return Some(Err(fail));
        }
        let hash = key_hash(key);
        let _guard = self.lock_of(hash).try_lock()?;
        let base = self.write_base_now(partition, key, hash)?;
        match self.try_enqueue(partition, key, hash, kind, base, reply) {
            Ok(Attempt::WouldWait) => None,
            other => Some(other),
        }
    }

    /// Decodes and checks one operation, routed to `partition` (see `Route`).
    fn prepare<'a>(&self, opcode: u8, body: &'a [u8], partition: u32) -> Result<Op<'a>, Fail> {
        let routed = |key: &[u8]| {
            debug_assert_eq!(partition, self.partition(key), "an operation routed to another partition");
            partition
        };
        let read = |key: &'a [u8], kind: ReadKind| -> Result<Op<'a>, Fail> {
            self.check_key(key)?;
            Ok(Op::Read { key, partition: routed(key), kind })
        };
        match opcode {
            internal::GET_LATEST => return read(body, ReadKind::Latest),
            internal::EXISTS => return read(body, ReadKind::Exists),
            _ => {}
        }
        let request = decode_request(opcode, body).map_err(|e| Fail::new(e.status(), e.message()))?;
        Ok(match request {
            Request::Ping(b) => Op::Ping(b),
            Request::Status => Op::Status,
            Request::Get { key } => return read(key, ReadKind::Versions),
            // A delete is a put of a tombstone; both reply with the new context.
            Request::Put { key, context, value: v } => Op::Write {
                key,
                partition: routed(key),
                kind: WriteKind::Value { context: Some(self.context(context)?), value: v, tombstone: false },
                reply: WriteReply::Context,
            },
            Request::Delete { key, context } => Op::Write {
                key,
                partition: routed(key),
                kind: WriteKind::Value { context: Some(self.context(context)?), value: &[], tombstone: true },
                reply: WriteReply::Context,
            },
            Request::Overwrite { key, value: v } => Op::Write {
                key,
                partition: routed(key),
                kind: WriteKind::Value { context: None, value: v, tombstone: false },
                reply: WriteReply::Empty,
            },
            Request::DeleteAll { key } => {
                Op::Write { key, partition: routed(key), kind: WriteKind::DeleteIfLive, reply: WriteReply::Deleted }
            }
            Request::Batch(_) => return Err(Fail::new(Status::BadRequest, "batches do not nest")),
        })
    }

    /// The reply to a read of `bytes` (the key's stored version set).
    fn read_reply(&self, kind: ReadKind, bytes: Option<Value>, out: &mut Vec<u8>) -> Result<Status, Fail> {
        let unreadable =
            |e: encoding::DecodeError| Fail::new(Status::Internal, format!("stored version set unreadable: {e}"));
        let Some(bytes) = bytes else { return Ok(Status::NotFound) };
        match kind {
            ReadKind::Latest | ReadKind::Exists => encoding::with_view(&bytes, |view| match view.last_written() {
                Some(s) if !s.tombstone => {
                    if kind == ReadKind::Latest {
                        out.extend_from_slice(s.value.as_slice());
                    }
                    Status::Ok
                }
                _ => Status::NotFound,
            })
            .map_err(unreadable),
            ReadKind::Versions => {
                // A deleted key reads as not found, with the context a later
                // write needs to supersede the tombstone.
                let deleted =
                    encoding::with_view(&bytes, |view| view.is_deleted().then(|| view.join())).map_err(unreadable)?;
                match deleted {
                    Some(context) => {
                        out.extend_from_slice(&context.encode());
                        Ok(Status::NotFound)
                    }
                    None => {
                        out.extend_from_slice(&bytes);
                        Ok(Status::Ok)
                    }
                }
            }
        }
    }

    /// Executes one operation owned by this shard, appending its reply body
    /// to `out`.
    pub async fn execute(&self, opcode: u8, body: &[u8], partition: u32, out: &mut Vec<u8>) -> Status {
        self.execute_inner(opcode, body, partition, out).await.unwrap_or_else(|fail| fail.reply(out))
    }

    async fn execute_inner(&self, opcode: u8, body: &[u8], partition: u32, out: &mut Vec<u8>) -> Result<Status, Fail> {
        self.stats.borrow_mut().requests += 1;
        #[cfg(debug_assertions)]
        self.inject_fault(opcode, body);
        match self.prepare(opcode, body, partition)? {
            Op::Ping(b) => Ok(self.answer_ping(b, out)),
            Op::Status => Ok(self.answer_status(out)),
            Op::Read { key, partition, kind } => {
                let bytes = self.read_raw(partition, key).await?;
                self.read_reply(kind, bytes, out)
            }
            Op::Write { key, partition, kind, reply } => {
                let written = self.write(key, partition, kind, reply).await?;
                Ok(reply.write(written.as_deref(), out))
            }
        }
    }

    /// `execute` when writes do not wait for an fdatasync (`none`,
    /// `interval`): synchronously when nothing needs waiting for (the
    /// usual case, a cached or indexed key), which costs no future per
    /// operation and no lock round trip; otherwise the general path.
    async fn execute_unsynced(&self, opcode: u8, body: &[u8], partition: u32, out: &mut Vec<u8>) -> Status {
        #[cfg(debug_assertions)]
        self.inject_fault(opcode, body);
        let op = match self.prepare(opcode, body, partition) {
            Ok(op) => op,
            Err(fail) => return fail.reply(out),
        };
        let key = op.key();
        match self.execute_now(op, out) {
            Now::Done(status) => status,
            Now::Write { enqueued, reply } => match self.finish(key.expect("writes have keys"), enqueued).await {
                Ok(context) => reply.write(Some(&context), out),
                Err(fail) => fail.reply(out),
            },
            // Nothing was done: the general path starts over.
            Now::Later => self.execute(opcode, body, partition, out).await,
        }
    }

    /// `execute` as far as it goes without waiting for anything but the
    /// operation's own durability.
    fn execute_now<'a>(&'a self, op: Op<'_>, out: &mut Vec<u8>) -> Now<'a> {
        let now = match op {
            Op::Ping(b) => Now::Done(self.answer_ping(b, out)),
            Op::Status => Now::Done(self.answer_status(out)),
            Op::Read { key, partition, kind } => match self.store.get_now(partition, key) {
                Some(bytes) => Now::Done(self.read_reply(kind, bytes, out).unwrap_or_else(|fail| fail.reply(out))),
                None => return Now::Later,
            },
            Op::Write { key, partition, kind, reply } => match self.write_now(key, partition, &kind, reply) {
                None => return Now::Later,
                Some(Err(fail)) => Now::Done(fail.reply(out)),
                Some(Ok(Attempt::Enqueued(enqueued))) => Now::Write { enqueued, reply },
                Some(Ok(Attempt::Nothing)) => Now::Done(reply.write(None, out)),
                // (`write_now` turns this into `None`; never answer it as done.)
                Some(Ok(Attempt::WouldWait)) => return Now::Later,
            },
        };
        self.stats.borrow_mut().requests += 1;
        now
    }

    fn answer_ping(&self, payload: &[u8], out: &mut Vec<u8>) -> Status {
        out.extend_from_slice(payload);
        Status::Ok
    }

    fn answer_status(&self, out: &mut Vec<u8>) -> Status {
        self.node_status().encode(out);
        Status::Ok
    }

    #[cfg(debug_assertions)]
    fn inject_fault(&self, opcode: u8, body: &[u8]) {
        if let Some(key) = &self.fault_panic_key {
            if opcode == Opcode::Get as u8 && body == key.as_slice() {
                panic!("fault injection: shard {} panics on request", self.index);
            }
        }
    }

    fn context(&self, bytes: &[u8]) -> Result<Context, Fail> {
        let limit = self.config.node.context_bytes_max;
        if bytes.len() > limit {
            return Err(Fail::new(
                Status::BadRequest,
                format!("context of {} bytes is over the limit of {limit}", bytes.len()),
            ));
        }
        Context::decode(bytes).ok_or_else(|| Fail::new(Status::BadRequest, "malformed context"))
    }

    pub fn node_status(&self) -> NodeStatus {
        let report = format!(
            "ringkv node\nactor: {:016x}\nshards: {}\npartitions: {}\nclient_port: {}\nredis_port: {}\n{}",
            self.actor,
            self.shard_count,
            self.partition_count,
            self.client_port,
            self.redis_port,
            self.shard_report(),
        );
        NodeStatus {
            shard_count: self.shard_count,
            partition_count: self.partition_count,
            client_port: self.client_port,
            redis_port: self.redis_port,
            actor: self.actor,
            report,
        }
    }

    /// This shard's lines of `admin status`, each starting with
    /// "shard N" (the CLI gathers them from every shard's own port).
    fn shard_report(&self) -> String {
        const MIB: u64 = 1 << 20;
        let storage = self.store.stats();
        let shard = *self.stats.borrow();
        let replies = self.outbox.stats();
        let i = self.index;
        format!(
            "shard {i}: keys {} puts {} removes {} gets {} health {:?}\n\
             shard {i} reads: cache hits {} from write buffers {} from disk {} corrupt records skipped {}\n\
             shard {i} disk: segment data {} MiB, buffered {} KiB, segment writes {} ({} MiB), segments sealed {}, \
             compactions {} ({} MiB reclaimed), commit batches {} ({} records, {} fdatasyncs), storage-full errors {}\n\
             shard {i} network: connections {} (refused {}, handed to other shards {}, taken from them {}), requests {}, \
             batches to other shards {}, replies {} in {} bursts; on its CPU {:.1}% of the time, waiting for it {:.1}%\n",
            storage.keys,
            storage.puts,
            storage.removes,
            storage.gets,
            self.store.health(),
            storage.cache_hits,
            storage.reads_from_memory,
            storage.disk_reads,
            storage.corrupt_records,
            storage.segment_data_bytes / MIB,
            storage.buffered_bytes >> 10,
            storage.segment_writes,
            storage.segment_bytes_written / MIB,
            storage.segments_sealed,
            storage.compactions,
            storage.compaction_bytes_reclaimed / MIB,
            storage.commit_batches,
            storage.commit_records,
            storage.commit_fsyncs,
            storage.storage_full_errors,
            self.connections.get(),
            shard.connections_refused,
            shard.connections_handed_over,
            shard.connections_taken_over,
            shard.requests,
            shard.forwarded_batches,
            replies.replies,
            replies.bursts,
            f64::from(self.balancer.busy_permille()) / 10.0,
            f64::from(self.balancer.wait_permille()) / 10.0,
        )
    }

    /// Executes a batch of operations owned by this shard; replies in
    /// order, and the effects are those of running the operations one
    /// after another (a pipelined GET after a SET of the same key sees it).
    /// `partitions` holds each operation's partition as routed.
    pub async fn execute_batch(&self, body: &[u8], partitions: &[u32]) -> Vec<u8> {
        let ops = batch_ops(body, partitions);
        if self.config.storage.sync_mode != crate::config::SyncMode::Group {
            // Writes are applied when queued and never wait for the disk:
            // one after another is as fast and allocates nothing per
            // operation (only a read missing every cache waits).
            let mut out = Vec::with_capacity(body.len() + 64);
            for (i, op) in ops.iter().enumerate() {
                self.prefetch_ahead(&ops, i);
                let at = batch::begin_response(&mut out, op.opcode);
                let status = self.execute_unsynced(op.opcode, op.body, op.partition, &mut out).await;
                batch::end_response(&mut out, at, status as u8);
            }
            return out;
        }
        self.execute_batch_group(&ops).await
    }

    /// Before a batch's operation `i` runs. Each operation's lookups are
    /// cache misses (a slot, then what it refers to): this prefetches the
    /// slots of the operation two ahead and what the slots of the one ahead
    /// refer to, so that the misses overlap with the work in between.
    fn prefetch_ahead(&self, ops: &[BatchOp<'_>], i: usize) {
        let stage = |j: usize, entries: bool| {
            let Some(BatchOp { partition, lookup: Some((hash, write)), .. }) = ops.get(j) else { return };
            if entries {
                self.store.prefetch_entries(*partition, *hash, *write);
            } else {
                self.store.prefetch_slots(*partition, *hash, *write);
            }
        };
        if i == 0 {
            stage(0, false);
            stage(1, false);
            stage(0, true);
        }
        stage(i + 2, false);
        stage(i + 1, true);
    }

    /// `execute_batch` in `group` mode, where writes wait for an fdatasync
    /// and so must overlap.
    ///
    /// First pass, without waiting: reads answered from the cache or the
    /// index, writes put into the open commit batch. Deferred: what needs
    /// waiting (a read from the disk, a contended key lock, a full batch),
    /// any operation on a key that an earlier deferred operation of the
    /// batch touches, and reads of a key an earlier operation wrote (not
    /// visible until durable). Second pass: the writes' durability is
    /// awaited while deferred operations run, concurrently across keys and
    /// in order within a key. A batch costs a handful of allocations, none
    /// per operation, and its writes share commit batches.
    async fn execute_batch_group(&self, ops: &[BatchOp<'_>]) -> Vec<u8> {
        let count = ops.len();
        // Reply bytes of every operation, in completion order.
        let replies = RefCell::new(Vec::with_capacity(count * 8));
        // Per operation: opcode, status, range of `replies`.
        let answers = RefCell::new(vec![(0u8, Status::Internal, 0..0); count]);
        let mut plans: Vec<Option<Plan<'_, '_>>> = Vec::with_capacity(count);
        let mut touched: std::collections::HashMap<&[u8], Touched> = std::collections::HashMap::new();
        for (i, &BatchOp { opcode, body: op_body, partition, .. }) in ops.iter().enumerate() {
            self.prefetch_ahead(ops, i);
            #[cfg(debug_assertions)]
            self.inject_fault(opcode, op_body);
            answers.borrow_mut()[i].0 = opcode;
            let mut out = replies.borrow_mut();
            let start = out.len();
            let answer = |status: Status, out: &Vec<u8>| {
                let mut answers = answers.borrow_mut();
                answers[i].1 = status;
                answers[i].2 = start..out.len();
            };
            let op = match self.prepare(opcode, op_body, partition) {
                Ok(op) => op,
                Err(fail) => {
                    let status = fail.reply(&mut out);
                    answer(status, &out);
                    plans.push(None);
                    continue;
                }
            };
            let key = op.key();
            let seen = key.and_then(|k| touched.get(k)).copied().unwrap_or_default();
            let must_wait = seen.deferred || (seen.written && matches!(op, Op::Read { .. }));
            let plan = if must_wait {
                Some(Plan::Later { opcode, body: op_body, partition, key })
            } else {
                match self.execute_now(op, &mut out) {
                    Now::Done(status) => {
                        answer(status, &out);
                        None
                    }
                    Now::Write { enqueued, reply } => Some(Plan::Write { enqueued, reply, key }),
                    Now::Later => Some(Plan::Later { opcode, body: op_body, partition, key }),
                }
            };
            match (&plan, key) {
                (Some(Plan::Later { .. }), Some(k)) => touched.entry(k).or_default().deferred = true,
                (Some(Plan::Write { .. }), Some(k)) => touched.entry(k).or_default().written = true,
                _ => {}
            }
            plans.push(plan);
        }
        // Second pass. Keys with a deferred operation form chains (their
        // writes and deferred operations, in order); the other writes only
        // wait to be durable, in order.
        let mut writes = Vec::new();
        let mut chains: Vec<Vec<usize>> = Vec::new();
        let mut chain_of: std::collections::HashMap<&[u8], usize> = std::collections::HashMap::new();
        for (i, plan) in plans.iter().enumerate() {
            let Some(plan) = plan else { continue };
            match plan.key().filter(|k| touched.get(k).is_some_and(|t| t.deferred)) {
                Some(key) => {
                    let chain = *chain_of.entry(key).or_insert_with(|| {
                        chains.push(Vec::new());
                        chains.len() - 1
                    });
                    chains[chain].push(i);
                }
                None => writes.push(i),
            }
        }
        let plans = RefCell::new(plans);
        let run = |indices: Vec<usize>| {
            let (plans, replies, answers) = (&plans, &replies, &answers);
            async move {
                for i in indices {
                    let plan = plans.borrow_mut()[i].take().expect("each plan runs once");
                    let (status, bytes) = match plan {
                        Plan::Write { enqueued, reply, key } => {
                            let result = self.finish(key.expect("writes have keys"), enqueued).await;
                            let mut out = replies.borrow_mut();
                            let start = out.len();
                            let status = match result {
                                Ok(context) => reply.write(Some(&context), &mut out),
                                Err(fail) => fail.reply(&mut out),
                            };
                            (status, start..out.len())
                        }
                        Plan::Later { opcode, body, partition, .. } => {
                            let mut own = Vec::new();
                            let status = self.execute(opcode, body, partition, &mut own).await;
                            let mut out = replies.borrow_mut();
                            let start = out.len();
                            out.extend_from_slice(&own);
                            (status, start..out.len())
                        }
                    };
                    let mut answers = answers.borrow_mut();
                    answers[i].1 = status;
                    answers[i].2 = bytes;
                }
            }
        };
        if chains.is_empty() {
            run(writes).await;
        } else {
            futures::future::join(run(writes), futures::future::join_all(chains.into_iter().map(run))).await;
        }
        let replies = replies.into_inner();
        let answers = answers.into_inner();
        let mut out = Vec::with_capacity(replies.len() + 6 * count);
        for (opcode, status, range) in answers {
            batch::push_response_with(&mut out, opcode, status as u8, |o| o.extend_from_slice(&replies[range]));
        }
        out
    }

    /// Runs a batch on shard `target` (here, or one hop away); gives back
    /// the request buffer with the replies.
    pub async fn run_batch(&self, target: u32, body: Vec<u8>, partitions: Vec<u32>) -> Result<BatchDone, Status> {
        if target == self.index {
            let out = self.execute_batch(&body, &partitions).await;
            return Ok((body, partitions, out));
        }
        self.stats.borrow_mut().forwarded_batches += 1;
        let (reply, response) = oneshot::channel();
        let message = PeerMessage::Batch { body, partitions, reply };
        self.peers[target as usize].send(message).await.map_err(|_| Status::Unavailable)?;
        response.await.map_err(|_| Status::Unavailable)
    }
}

/// A batch's operation as routed, with what `prefetch_ahead` needs: its
/// key's `key_hash` and whether it writes (`None`: no key, or a body
/// `prepare` will refuse).
struct BatchOp<'a> {
    opcode: u8,
    body: &'a [u8],
    partition: u32,
    lookup: Option<(u64, bool)>,
}

/// Parses a batch once; `partitions` holds each operation's partition.
fn batch_ops<'a>(body: &'a [u8], partitions: &[u32]) -> Vec<BatchOp<'a>> {
    let ops: Vec<BatchOp<'a>> = batch::requests(body)
        .map_while(Result::ok)
        .zip(partitions)
        .map(|((opcode, op_body), &partition)| BatchOp {
            opcode,
            body: op_body,
            partition,
            lookup: key_of(opcode, op_body).map(|(key, write)| (key_hash(key), write)),
        })
        .collect();
    debug_assert_eq!(batch::requests(body).map_while(Result::ok).count(), partitions.len());
    ops
}

/// The key of an operation, and whether it writes (`None`: no key, or a
/// body `prepare` will refuse).
fn key_of(opcode: u8, body: &[u8]) -> Option<(&[u8], bool)> {
    match opcode {
        internal::GET_LATEST | internal::EXISTS => Some((body, false)),
        _ => match decode_request(opcode, body).ok()? {
            Request::Get { key } => Some((key, false)),
            Request::Put { key, .. }
            | Request::Delete { key, .. }
            | Request::Overwrite { key, .. }
            | Request::DeleteAll { key } => Some((key, true)),
            Request::Ping(_) | Request::Status | Request::Batch(_) => None,
        },
    }
}

/// key_len u16 | key | rest.
pub fn split_key(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = usize::from(u16::from_le_bytes(body.get(..2)?.try_into().ok()?));
    let key = body.get(2..2 + len)?;
    Some((key, &body[2 + len..]))
}

pub fn push_key_value(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    out.extend_from_slice(&(key.len() as u16).to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(value);
}

/// Serves what other shards send until the channel closes.
pub async fn serve_peers(shard: Rc<Shard>, inbound: async_channel::Receiver<PeerMessage>) {
    while let Ok(message) = inbound.recv().await {
        match message {
            PeerMessage::Batch { body, partitions, reply } => {
                let shard = shard.clone();
                crate::runtime::spawn_detached(async move {
                    let out = shard.execute_batch(&body, &partitions).await;
                    let _ = reply.send((body, partitions, out));
                });
            }
            PeerMessage::RedisConnection(fd) => crate::server::adopt_redis_connection(&shard, fd),
        }
    }
}

/// Groups a turn's operations by owning shard, runs the groups (one hop per
/// remote group, all concurrently), and gives the replies back in order.
#[derive(Default)]
pub struct Dispatch {
    /// Per target shard (grown on first use, so a default is free).
    batches: Vec<Vec<u8>>,
    /// Per target shard: each operation's partition.
    partitions: Vec<Vec<u32>>,
    /// Target shard of each operation, in order.
    targets: Vec<u32>,
    /// Per operation: status and reply range into `responses[target]`.
    replies: Vec<(u8, u32, std::ops::Range<usize>)>,
    responses: Vec<Vec<u8>>,
}

impl Dispatch {
    pub fn len(&self) -> usize {
        self.targets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// Adds an operation routed to `route`; `body` writes its request body.
    pub fn push(&mut self, route: Route, opcode: u8, body: impl FnOnce(&mut Vec<u8>)) {
        let target = route.shard;
        if self.batches.len() <= target as usize {
            self.batches.resize_with(target as usize + 1, Vec::new);
            self.partitions.resize_with(target as usize + 1, Vec::new);
        }
        self.partitions[target as usize].push(route.partition);
        let out = &mut self.batches[target as usize];
        out.push(opcode);
        let len_at = out.len();
        out.extend_from_slice(&[0; 4]);
        body(out);
        let len = (out.len() - len_at - 4) as u32;
        out[len_at..len_at + 4].copy_from_slice(&len.to_le_bytes());
        self.targets.push(target);
    }

    /// Runs every group; afterwards `reply(i)` gives operation i's outcome.
    pub async fn run(&mut self, shard: &Shard) {
        let groups: Vec<(u32, Vec<u8>, Vec<u32>)> = self
            .batches
            .iter_mut()
            .zip(&mut self.partitions)
            .enumerate()
            .filter(|(_, (b, _))| !b.is_empty())
            .map(|(t, (b, p))| (t as u32, std::mem::take(b), std::mem::take(p)))
            .collect();
        let results = futures::future::join_all(groups.into_iter().map(|(target, body, partitions)| async move {
            let count = partitions.len();
            match shard.run_batch(target, body, partitions).await {
                Ok((body, partitions, out)) => (target, body, partitions, out),
                Err(status) => {
                    // The target could not be reached: every operation sent
                    // there fails alike.
                    let mut out = Vec::new();
                    for _ in 0..count {
                        batch::push_response_with(&mut out, 0, status as u8, |o| {
                            o.extend_from_slice(b"shard unavailable")
                        });
                    }
                    (target, Vec::new(), Vec::new(), out)
                }
            }
        }))
        .await;
        if self.responses.len() < self.batches.len() {
            self.responses.resize_with(self.batches.len(), Vec::new);
        }
        for (target, body, partitions, out) in results {
            // The request buffers keep their capacity for the next turn.
            self.batches[target as usize] = body;
            self.partitions[target as usize] = partitions;
            self.responses[target as usize] = out;
        }
        let mut cursors = vec![0usize; self.responses.len()];
        self.replies.clear();
        for &target in &self.targets {
            let t = target as usize;
            let buf = &self.responses[t];
            let at = cursors[t];
            let (status, len) = if buf.len() >= at + 6 {
                (buf[at + 1], u32::from_le_bytes(buf[at + 2..at + 6].try_into().expect("4")) as usize)
            } else {
                (Status::Internal as u8, 0)
            };
            let start = (at + 6).min(buf.len());
            let end = (start + len).min(buf.len());
            cursors[t] = end;
            self.replies.push((status, target, start..end));
        }
    }

    /// Operation i's status and reply body (after `run`).
    pub fn reply(&self, i: usize) -> (Status, &[u8]) {
        let (status, target, range) = &self.replies[i];
        (Status::from_u8(*status).unwrap_or(Status::Internal), &self.responses[*target as usize][range.clone()])
    }

    /// Forgets the turn, keeping buffers for the next one.
    pub fn clear(&mut self) {
        for b in &mut self.batches {
            b.clear();
        }
        for p in &mut self.partitions {
            p.clear();
        }
        self.targets.clear();
        self.replies.clear();
    }
}

/// The opcode a client frame may carry (internal ones are refused).
pub fn client_opcode_allowed(opcode: u8) -> bool {
    !internal::is_internal(opcode) && Opcode::from_u8(opcode).is_some()
}
