//! `ShardStore`: one shard's storage (all its partition replicas), its public
//! API, and the write and read paths.
//!
//! Write path by sync mode:
//! - `group`: the record is encoded once into the open commit-log batch; the
//!   log task writes and fdatasyncs the batch, then copies each record into
//!   its partition's buffer and index (so nothing is visible before it is
//!   durable and a failed batch leaves no trace), then acknowledges.
//! - `interval`: encoded into the batch and applied at once; acknowledged at
//!   once; the log task writes every batch and fdatasyncs on a timer.
//! - `none`: encoded straight into the partition buffer; no commit log.
//!
//! Partition buffers are written to segment files by the segment task
//! (`segment.rs`); the commit log is recycled once the partitions it covers
//! are synced (`commit_log.rs`). Reads are served from the per-shard value
//! cache (`cache.rs`, coherent with the index), then through the index from
//! partition buffers or one disk read checked by CRC.
//!
//! All state is in one `RefCell` owned by the shard; no borrow is held across
//! an await.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use slab::Slab;

use super::cache::{key_hash, Value, ValueCache};
use super::commit_log::{Batch, CommitLog};
use super::disk::{Disk, DiskFile};
use super::format::{encode_record, parse_record, record_len, RecordError, RecordKind};
use super::index::Location;
use super::partition_table::PartitionTable;
use super::segment::PartitionState;
use super::sync::Notify;
use super::{IoOp, Result, StorageError, UnhealthyReason};
use crate::config::{StorageConfig, SyncMode};

/// Which partitions a shard owns: those with `p % shard_count == shard`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardLayout {
    pub shard: u32,
    pub shard_count: u32,
    pub partition_count: u32,
}

impl ShardLayout {
    pub fn single() -> Self {
        Self { shard: 0, shard_count: 1, partition_count: 1 }
    }

    pub fn owns(&self, partition: u32) -> bool {
        partition % self.shard_count == self.shard
    }
}

/// Counters since open. Cheap to copy; read with `ShardStore::stats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StorageStats {
    pub puts: u64,
    pub removes: u64,
    pub gets: u64,
    pub reads_from_memory: u64,
    pub cache_hits: u64,
    pub disk_reads: u64,
    pub corrupt_records: u64,
    pub commit_batches: u64,
    pub commit_records: u64,
    pub commit_fsyncs: u64,
    pub segment_writes: u64,
    pub segment_bytes_written: u64,
    pub segment_fsyncs: u64,
    pub segments_sealed: u64,
    pub compactions: u64,
    pub compaction_bytes_reclaimed: u64,
    pub storage_full_errors: u64,
    pub recovered_records: u64,
    pub recovery_corrupt_records: u64,
    pub keys: u64,
    pub index_overhead_bytes: u64,
    /// Bytes of data in segment files (headers, records, pads), excluding
    /// preallocated space.
    pub segment_data_bytes: u64,
    pub buffered_bytes: u64,
}

/// Whether the shard accepts writes.
#[derive(Clone, Debug)]
pub enum Health {
    Healthy,
    /// Out of space: writes fail with `StorageFull` until space is back.
    Full {
        path: PathBuf,
    },
    /// Writes refused until restart.
    Unhealthy(UnhealthyReason),
}

/// Result of scrubbing a partition: every byte of every segment read and checked.
#[derive(Clone, Debug, Default)]
pub struct VerifyReport {
    pub segments: u64,
    pub records: u64,
    pub bytes: u64,
    /// (segment path, offset, what is wrong)
    pub errors: Vec<(PathBuf, u64, RecordError)>,
    /// Hint files read and compared with their segments.
    pub hints: u64,
    /// Hints (valid by their own checksum) whose entries differ from what
    /// a scan of their segment gives: recovery would trust them.
    pub hint_mismatches: Vec<(PathBuf, String)>,
}

pub(crate) struct Paths {
    pub partitions: PathBuf,
    pub commit_log: PathBuf,
}

impl Paths {
    pub fn new(root: &Path, shard: u32) -> Self {
        Self {
            partitions: root.join("partitions"),
            commit_log: root.join("commitlog").join(format!("shard-{shard:03}")),
        }
    }

    pub fn partition_dir(&self, partition: u32) -> PathBuf {
        self.partitions.join(format!("p-{partition:05}"))
    }

    pub fn segment(&self, partition: u32, segment_id: u64) -> PathBuf {
        self.partition_dir(partition).join(format!("seg-{segment_id:016x}.seg"))
    }

