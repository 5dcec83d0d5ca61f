//! One shard (core): executes requests for the partitions it owns, routes
//! the others to their owners in batches, and serves batches sent by other
//! shards. Everything here runs on the shard's own executor.
//!
//! A write is a read-modify-write of the key's version set (DVVSet): read
//! the stored set, apply the write with its causal context and a new dot of
//! this node's actor, store the result. Writes to one key are serialized by
//! a striped lock held until the write is durable (per the sync mode), so a
//! second writer always reads the first one's result.
//!
//! Routing works in turns: a connection parses everything it has received,
//! and `Dispatch` groups the operations by owning shard: one batch runs
//! here, every other one travels as one message over a bounded channel (so
//! a cross-core hop is paid per batch, not per request), and the replies
//! come back in request order.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use futures::channel::oneshot;

use crate::config::Config;
use crate::logic::dvv::{encoding, Actor, Context, Sibling, VersionSet};
use crate::logic::ring::{partition_of, shard_of};
use crate::protocol::frame::{Opcode, Status};
use crate::protocol::messages::{batch, decode_request, NodeStatus, Request};
use crate::runtime::DmaDisk;
use crate::storage::sync::Notify;
use crate::storage::{ShardStore, StorageError, TryPut, Value};

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

/// A batch of requests from another shard, and where to send the replies.
pub struct PeerMessage {
    pub body: Vec<u8>,
    pub reply: oneshot::Sender<Vec<u8>>,
}

const LOCK_STRIPES: usize = 256;