    pub fn hint(&self, partition: u32, segment_id: u64) -> PathBuf {
        self.partition_dir(partition).join(format!("seg-{segment_id:016x}.hint"))
    }

    pub fn temporary(path: &Path) -> PathBuf {
        let mut name = path.file_name().expect("file path").to_os_string();
        name.push(".tmp");
        path.with_file_name(name)
    }
}

/// What a write attempt asks its caller to do next.
enum WriteStep {
    Done,
    AwaitAck(usize),
    WaitForSpace,
    WaitForBatch,
}

pub(crate) enum WaiterSlot {
    Waiting(Option<Waker>),
    Done(Result<()>),
    Abandoned,
}

pub(crate) struct State<D: Disk> {
    pub partitions: PartitionTable<PartitionState<D>>,
    pub log: Option<CommitLog<D>>,
    pub batch: Batch<D>,
    pub next_lsn: u64,
    /// Counts commit batches taken by the log task: writes enqueued under
    /// the same value share one write and one fdatasync, and succeed or
    /// fail together.
    pub batch_seq: u64,
    /// Bytes in partition buffers not yet written to segment files.
    pub buffered_bytes: usize,
    pub unhealthy: Option<UnhealthyReason>,
    /// Set on ENOSPC, cleared by the next successful segment write.
    pub full: Option<PathBuf>,
    pub full_retry_at: Option<std::time::Duration>,
    pub closing: bool,
    pub closed: bool,
    pub stats: StorageStats,
}

impl<D: Disk> State<D> {
    fn check_writable(&self, shard: u32) -> Result<()> {
        if self.closing {
            return Err(StorageError::Closed);
        }
        if let Some(reason) = &self.unhealthy {
            return Err(StorageError::Unhealthy { shard, reason: reason.clone() });
        }
        if let Some(path) = &self.full {
            return Err(StorageError::StorageFull { path: path.clone() });
        }
        Ok(())
    }

    pub fn take_lsn(&mut self) -> u64 {
        let lsn = self.next_lsn;
        self.next_lsn += 1;
        lsn
    }

    /// Segment `slot` of `partition`, if both still exist (a background job
    /// may finish after compaction or close removed them).
    pub fn segment_mut(&mut self, partition: u32, slot: u16) -> Option<&mut super::segment::SegmentState<D>> {
        self.partitions.get_mut(&partition).and_then(|p| p.segments.get_mut(slot as usize))
    }
}

/// Where a key's current value is, as far as memory knows.
enum Lookup {
    Cached(Value),
    Absent,
    /// In a write buffer or on the disk.
    At(Location),
}

pub(crate) struct Inner<D: Disk> {
    pub disk: D,
    pub config: StorageConfig,
    pub layout: ShardLayout,
    pub paths: Paths,
    pub state: RefCell<State<D>>,
    pub waiters: RefCell<Slab<WaiterSlot>>,
    pub cache: RefCell<ValueCache>,
    /// The open batch has records, or the store is closing.
    pub log_work: Notify,
    /// The log task took the open batch (writers waiting for room retry).
    pub batch_taken: Notify,
    /// A partition needs its buffer written, synced or sealed.
    pub segment_work: Notify,
    /// A segment write or sync finished: buffer space freed, sync progress.
    pub flushed: Notify,
    /// A segment was sealed or a compaction may be due.
    pub maintenance_work: Notify,
    /// The background future has started and not yet ended: `close` waits
    /// for it before closing the files its tasks use.
    pub background_running: Cell<bool>,
    pub background_ended: Notify,
    /// Held while a segment's hint file is written (`write_segment_hint`).
    pub hint_writer: futures::lock::Mutex<()>,
}

impl<D: Disk> Inner<D> {
    pub fn new(disk: D, config: StorageConfig, layout: ShardLayout, root: &Path) -> Self {
        let cache = ValueCache::new(config.read_cache_bytes as u64, 256);
        let paths = Paths::new(root, layout.shard);
        Self {
            disk,
            config,
            layout,
            paths,
            state: RefCell::new(State {
                partitions: PartitionTable::new(),
                log: None,
                batch: Batch::default(),
                next_lsn: 1,
                batch_seq: 0,
                buffered_bytes: 0,
                unhealthy: None,
                full: None,
                full_retry_at: None,
                closing: false,
                closed: false,
                stats: StorageStats::default(),
            }),
            waiters: RefCell::new(Slab::new()),
            cache: RefCell::new(cache),
            log_work: Notify::default(),
            batch_taken: Notify::default(),
            segment_work: Notify::default(),
            flushed: Notify::default(),
            maintenance_work: Notify::default(),
            background_running: Cell::new(false),
            background_ended: Notify::default(),
            hint_writer: futures::lock::Mutex::new(()),
        }
    }

    /// Marks the shard unhealthy (first reason wins) and fails every waiter.
    pub fn set_unhealthy(&self, reason: UnhealthyReason) {
        let mut st = self.state.borrow_mut();
        if st.unhealthy.is_none() {
            tracing::error!(shard = self.layout.shard, %reason, "storage shard is now unhealthy");
            st.unhealthy = Some(reason);
        }
        drop(st);
        self.log_work.notify();
        self.flushed.notify();
    }

    pub fn unhealthy_error(&self) -> StorageError {
        let reason = self.state.borrow().unhealthy.clone().expect("called after set_unhealthy");
        StorageError::Unhealthy { shard: self.layout.shard, reason }
    }

    pub fn set_full(&self, path: &Path) -> StorageError {
        let mut st = self.state.borrow_mut();
        st.stats.storage_full_errors += 1;
        if st.full.is_none() {
            tracing::warn!(shard = self.layout.shard, path = %path.display(), "no space left on device; writes refused until space is freed");
        }
        st.full = Some(path.to_owned());
        st.full_retry_at = Some(self.disk.now() + std::time::Duration::from_millis(self.config.disk_full_retry_ms));
        StorageError::StorageFull { path: path.to_owned() }
    }

    pub fn clear_full(&self) {
        let mut st = self.state.borrow_mut();
        if st.full.take().is_some() {
            tracing::info!(shard = self.layout.shard, "space is available again; writes resume");
        }
        st.full_retry_at = None;
    }

    /// Completes waiters with a shared result.
    pub fn complete_waiters(&self, keys: &[usize], result: &Result<()>) {
        let mut waiters = self.waiters.borrow_mut();
        for &key in keys {
            match std::mem::replace(&mut waiters[key], WaiterSlot::Done(result.clone())) {
                WaiterSlot::Waiting(Some(waker)) => waker.wake(),
                WaiterSlot::Waiting(None) => {}
                WaiterSlot::Abandoned => {
                    waiters.remove(key);
                }
                WaiterSlot::Done(_) => unreachable!("waiter {key} completed twice"),
            }
        }
    }

    fn check_key(&self, key: &[u8]) -> Result<()> {
        if key.is_empty() {
            return Err(StorageError::EmptyKey);
        }
        if key.len() > self.config.key_bytes_max {
            return Err(StorageError::KeyTooLarge { len: key.len(), limit: self.config.key_bytes_max });
        }
        Ok(())
    }

    fn check_partition(&self, partition: u32) -> Result<()> {
        let l = self.layout;
        if partition >= l.partition_count {
            return Err(StorageError::PartitionOutOfRange { partition, partition_count: l.partition_count });
        }
        if !l.owns(partition) {
            return Err(StorageError::WrongShard { partition, shard: l.shard, shard_count: l.shard_count });
        }
        Ok(())
    }

    /// Checks a write against the limits before anything is written;
    /// returns its record length.
    fn admit_write(&self, partition: u32, key: &[u8], value: &[u8]) -> Result<usize> {
        self.check_partition(partition)?;
        self.check_key(key)?;
        if value.len() > self.config.value_bytes_max {
            return Err(StorageError::ValueTooLarge { len: value.len(), limit: self.config.value_bytes_max });
        }
        Ok(record_len(key.len(), value.len()))
    }

    async fn write(&self, partition: u32, kind: RecordKind, key: &[u8], value: &[u8]) -> Result<()> {
        let len = self.admit_write(partition, key, value)?;
        let waiter = loop {
            let room = self.batch_taken.listen();
            let space = self.flushed.listen();
            match self.try_write(partition, kind, key, value, len)? {
                WriteStep::Done => return Ok(()),
                WriteStep::AwaitAck(waiter) => break waiter,
                WriteStep::WaitForSpace => space.await,
                WriteStep::WaitForBatch => room.await,
            }
        };
        WaitAck { inner: self, key: Some(waiter) }.await
    }

    /// One attempt to take a write: without awaiting, either completes it
    /// (no-ack modes), enqueues it in the batch, or says what to wait for.
    fn try_write(&self, partition: u32, kind: RecordKind, key: &[u8], value: &[u8], len: usize) -> Result<WriteStep> {
        self.try_write_cached(partition, kind, key, value, len, None)
    }