/// Counters of a shard's request handling.
#[derive(Clone, Copy, Debug, Default)]
pub struct ShardStats {
    pub requests: u64,
    pub forwarded_batches: u64,
    pub connections_refused: u64,
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
    pending: RefCell<std::collections::HashMap<Vec<u8>, Pending>>,
    pub stats: RefCell<ShardStats>,
    /// Set when the node is stopping: stop accepting and reading.
    pub stopping: Cell<bool>,
    pub stop: Notify,
    pub connections: Cell<usize>,
    pub connection_closed: Notify,
    pub client_port: u16,
    pub redis_port: u16,
    /// Fault injection for supervision tests (debug builds only): a request
    /// for this key panics the shard that executes it.
    #[cfg(debug_assertions)]
    fault_panic_key: Option<Vec<u8>>,
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
enum WriteKind {
    /// A value (or tombstone) under a context; no context: supersede
    /// everything this node holds.
    Value { context: Option<Context>, value: Sibling },
    /// A tombstone superseding everything, only if a live value exists.
    DeleteIfLive,
}

/// A write in a commit batch that is not durable yet (group mode).
#[derive(Clone)]
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

/// A failed operation: its status and a message for the reply body.
struct Fail {
    status: Status,
    message: String,
}

impl Fail {
    fn new(status: Status, message: impl Into<String>) -> Self {
        Self { status, message: message.into() }
    }
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
            pending: RefCell::new(std::collections::HashMap::new()),
            stats: RefCell::new(ShardStats::default()),
            stopping: Cell::new(false),
            stop: Notify::default(),
            connections: Cell::new(0),
            connection_closed: Notify::default(),
            config,
            client_port,
            redis_port,
            #[cfg(debug_assertions)]
            fault_panic_key: std::env::var_os("RINGKV_FAULT_PANIC_KEY").map(|k| k.into_encoded_bytes()),
        }
    }

    pub fn partition(&self, key: &[u8]) -> u32 {
        partition_of(key, self.partition_count)
    }

    /// The shard of this node that owns `key`.
    pub fn owner(&self, key: &[u8]) -> u32 {
        shard_of(self.partition(key), self.shard_count)
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

    /// Read-modify-write of a key's version set under its stripe lock.
    ///
    /// In `group` mode a write is visible only once durable, so the lock
    /// would have to be held across the fdatasync and a hot key would take
    /// one write per commit batch (a convoy under zipfian load). Instead the
    /// lock is held only until the write is in the open batch, and the key
    /// is noted as pending: a later writer builds on a pending write only if
    /// it is still in the open batch (then both share one fdatasync and
    /// succeed or fail together); otherwise it waits for that write to be
    /// durable and reads the stored state. No write ever builds on one that
    /// could still fail in another batch.
    async fn write(&self, key: &[u8], kind: WriteKind) -> Result<Option<VersionSet>, Fail> {
        self.check_key(key)?;
        if let WriteKind::Value { value, .. } = &kind {
            if !value.tombstone && value.value.len() > self.config.node.value_bytes_max {
                let limit = self.config.node.value_bytes_max;
                return Err(Fail::new(
                    Status::ValueTooLarge,
                    format!("value of {} bytes is over the limit of {limit}", value.value.len()),
                ));
            }
        }
        let partition = self.partition(key);
        let group = self.config.storage.sync_mode == crate::config::SyncMode::Group;
        let stripe = (xxhash_rust::xxh3::xxh3_64(key) as usize) % LOCK_STRIPES;
        let guard = self.locks[stripe].lock().await;
        let unreadable =
            |e: encoding::DecodeError| Fail::new(Status::Internal, format!("stored version set unreadable: {e}"));
        loop {
            let base = loop {
                let pending = self.pending.borrow().get(key).cloned();
                match pending {
                    Some(p) if p.batch == self.store.open_batch() => break Some(p.bytes),
                    Some(p) if !p.done.finished.get() => {
                        let done = p.done.notify.listen();
                        if !p.done.finished.get() {
                            done.await;
                        }
                    }
                    _ => break self.read_raw(partition, key).await?,
                }
            };
            let next = match (&base, &kind) {
                (Some(bytes), WriteKind::DeleteIfLive) => {
                    let live = encoding::with_view(bytes, |view| !view.is_deleted()).map_err(unreadable)?;
                    if !live {
                        return Ok(None);
                    }
                    let tombstone = Sibling { value: Vec::new(), tombstone: true, written_ms: now_ms() };
                    encoding::with_view(bytes, |view| view.overwrite(tombstone, self.actor)).map_err(unreadable)?
                }
                (None, WriteKind::DeleteIfLive) => return Ok(None),
                (None, WriteKind::Value { context, value }) => {
                    VersionSet::write(None, &context.clone().unwrap_or_default(), value.clone(), self.actor)
                }
                (Some(bytes), WriteKind::Value { context: None, value }) => {
                    encoding::with_view(bytes, |view| view.overwrite(value.clone(), self.actor)).map_err(unreadable)?
                }
                (Some(bytes), WriteKind::Value { context: Some(context), value }) => {
                    let set = encoding::decode(bytes).map_err(unreadable)?;
                    VersionSet::write(Some(&set), context, value.clone(), self.actor)
                }
            };
            if next.len() > self.config.node.siblings_max {
                return Err(Fail::new(
                    Status::BadRequest,
                    format!("the write would leave {} siblings (limit {}): read the key and write back a resolved value with its context", next.len(), self.config.node.siblings_max),
                ));
            }
            // Encode into the shard's reusable buffer (taken out while in
            // use: a concurrent write simply allocates its own).
            let mut bytes = self.encode_buffer.take();
            encoding::encode_into(&next, &mut bytes);
            let attempt = self.store.try_put(partition, key, &bytes);
            let queued = match attempt {
                Ok(TryPut::Queued(queued)) => queued,
                Ok(TryPut::WouldWait) => {
                    self.encode_buffer.replace(bytes);
                    // The batch or the buffers are full: wait, then start
                    // over (the base may have become durable meanwhile).
                    self.store.wait_to_write().await;
                    continue;
                }
                Err(e) => {
                    self.encode_buffer.replace(bytes);
                    return Err(Fail::new(status_of(&e), e.to_string()));
                }
            };
            let done = group.then(|| {
                let done = Rc::new(PendingDone::default());
                let entry = Pending { bytes: Value::detached(&bytes), batch: queued.batch_seq, done: done.clone() };
                self.pending.borrow_mut().insert(key.to_vec(), entry);
                done
            });
            self.encode_buffer.replace(bytes);
            drop(guard);
            let result = queued.durable().await;
            if let Some(done) = done {
                done.finished.set(true);
                done.notify.notify();
                let mut pending = self.pending.borrow_mut();
                if pending.get(key).is_some_and(|p| Rc::ptr_eq(&p.done, &done)) {
                    pending.remove(key);
                }
            }
            result.map_err(|e| Fail::new(status_of(&e), e.to_string()))?;
            return Ok(Some(next));
        }
    }

    /// Executes one operation owned by this shard, appending its reply body
    /// to `out`.
    pub async fn execute(&self, opcode: u8, body: &[u8], out: &mut Vec<u8>) -> Status {
        match self.execute_inner(opcode, body, out).await {
            Ok(status) => status,
            Err(Fail { status, message }) => {
                out.extend_from_slice(message.as_bytes());
                status
            }
        }
    }

    async fn execute_inner(&self, opcode: u8, body: &[u8], out: &mut Vec<u8>) -> Result<Status, Fail> {
        self.stats.borrow_mut().requests += 1;
        #[cfg(debug_assertions)]
        if let Some(key) = &self.fault_panic_key {
            if opcode == Opcode::Get as u8 && body == key.as_slice() {
                panic!("fault injection: shard {} panics on request", self.index);
            }
        }
        let now = now_ms;
        let unreadable =
            |e: encoding::DecodeError| Fail::new(Status::Internal, format!("stored version set unreadable: {e}"));
        match opcode {
            internal::GET_LATEST | internal::EXISTS => {
                self.check_key(body)?;
                let Some(bytes) = self.read_raw(self.partition(body), body).await? else { return Ok(Status::NotFound) };
                return encoding::with_view(&bytes, |view| match view.last_written() {
                    Some(s) if !s.tombstone => {
                        if opcode == internal::GET_LATEST {
                            out.extend_from_slice(s.value.as_slice());
                        }
                        Status::Ok
                    }
                    _ => Status::NotFound,
                })
                .map_err(unreadable);
            }
            _ => {}
        }
        let request = decode_request(opcode, body).map_err(|e| Fail::new(e.status(), e.message()))?;
        match request {
            Request::Ping(b) => {
                out.extend_from_slice(b);
                Ok(Status::Ok)
            }
            Request::Status => {
                self.node_status().encode(out);
                Ok(Status::Ok)
            }
            Request::Get { key } => {
                self.check_key(key)?;
                let Some(bytes) = self.read_raw(self.partition(key), key).await? else { return Ok(Status::NotFound) };
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
            // A delete is a put of a tombstone; both reply with the new context.
            Request::Put { key, context, .. } | Request::Delete { key, context } => {
                let context = self.context(context)?;
                let value = match request {
                    Request::Put { value, .. } => {
                        Sibling { value: value.to_vec(), tombstone: false, written_ms: now() }
                    }
                    _ => Sibling { value: Vec::new(), tombstone: true, written_ms: now() },
                };
                let set = self
                    .write(key, WriteKind::Value { context: Some(context), value })
                    .await?
                    .expect("a value write writes");
                out.extend_from_slice(&set.join().encode());
                Ok(Status::Ok)
            }
            Request::Overwrite { key, value } => {
                let value = Sibling { value: value.to_vec(), tombstone: false, written_ms: now() };
                self.write(key, WriteKind::Value { context: None, value }).await?;
                Ok(Status::Ok)
            }
            Request::DeleteAll { key } => {
                let deleted = self.write(key, WriteKind::DeleteIfLive).await?.is_some();
                out.push(u8::from(deleted));
                Ok(Status::Ok)
            }
            Request::Batch(_) => Err(Fail::new(Status::BadRequest, "batches do not nest")),
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
        let stats = self.store.stats();
        let report = format!(
            "ringkv node\nactor: {:016x}\nshards: {}\npartitions: {}\nclient_port: {}\nredis_port: {}\nshard {}: keys {} puts {} gets {} health {:?}\n",
            self.actor,
            self.shard_count,
            self.partition_count,
            self.client_port,
            self.redis_port,
            self.index,
            stats.keys,
            stats.puts,
            stats.gets,
            self.store.health(),
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

    /// Executes a batch of operations owned by this shard, replies in
    /// order. In `group` mode operations run concurrently so that their
    /// writes share commit-log batches; otherwise they complete without
    /// waiting for the disk (unless a read misses every cache), and run one
    /// after another with replies written straight into the response.
    pub async fn execute_batch(&self, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(body.len() + 64);
        if self.config.storage.sync_mode == crate::config::SyncMode::Group {
            let ops: Vec<(u8, &[u8])> = batch::requests(body).map_while(Result::ok).collect();
            let outcomes = futures::future::join_all(ops.iter().map(|(opcode, body)| async move {
                let mut reply = Vec::new();
                let status = self.execute(*opcode, body, &mut reply).await;
                (status, reply)
            }))
            .await;
            for ((opcode, _), (status, reply)) in ops.iter().zip(outcomes) {
                batch::push_response_with(&mut out, *opcode, status as u8, |o| o.extend_from_slice(&reply));
            }
            return out;
        }
        for (opcode, op_body) in batch::requests(body).map_while(Result::ok) {
            let at = out.len();
            out.extend_from_slice(&[opcode, 0, 0, 0, 0, 0]);
            let status = self.execute(opcode, op_body, &mut out).await;
            let len = (out.len() - at - 6) as u32;
            out[at + 1] = status as u8;
            out[at + 2..at + 6].copy_from_slice(&len.to_le_bytes());
        }
        out
    }

    /// Runs a batch on shard `target` (here, or one hop away).
    pub async fn run_batch(&self, target: u32, body: Vec<u8>) -> Result<Vec<u8>, Status> {
        if target == self.index {
            return Ok(self.execute_batch(&body).await);
        }
        self.stats.borrow_mut().forwarded_batches += 1;
        let (reply, response) = oneshot::channel();
        self.peers[target as usize].send(PeerMessage { body, reply }).await.map_err(|_| Status::Unavailable)?;
        response.await.map_err(|_| Status::Unavailable)
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

/// Serves batches sent by other shards until the channel closes.
pub async fn serve_peers(shard: Rc<Shard>, inbound: async_channel::Receiver<PeerMessage>) {
    while let Ok(PeerMessage { body, reply }) = inbound.recv().await {
        let shard = shard.clone();
        crate::runtime::spawn_detached(async move {
            let out = shard.execute_batch(&body).await;
            let _ = reply.send(out);
        });
    }
}

/// Groups a turn's operations by owning shard, runs the groups (one hop per
/// remote group, all concurrently), and gives the replies back in order.
#[derive(Default)]
pub struct Dispatch {
    /// Per target shard (grown on first use, so a default is free).
    batches: Vec<Vec<u8>>,
    /// Target shard of each operation, in order.
    targets: Vec<u32>,
    /// Per operation: status and reply range into `responses[target]`.
    replies: Vec<(u8, u32, std::ops::Range<usize>)>,
    responses: Vec<Vec<u8>>,
}

impl Dispatch {
    pub fn new(shard_count: u32) -> Self {
        Self {
            batches: vec![Vec::new(); shard_count as usize],
            targets: Vec::new(),
            replies: Vec::new(),
            responses: vec![Vec::new(); shard_count as usize],
        }
    }

    pub fn len(&self) -> usize {
        self.targets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// Adds an operation for `target`; `body` writes its request body.
    pub fn push(&mut self, target: u32, opcode: u8, body: impl FnOnce(&mut Vec<u8>)) {
        if self.batches.len() <= target as usize {
            self.batches.resize_with(target as usize + 1, Vec::new);
        }
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
        let groups: Vec<(u32, Vec<u8>)> = self
            .batches
            .iter_mut()
            .enumerate()
            .filter(|(_, b)| !b.is_empty())
            .map(|(t, b)| (t as u32, std::mem::take(b)))
            .collect();
        let results = futures::future::join_all(groups.into_iter().map(|(target, body)| async move {
            let count = batch::requests(&body).count();
            match shard.run_batch(target, body).await {
                Ok(out) => (target, out),
                Err(status) => {
                    // The target could not be reached: every operation sent
                    // there fails alike.
                    let mut out = Vec::new();
                    for _ in 0..count {
                        batch::push_response_with(&mut out, 0, status as u8, |o| {
                            o.extend_from_slice(b"shard unavailable")
                        });
                    }
                    (target, out)
                }
            }
        }))
        .await;
        if self.responses.len() < self.batches.len() {
            self.responses.resize_with(self.batches.len(), Vec::new);
        }
        for (target, out) in results {
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
        self.targets.clear();
        self.replies.clear();
    }
}

/// The opcode a client frame may carry (internal ones are refused).
pub fn client_opcode_allowed(opcode: u8) -> bool {
    !internal::is_internal(opcode) && Opcode::from_u8(opcode).is_some()
}