    /// `try_write` with the value the cache will hold already built.
    fn try_write_cached(
        &self,
        partition: u32,
        kind: RecordKind,
        key: &[u8],
        value: &[u8],
        len: usize,
        cached: Option<&Value>,
    ) -> Result<WriteStep> {
        let mut st = self.state.borrow_mut();
        st.check_writable(self.layout.shard)?;
        // Writers wait while the partition buffers are full; one record is
        // always let through so a record larger than the budget cannot wedge.
        let pending = st.batch.len;
        if st.buffered_bytes + pending + len > self.config.write_buffer_bytes_max && st.buffered_bytes + pending > 0 {
            drop(st);
            self.segment_work.notify();
            self.log_work.notify();
            return Ok(WriteStep::WaitForSpace);
        }
        let encode = |out: &mut [u8], lsn| {
            encode_record(out, kind, partition, lsn, key, value);
        };
        if self.config.sync_mode == SyncMode::None {
            let lsn = st.take_lsn();
            self.append_to_partition(&mut st, partition, kind, lsn, key, len, |out| encode(out, lsn), cached.cloned());
            count_write(&mut st, kind);
            return Ok(WriteStep::Done);
        }
        if !st.batch.has_room(&self.config, len) {
            drop(st);
            self.log_work.notify();
            return Ok(WriteStep::WaitForBatch);
        }
        let lsn = st.take_lsn();
        let at = st.batch.append(&self.disk, &self.config, len, lsn, |out| encode(out, lsn));
        count_write(&mut st, kind);
        let step = if self.config.sync_mode == SyncMode::Interval {
            let State { batch, partitions, buffered_bytes, .. } = &mut *st;
            let record = &batch.bytes()[at..at + len];
            *buffered_bytes += apply(self, partitions, partition, kind, lsn, key, record, cached.cloned());
            WriteStep::Done
        } else {
            st.batch.cached.push(cached.cloned());
            let waiter = self.waiters.borrow_mut().insert(WaiterSlot::Waiting(None));
            st.batch.waiters.push(waiter);
            WriteStep::AwaitAck(waiter)
        };
        drop(st);
        self.log_work.notify();
        Ok(step)
    }

    /// Appends a record (written by `fill`) to a partition's buffer and index
    /// (and `cached`, if given, to the cache as the key's value).
    #[allow(clippy::too_many_arguments)]
    pub fn append_to_partition(
        &self,
        st: &mut State<D>,
        partition: u32,
        kind: RecordKind,
        lsn: u64,
        key: &[u8],
        len: usize,
        fill: impl FnOnce(&mut [u8]),
        cached: Option<Value>,
    ) {
        let part = st.partitions.get_or_insert_with(partition, || PartitionState::new(partition));
        let outcome = part.append(self, kind, lsn, key, len, fill, cached);
        st.buffered_bytes += outcome.buffered_bytes;
        if outcome.needs_flush {
            self.segment_work.notify();
        }
    }

    /// Where a key's value is, without I/O: the cache first (it holds only
    /// values the index points at, so a hit needs no index lookup), then
    /// the index. Counts cache hits.
    fn lookup(&self, partition: u32, key: &[u8], hash: u64) -> Lookup {
        if let Some(value) = self.cache.borrow().get(partition, hash, key) {
            self.state.borrow_mut().stats.cache_hits += 1;
            return Lookup::Cached(value);
        }
        match self.state.borrow().partitions.get(&partition).and_then(|p| p.index.get(key)) {
            Some(location) => Lookup::At(location),
            None => Lookup::Absent,
        }
    }

    fn get_now(&self, partition: u32, key: &[u8]) -> Option<Option<Value>> {
        if self.check_partition(partition).is_err() || self.check_key(key).is_err() {
            return None;
        }
        let answer = match self.lookup(partition, key, key_hash(key)) {
            Lookup::Cached(value) => Some(value),
            Lookup::Absent => None,
            Lookup::At(_) => return None,
        };
        self.state.borrow_mut().stats.gets += 1;
        Some(answer)
    }

    async fn get(&self, partition: u32, key: &[u8]) -> Result<Option<Value>> {
        self.check_partition(partition)?;
        self.check_key(key)?;
        let hash = key_hash(key);
        {
            let mut st = self.state.borrow_mut();
            if st.closed {
                return Err(StorageError::Closed);
            }
            st.stats.gets += 1;
        }
        // A record can move (compaction) between the index lookup and the
        // read; then the lookup is repeated. Each move needs a whole
        // compaction, so a handful of attempts always suffices in practice.
        for _ in 0..8 {
            let location = match self.lookup(partition, key, hash) {
                Lookup::Cached(value) => return Ok(Some(value)),
                Lookup::Absent => return Ok(None),
                Lookup::At(location) => location,
            };
            if let Some(value) = self.read_value(partition, key, hash, location).await? {
                return Ok(Some(value));
            }
        }
        Err(StorageError::Io {
            op: IoOp::Read,
            path: self.paths.partition_dir(partition),
            source: std::sync::Arc::new(std::io::Error::other("record kept moving during the read")),
        })
    }

    /// Reads the value at `location`; `Ok(None)` when the segment is gone
    /// (the record moved and the index must be consulted again).
    async fn read_value(&self, partition: u32, key: &[u8], hash: u64, location: Location) -> Result<Option<Value>> {
        let len = record_len(key.len(), location.value_len as usize);
        let offset = u64::from(location.offset);
        let (file, segment_id, memory_start) = {
            let st = self.state.borrow();
            let Some(part) = st.partitions.get(&partition) else { return Ok(None) };
            let Some(segment) = part.segments.get(location.slot as usize) else { return Ok(None) };
            let buffer = part.buffer_of(location.slot);
            let memory_start = buffer.map(|b| b.memory_start());
            if let Some(buffer) = buffer.filter(|b| offset >= b.memory_start()) {
                let mut bytes = Vec::with_capacity(len);
                buffer.copy_out(offset, len, &mut bytes);
                let path = self.paths.segment(partition, segment.id);
                drop(st);
                self.state.borrow_mut().stats.reads_from_memory += 1;
                // Bytes this process encoded and never read back from a
                // disk: only the disk can damage them, so no CRC pass here.
                return self
                    .check_buffered_record(&bytes, partition, key, &path, offset)
                    .map(|v| Some(Value::new(key, v)));
            }
            (segment.file.clone(), segment.id, memory_start)
        };
        let path = self.paths.segment(partition, segment_id);
        let Some(file) = file else {
            // A segment without a file keeps all its bytes in memory, until
            // `close` takes the files.
            debug_assert!(self.state.borrow().closed, "a segment without a file or buffer");
            return Err(StorageError::Closed);
        };
        let mut bytes = Vec::with_capacity(len);
        let end = offset + len as u64;
        let mut at = offset;
        let mut memory_start = memory_start;
        while at < end {
            if let Some(start) = memory_start {
                if at >= start {
                    // The rest is still buffered (a record straddling the
                    // written part and the buffer).
                    let st = self.state.borrow();
                    let Some(buffer) = st.partitions.get(&partition).and_then(|p| p.buffer_of(location.slot)) else {
                        return Ok(None);
                    };
                    if at < buffer.memory_start() {
                        memory_start = Some(buffer.memory_start());
                        continue;
                    }
                    buffer.copy_out(at, (end - at) as usize, &mut bytes);
                    break;
                }
            }
            let upto = memory_start.map_or(end, |s| s.min(end));
            let read =
                file.read_at(at, (upto - at) as usize).await.map_err(|e| StorageError::io(IoOp::Read, &path, e))?;
            if read.len() < (upto - at) as usize {
                self.state.borrow_mut().stats.corrupt_records += 1;
                return Err(StorageError::Corrupt {
                    path,
                    offset,
                    error: RecordError::Truncated { needed_bytes: len, available_bytes: bytes.len() + read.len() },
                });
            }
            bytes.extend_from_slice(&read);
            at = upto;
            memory_start = {
                let st = self.state.borrow();
                st.partitions.get(&partition).and_then(|p| p.buffer_of(location.slot)).map(|b| b.memory_start())
            };
        }
        self.state.borrow_mut().stats.disk_reads += 1;
        let value = Value::new(key, self.check_record(&bytes, partition, key, &path, offset)?);
        // Cache it only if it is still the key's value: a write or a
        // removal may have come in during the read.
        // (The segment id too: a slot can be reused by a newer segment.)
        let current = {
            let st = self.state.borrow();
            st.partitions.get(&partition).is_some_and(|p| {
                p.index.get(key) == Some(location)
                    && p.segments.get(location.slot as usize).is_some_and(|s| s.id == segment_id)
            })
        };
        if current {
            self.cache.borrow_mut().insert_value(partition, hash, value.clone());
        }
        Ok(Some(value))
    }

    /// `check_record` for bytes still in this process's buffers: header and
    /// key are checked (a wrong location is still a bug worth reporting),
    /// the CRC is not.
    fn check_buffered_record<'a>(
        &self,
        bytes: &'a [u8],
        partition: u32,
        key: &[u8],
        path: &Path,
        offset: u64,
    ) -> Result<&'a [u8]> {
        match super::format::parse_header(bytes) {
            Ok(h) if h.kind == RecordKind::Put && h.partition == partition && h.record_len() == bytes.len() => {
                let key_start = super::format::RECORD_HEADER_BYTES;
                let value_start = key_start + super::format::align_up(h.key_len, super::format::RECORD_ALIGN_BYTES);
                if &bytes[key_start..key_start + h.key_len] == key {
                    return Ok(&bytes[value_start..value_start + h.value_len]);
                }
                self.check_record(bytes, partition, key, path, offset)
            }
            _ => self.check_record(bytes, partition, key, path, offset),
        }
    }

    /// Validates a record read for `key` and returns its value bytes.
    fn check_record<'a>(
        &self,
        bytes: &'a [u8],
        partition: u32,
        key: &[u8],
        path: &Path,
        offset: u64,
    ) -> Result<&'a [u8]> {
        let fail = |error| {
            self.state.borrow_mut().stats.corrupt_records += 1;
            tracing::error!(path = %path.display(), offset, %error, "corrupt record not served");
            Err(StorageError::Corrupt { path: path.to_owned(), offset, error })
        };
        match parse_record(bytes) {
            Ok(r) if r.kind == RecordKind::Put && r.partition == partition && r.key == key => Ok(r.value),
            // Valid CRC but not the record the index expects: the index and
            // the file disagree, which only damage can cause.
            Ok(_) => fail(RecordError::BadHeader),
            Err(error) => fail(error),
        }
    }
}

fn count_write<D: Disk>(st: &mut State<D>, kind: RecordKind) {
    match kind {
        RecordKind::Put => st.stats.puts += 1,
        _ => st.stats.removes += 1,
    }
}

/// Copies an encoded record into its partition; `cached` is the value for
/// the cache if the writer built one. Returns bytes buffered.
#[allow(clippy::too_many_arguments)]
pub(crate) fn apply<D: Disk>(
    inner: &Inner<D>,
    partitions: &mut PartitionTable<PartitionState<D>>,
    partition: u32,
    kind: RecordKind,
    lsn: u64,
    key: &[u8],
    record: &[u8],
    cached: Option<Value>,
) -> usize {
    let part = partitions.get_or_insert_with(partition, || PartitionState::new(partition));
    let outcome = part.append(inner, kind, lsn, key, record.len(), |out| out.copy_from_slice(record), cached);
    if outcome.needs_flush {
        inner.segment_work.notify();
    }
    outcome.buffered_bytes
}

/// Resolves when the log task completes the waiter `key`.
pub struct WaitAck<'a, D: Disk> {
    inner: &'a Inner<D>,
    key: Option<usize>,
}

impl<D: Disk> Future for WaitAck<'_, D> {
    type Output = Result<()>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let key = self.key.expect("polled after completion");
        let mut waiters = self.inner.waiters.borrow_mut();
        match &mut waiters[key] {
            WaiterSlot::Waiting(waker) => {
                *waker = Some(cx.waker().clone());
                Poll::Pending
            }
            WaiterSlot::Done(_) => {
                let WaiterSlot::Done(result) = waiters.remove(key) else { unreachable!() };
                drop(waiters);
                self.key = None;
                Poll::Ready(result)
            }
            WaiterSlot::Abandoned => unreachable!("a live waiter is never abandoned"),
        }
    }
}

impl<D: Disk> Drop for WaitAck<'_, D> {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            let mut waiters = self.inner.waiters.borrow_mut();
            if matches!(waiters[key], WaiterSlot::Done(_)) {
                waiters.remove(key);
            } else {
                // The write may still become durable; only nobody hears of it.
                waiters[key] = WaiterSlot::Abandoned;
            }
        }
    }
}

/// Outcome of `ShardStore::try_put`.
pub enum TryPut<'a, D: Disk> {
    Queued(Queued<'a, D>),
    WouldWait,
}

/// A write in a commit batch (or, outside group mode, already applied).
pub struct Queued<'a, D: Disk> {
    pub batch_seq: u64,
    ack: Option<WaitAck<'a, D>>,
}

impl<D: Disk> Queued<'_, D> {
    /// Waits until the write is durable per the sync mode.
    pub async fn durable(self) -> Result<()> {
        match self.ack {
            Some(ack) => ack.await,
            None => Ok(()),
        }
    }
}

/// One shard's storage. Cheap to clone (a shared handle).
pub struct ShardStore<D: Disk> {
    pub(crate) inner: Rc<Inner<D>>,
}

impl<D: Disk> Clone for ShardStore<D> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone() }
    }
}

/// The background work of a store (log writer, segment writer, compaction);
/// the caller spawns it on the shard's executor. It ends after `close`.
pub type Background = Pin<Box<dyn Future<Output = ()>>>;

impl<D: Disk> ShardStore<D> {
    /// Opens (recovering if needed) the partitions of `layout.shard` under
    /// `root`, which must already be locked and initialised (`data_dir`).
    pub async fn open(disk: D, root: &Path, config: StorageConfig, layout: ShardLayout) -> Result<(Self, Background)> {
        config.validate()?;
        let inner = Rc::new(Inner::new(disk, config, layout, root));
        inner.recover().await?;
        let background_inner = inner.clone();
        let background: Background = Box::pin(async move { background_inner.run_background().await });
        Ok((Self { inner }, background))
    }

    pub fn layout(&self) -> ShardLayout {
        self.inner.layout
    }

    pub fn config(&self) -> &StorageConfig {
        &self.inner.config
    }

    pub fn partition(&self, partition: u32) -> PartitionStore<D> {
        PartitionStore { store: self.clone(), partition }
    }

    pub async fn get(&self, partition: u32, key: &[u8]) -> Result<Option<Value>> {
        self.inner.get(partition, key).await
    }

    /// First stage of a two-stage prefetch for an operation a few places
    /// ahead in a batch, on `partition`'s key with `key_hash` `hash`:
    /// starts loading its cache slot and, for a write, its index slot.
    /// Some operations later, `prefetch_entries` follows what those slots
    /// refer to. The misses of a batch's lookups then overlap instead of
    /// following one another. Hints only: nothing observable changes.
    pub fn prefetch_slots(&self, partition: u32, hash: u64, write: bool) {
        self.inner.cache.borrow().prefetch_slot(partition, hash);
        if write {
            if let Some(part) = self.inner.state.borrow().partitions.get(&partition) {
                part.index.prefetch(hash);
            }
        }
    }

    /// Second stage (see `prefetch_slots`): the cached value, and for a
    /// write the indexed key, that the slots refer to.
    pub fn prefetch_entries(&self, partition: u32, hash: u64, write: bool) {
        self.inner.cache.borrow().prefetch_value(partition, hash);
        if write {
            if let Some(part) = self.inner.state.borrow().partitions.get(&partition) {
                part.index.prefetch_key(hash);
            }
        }
    }

    /// `get` when it needs no I/O: `Some(answer)` when the cache holds the
    /// key or the index has no such key; `None` when only `get` can answer
    /// (the value is in a write buffer or on the disk, or the request is
    /// invalid and `get` will say why).
    pub fn get_now(&self, partition: u32, key: &[u8]) -> Option<Option<Value>> {
        self.inner.get_now(partition, key)
    }

    /// Stores `value` under `key`. Returns once durable per the sync mode.
    pub async fn put(&self, partition: u32, key: &[u8], value: &[u8]) -> Result<()> {
        self.inner.write(partition, RecordKind::Put, key, value).await
    }

    /// Enqueues a put without waiting for anything: `WouldWait` when the
    /// batch or the buffers are full (then `wait_to_write` and try again).
    /// The returned `Queued` names the commit batch the write is in (group
    /// mode); awaiting `durable` gives the outcome `put` would have.
    pub fn try_put(&self, partition: u32, key: &[u8], value: &[u8]) -> Result<TryPut<'_, D>> {
        self.try_put_cached(partition, key, value, None)
    }

    /// `try_put` of a `Value` (its key and value) that the cache then holds
    /// as it is, with no copy. For a writer that keeps the value itself
    /// meanwhile (the shard's pending writes): one allocation serves both,
    /// and short-lived and cached values do not share allocator pages.
    pub fn try_put_value(&self, partition: u32, value: &Value) -> Result<TryPut<'_, D>> {
        self.try_put_cached(partition, value.key(), value, Some(value))
    }

    fn try_put_cached(
        &self,
        partition: u32,
        key: &[u8],
        value: &[u8],
        cached: Option<&Value>,
    ) -> Result<TryPut<'_, D>> {
        let inner = &*self.inner;
        let len = inner.admit_write(partition, key, value)?;
        let batch_seq = inner.state.borrow().batch_seq;
        Ok(match inner.try_write_cached(partition, RecordKind::Put, key, value, len, cached)? {
            WriteStep::Done => TryPut::Queued(Queued { batch_seq, ack: None }),
            WriteStep::AwaitAck(waiter) => {
                TryPut::Queued(Queued { batch_seq, ack: Some(WaitAck { inner, key: Some(waiter) }) })
            }
            WriteStep::WaitForSpace | WriteStep::WaitForBatch => TryPut::WouldWait,
        })
    }

    /// Resolves when a `try_put` that said `WouldWait` may succeed.
    pub async fn wait_to_write(&self) {
        let room = self.inner.batch_taken.listen();
        let space = self.inner.flushed.listen();
        futures::future::select(room, space).await;
    }

    /// The commit batch writes enqueued now go into (group mode).
    pub fn open_batch(&self) -> u64 {
        self.inner.state.borrow().batch_seq
    }

    /// Physically removes `key` (writes a tombstone record so the removal
    /// survives restarts and compaction).
    pub async fn remove(&self, partition: u32, key: &[u8]) -> Result<()> {
        self.inner.write(partition, RecordKind::Remove, key, &[]).await
    }

    /// Live keys of a partition, in no particular order (a snapshot).
    pub fn keys(&self, partition: u32) -> Vec<Vec<u8>> {
        let st = self.inner.state.borrow();
        st.partitions.get(&partition).map(|p| p.index.iter().map(|(k, _)| k.to_vec()).collect()).unwrap_or_default()
    }

    /// Folds over every live (key, value) of a partition. Keys are snapshotted
    /// first; a key removed during the fold is skipped.
    pub async fn fold<A>(&self, partition: u32, init: A, mut f: impl FnMut(A, &[u8], &[u8]) -> A) -> Result<A> {
        let mut acc = init;
        for key in self.keys(partition) {
            if let Some(value) = self.get(partition, &key).await? {
                acc = f(acc, &key, &value);
            }
        }
        Ok(acc)
    }

    /// Partitions with any data on this shard.
    pub fn partitions(&self) -> Vec<u32> {
        self.inner.state.borrow().partitions.keys().collect()
    }

    /// Makes every write so far durable in partition segments (a checkpoint).
    pub async fn sync(&self) -> Result<()> {
        self.inner.checkpoint_all().await
    }

    /// Compacts a partition now if any segment passes the dead-byte threshold.
    pub async fn compact(&self, partition: u32) -> Result<bool> {
        self.inner.compact_partition(partition).await
    }

    /// Reads every segment of a partition and checks every record.
    pub async fn verify(&self, partition: u32) -> Result<VerifyReport> {
        self.inner.verify_partition(partition).await
    }

    pub fn stats(&self) -> StorageStats {
        let st = self.inner.state.borrow();
        let mut stats = st.stats;
        stats.keys = st.partitions.values().map(|p| p.index.len() as u64).sum();
        stats.index_overhead_bytes = st.partitions.values().map(|p| p.index.overhead_bytes() as u64).sum();
        stats.buffered_bytes = st.buffered_bytes as u64;
        stats.segment_data_bytes =
            st.partitions.values().flat_map(|p| p.segments.iter()).map(|(_, s)| s.data_end).sum();
        stats
    }

    pub fn health(&self) -> Health {
        let st = self.inner.state.borrow();
        match (&st.unhealthy, &st.full) {
            (Some(reason), _) => Health::Unhealthy(reason.clone()),
            (None, Some(path)) => Health::Full { path: path.clone() },
            (None, None) => Health::Healthy,
        }
    }

    /// Stops accepting writes, makes everything durable, and ends the
    /// background task. Later calls fail with `Closed`.
    pub async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}

/// The storage of one partition replica: a view of its shard's store.
pub struct PartitionStore<D: Disk> {
    store: ShardStore<D>,
    partition: u32,
}

impl<D: Disk> PartitionStore<D> {
    pub fn id(&self) -> u32 {
        self.partition
    }

    pub async fn get(&self, key: &[u8]) -> Result<Option<Value>> {
        self.store.get(self.partition, key).await
    }

    pub async fn put(&self, key: &[u8], value: &[u8]) -> Result<()> {
        self.store.put(self.partition, key, value).await
    }

    pub async fn remove(&self, key: &[u8]) -> Result<()> {
        self.store.remove(self.partition, key).await
    }

    pub async fn fold<A>(&self, init: A, f: impl FnMut(A, &[u8], &[u8]) -> A) -> Result<A> {
        self.store.fold(self.partition, init, f).await
    }

    pub fn keys(&self) -> Vec<Vec<u8>> {
        self.store.keys(self.partition)
    }
}
