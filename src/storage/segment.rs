//! Partition replicas on disk: segment files, their in-memory write buffers,
//! the segment task that writes, syncs and seals them, the scanner that reads
//! them back, and hint files.
//!
//! A partition is a directory of append-only segments. The active segment's
//! newest bytes sit in a buffer (`SegmentBuffer`) whose whole 4 KiB blocks are
//! cut off into write units and written in order by the segment task. A
//! partial block is written only after a pad record fills it, so no block
//! that holds acknowledged data is ever written twice. A segment that reaches
//! `segment_bytes` is retired: padded, written, fdatasync'ed and marked
//! sealed, strictly before any byte of the next segment reaches the disk
//! (so recovery may trust that a later segment implies a complete earlier
//! one). The maintenance task then writes its hint file.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::path::Path;
use std::rc::Rc;
use std::task::Poll;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use slab::Slab;

use super::cache::{key_hash, Value};
use super::disk::{close_quietly, is_no_space, Disk, DiskBuffer, DiskFile, OpenMode};
use super::format::{
    align_up, align_up_u64, encode_pad, pad_len, parse_record, HintEntries, HintEntry, HintHeader, RecordError,
    RecordKind, RecordView, SegmentHeader, SegmentKind, BLOCK_BYTES, FILE_HEADER_BYTES, RECORD_ALIGN_BYTES,
    RECORD_HEADER_BYTES,
};
use super::index::{KeyIndex, Location};
use super::store::{Inner, Paths};
use super::{IoOp, Result, StorageError, UnhealthyReason};
use crate::config::SyncMode;

/// The u16 slot of a segment in its partition's slab. Compaction keeps a
/// partition's segment count small; 65,536 segments of 64 MiB (4 TiB in one
/// partition) is far past any sane partition size.
pub(crate) fn slot_id(slot: usize) -> u16 {
    u16::try_from(slot).expect("a partition holds at most 65536 segments")
}

/// Smallest tail buffer. A shard holds a tail for each partition it
/// writes, and most partitions append far less than a write unit between
/// two flushes (`none` mode flushes every `flush_interval_ms`): a full-size
/// tail for each of them was 256 MiB per shard and, allocated afresh after
/// every flush, a page fault and a zeroed huge page each time.
const TAIL_BYTES_MIN: usize = 8 * BLOCK_BYTES;

/// The first tail of a segment: the smallest, unless the write unit is smaller.
pub(crate) fn tail_bytes_min(write_unit_bytes: usize) -> usize {
    TAIL_BYTES_MIN.min(write_unit_bytes)
}

/// One segment file of a partition.
pub(crate) struct SegmentState<D: Disk> {
    pub id: u64,
    pub kind: SegmentKind,
    /// None until the first write creates the file.
    pub file: Option<Rc<D::File>>,
    /// End of the bytes in use (header, records, pads).
    pub data_end: u64,
    /// Bytes of put records the index points at.
    pub live_bytes: u64,
    /// Bytes of remove records (kept while older segments may hold the key).
    pub tombstone_bytes: u64,
    pub min_lsn: u64,
    pub max_lsn: u64,
    /// Completely written and synced; never changes again.
    pub sealed: bool,
    /// The file's size as allocated (preallocation runs ahead of writes).
    pub allocated: u64,
    /// A hint file covering the whole segment exists, or none will be
    /// written in this run (the segment is damaged, or writing it failed).
    pub hinted: bool,
    /// End of the bytes the segment's hint file on disk describes (0: no
    /// hint). The next hint of a growing segment scans only past it.
    pub hint_end: u64,
}

impl<D: Disk> SegmentState<D> {
    pub fn new(id: u64, kind: SegmentKind) -> Self {
        Self {
            id,
            kind,
            file: None,
            data_end: FILE_HEADER_BYTES as u64,
            live_bytes: 0,
            tombstone_bytes: 0,
            min_lsn: u64::MAX,
            max_lsn: 0,
            sealed: false,
            hinted: false,
            hint_end: 0,
            allocated: 0,
        }
    }

    /// Fraction of record bytes that nothing refers to.
    pub fn dead_ratio(&self) -> f64 {
        let used = self.data_end.saturating_sub(FILE_HEADER_BYTES as u64);
        if used == 0 {
            return 0.0;
        }
        let kept = self.live_bytes + self.tombstone_bytes;
        used.saturating_sub(kept) as f64 / used as f64
    }

    /// Whether compacting this sealed segment is worth it: enough of it is
    /// dead, and rewriting the rest would free at least one block (a small
    /// output's final pad would otherwise count as dead forever and be
    /// compacted again and again).
    pub fn compactable(&self, dead_ratio_min: f64) -> bool {
        let used = self.data_end.saturating_sub(FILE_HEADER_BYTES as u64);
        let kept = align_up((self.live_bytes + self.tombstone_bytes) as usize, BLOCK_BYTES) as u64;
        self.sealed && self.file.is_some() && self.dead_ratio() >= dead_ratio_min && used >= kept + BLOCK_BYTES as u64
    }
}

/// The in-memory end of an appended segment that is still being written.
pub(crate) struct SegmentBuffer<D: Disk> {
    pub slot: u16,
    /// Where the next record goes.
    pub write_offset: u64,
    /// Segment offset of `tail[0]`; a block boundary.
    pub tail_start: u64,
    pub tail: Option<D::Buffer>,
    /// Size of the next tail buffer: it doubles (up to the write unit) each
    /// time a tail fills up, and halves (down to `tail_bytes_min`) each time
    /// a flush finds the tail less than a quarter used, so that a busy
    /// partition writes large units and an idle one holds little memory.
    pub tail_bytes: usize,
    /// Whole blocks cut from the tail and not yet written, in offset order.
    pub unwritten: VecDeque<(u64, Rc<D::Buffer>)>,
    pub last_lsn: u64,
    /// Bytes below this offset are durable (fdatasync'ed).
    pub synced_offset: u64,
    /// When the oldest byte not yet handed to the disk was appended.
    pub dirty_since: Option<Duration>,
}

impl<D: Disk> SegmentBuffer<D> {
    /// Lowest segment offset still held in memory.
    pub fn memory_start(&self) -> u64 {
        self.unwritten.front().map_or(self.tail_start, |(offset, _)| *offset)
    }

    fn tail_used(&self) -> usize {
        (self.write_offset - self.tail_start) as usize
    }

    fn tail_capacity(&self) -> usize {
        self.tail.as_ref().map_or(0, |t| t.len())
    }

    /// Copies `len` bytes at segment `offset` (which must be in memory).
    pub fn copy_out(&self, offset: u64, len: usize, out: &mut Vec<u8>) {
        assert!(offset >= self.memory_start(), "copy_out below the buffered range");
        let end = offset + len as u64;
        let chunks = self
            .unwritten
            .iter()
            .map(|(start, buffer)| (*start, buffer.as_bytes()))
            .chain(self.tail.iter().map(|t| (self.tail_start, &t.as_bytes()[..self.tail_used()])));
        for (start, bytes) in chunks {
            let chunk_end = start + bytes.len() as u64;
            if chunk_end <= offset || start >= end {
                continue;
            }
            let from = offset.max(start);
            let to = end.min(chunk_end);
            out.extend_from_slice(&bytes[(from - start) as usize..(to - start) as usize]);
        }
    }

    /// Moves the tail's whole blocks (all of it when `everything`, which
    /// requires a block-aligned end) to the unwritten queue.
    fn cut(&mut self, disk: &D, everything: bool) {
        let used = self.tail_used();
        let cut = if everything {
            assert_eq!(used % BLOCK_BYTES, 0, "cut of an unpadded tail");
            used
        } else {
            used / BLOCK_BYTES * BLOCK_BYTES
        };
        if cut == 0 {
            return;
        }
        let mut old = self.tail.take().expect("non-empty tail");
        let rest = used - cut;
        if rest > 0 {
            let mut fresh = disk.alloc_buffer(self.tail_bytes.max(align_up(rest, BLOCK_BYTES)));
            fresh.as_bytes_mut()[..rest].copy_from_slice(&old.as_bytes()[cut..used]);
            self.tail = Some(fresh);
        }
        old.trim(cut);
        self.unwritten.push_back((self.tail_start, Rc::new(old)));
        self.tail_start += cut as u64;
    }

    /// Makes room for `len` more bytes in the tail.
    fn reserve(&mut self, disk: &D, write_unit_bytes: usize, len: usize) {
        let capacity = self.tail_capacity();
        if self.tail_used() + len <= capacity {
            return;
        }
        if capacity > 0 {
            // A tail filled up between flushes: this partition is busy.
            self.tail_bytes = (capacity * 2).min(write_unit_bytes).max(self.tail_bytes);
        }
        self.cut(disk, false);
        let used = self.tail_used();
        let capacity = self.tail_capacity();
        if used + len <= capacity {
            return;
        }
        let mut fresh = disk.alloc_buffer(self.tail_bytes.max(align_up(used + len, BLOCK_BYTES)));
        if let Some(old) = &self.tail {
            fresh.as_bytes_mut()[..used].copy_from_slice(&old.as_bytes()[..used]);
        }
        self.tail = Some(fresh);
    }

    /// Appends `len` bytes written by `fill`; returns the record's offset.
    fn push(&mut self, disk: &D, write_unit_bytes: usize, len: usize, fill: impl FnOnce(&mut [u8])) -> u64 {
        self.reserve(disk, write_unit_bytes, len);
        let at = self.tail_used();
        let tail = self.tail.as_mut().expect("reserved tail");
        fill(&mut tail.as_bytes_mut()[at..at + len]);
        let offset = self.write_offset;
        self.write_offset += len as u64;
        offset
    }

    /// Pads to a block boundary; returns the bytes added.
    fn pad(&mut self, disk: &D, write_unit_bytes: usize, partition: u32) -> usize {
        let len = pad_len(self.write_offset);
        if len > 0 {
            let lsn = self.last_lsn;
            self.push(disk, write_unit_bytes, len, |out| encode_pad(out, partition, lsn));
        }
        len
    }

    /// Pads the tail and cuts all of it for writing (a flush, a seal, a
    /// close); returns the bytes of padding added.
    fn cut_all(&mut self, disk: &D, write_unit_bytes: usize, partition: u32) -> usize {
        if self.tail_used() * 4 < self.tail_capacity() {
            self.tail_bytes = (self.tail_bytes / 2).max(tail_bytes_min(write_unit_bytes));
        }
        let padding = self.pad(disk, write_unit_bytes, partition);
        self.cut(disk, true);
        padding
    }

    fn has_unwritten(&self) -> bool {
        !self.unwritten.is_empty()
    }
}

/// What an append did, for the caller's bookkeeping.
pub(crate) struct AppendOutcome {
    pub buffered_bytes: usize,
    /// Whole write units are waiting: the segment task should run.
    pub needs_flush: bool,
}

/// One partition replica owned by this shard.
pub(crate) struct PartitionState<D: Disk> {
    pub id: u32,
    pub index: KeyIndex<Location>,
    pub segments: Slab<SegmentState<D>>,
    pub active: Option<SegmentBuffer<D>>,
    /// Retired active segments waiting to be written out and sealed, oldest first.
    pub sealing: VecDeque<SegmentBuffer<D>>,
    pub next_segment_id: u64,
    /// Highest lsn appended.
    pub max_lsn: u64,
    /// Every record with lsn <= this is durable in segment files.
    pub synced_lsn: u64,
    /// Lsn of the newest remove record (a removal is durable once synced).
    pub last_remove_lsn: u64,
    /// A checkpoint asked for records up to this lsn to be made durable.
    pub sync_target: u64,
    pub flushing: bool,
    pub compacting: bool,
    /// `verify` is reading the partition's hints: no compaction starts.
    pub verifying: bool,
    pub dir_ready: bool,
    /// A file was created in the partition directory since its last sync.
    pub dir_sync_pending: bool,
}

impl<D: Disk> PartitionState<D> {
    pub fn new(id: u32) -> Self {
        Self {
            id,
            index: KeyIndex::default(),
            segments: Slab::new(),
            active: None,
            sealing: VecDeque::new(),
            next_segment_id: 1,
            max_lsn: 0,
            synced_lsn: 0,
            last_remove_lsn: 0,
            sync_target: 0,
            flushing: false,
            compacting: false,
            verifying: false,
            dir_ready: false,
            dir_sync_pending: false,
        }
    }

    /// Whether the record at `location` is durable in its segment file.
    pub fn is_durable(&self, location: Location) -> bool {
        match self.buffer_of(location.slot) {
            Some(buffer) => u64::from(location.offset) < buffer.synced_offset,
            None => self.segments.get(location.slot as usize).is_some_and(|s| s.sealed),
        }
    }

    /// The write buffer of segment `slot`, if it is still being written.
    pub fn buffer_of(&self, slot: u16) -> Option<&SegmentBuffer<D>> {
        self.active.iter().chain(self.sealing.iter()).find(|b| b.slot == slot)
    }

    fn buffer_of_mut(&mut self, slot: u16) -> Option<&mut SegmentBuffer<D>> {
        self.active.iter_mut().chain(self.sealing.iter_mut()).find(|b| b.slot == slot)
    }

    /// Starts a new appended segment whose header is the first buffered block.
    fn start_segment(&mut self, inner: &Inner<D>) -> usize {
        let id = self.next_segment_id;
        self.next_segment_id += 1;
        let slot = slot_id(self.segments.insert(SegmentState::new(id, SegmentKind::Appended)));
        let tail_bytes = tail_bytes_min(inner.config.segment_write_bytes);
        // The header block and room for at least one more.
        let mut tail = inner.disk.alloc_buffer(tail_bytes.max(2 * BLOCK_BYTES));
        let header = SegmentHeader {
            kind: SegmentKind::Appended,
            partition: self.id,
            segment_id: id,
            partition_count: inner.layout.partition_count,
            supersedes: Vec::new(),
        };
        header.encode(&mut tail.as_bytes_mut()[..FILE_HEADER_BYTES]);
        self.active = Some(SegmentBuffer {
            slot,
            write_offset: FILE_HEADER_BYTES as u64,
            tail_start: 0,
            tail: Some(tail),
            tail_bytes,
            unwritten: VecDeque::new(),
            last_lsn: 0,
            synced_offset: 0,
            dirty_since: Some(inner.disk.now()),
        });
        FILE_HEADER_BYTES
    }

    /// Appends one record (bytes written by `fill`) and updates the index
    /// and the cache (with `cached` as the key's value when the writer built
    /// one; it must hold the record's key and value).
    #[allow(clippy::too_many_arguments)]
    pub fn append(
        &mut self,
        inner: &Inner<D>,
        kind: RecordKind,
        lsn: u64,
        key: &[u8],
        len: usize,
        fill: impl FnOnce(&mut [u8]),
        cached: Option<Value>,
    ) -> AppendOutcome {
        debug_assert!(lsn > self.max_lsn, "lsn {lsn} after {}", self.max_lsn);
        let config = &inner.config;
        let mut buffered = 0;
        if let Some(active) = &self.active {
            let full = active.write_offset + len as u64 > config.segment_bytes;
            if full && active.write_offset > FILE_HEADER_BYTES as u64 {
                let retired = self.active.take().expect("checked");
                self.sealing.push_back(retired);
            }
        }
        if self.active.is_none() {
            buffered += self.start_segment(inner);
        }
        let hash = key_hash(key);
        let caching = kind == RecordKind::Put && inner.config.cache_writes;
        self.index.prefetch(hash);
        if caching {
            inner.cache.borrow().prefetch_insert(self.id, hash);
        }
        let active = self.active.as_mut().expect("started");
        let offset = active.push(&inner.disk, config.segment_write_bytes, len, fill);
        // The true value length is in the record header just written (the
        // record length includes the value's padding).
        let value_len = {
            let at = (offset - active.tail_start) as usize;
            let header = &active.tail.as_ref().expect("just written").as_bytes()[at..at + RECORD_HEADER_BYTES];
            u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"))
        };
        debug_assert_eq!(super::format::record_len(key.len(), value_len as usize), len);
        active.last_lsn = lsn;
        active.dirty_since.get_or_insert_with(|| inner.disk.now());
        let slot = active.slot;
        let needs_flush = active.has_unwritten() || !self.sealing.is_empty();
        buffered += len;
        let segment = &mut self.segments[slot as usize];
        segment.data_end = offset + len as u64;
        segment.min_lsn = segment.min_lsn.min(lsn);
        segment.max_lsn = lsn;
        self.max_lsn = lsn;
        let offset = u32::try_from(offset).expect("segment_bytes is validated to fit u32");
        let previous = match kind {
            RecordKind::Put => {
                segment.live_bytes += len as u64;
                let location = Location { slot, offset, value_len };
                let previous = self.index.insert_hashed(hash, key, location);
                debug_assert!(self.index.get(key) == Some(location));
                previous
            }
            RecordKind::Remove => {
                self.last_remove_lsn = lsn;
                segment.tombstone_bytes += len as u64;
                self.index.remove(key)
            }
            RecordKind::Pad => unreachable!("pads are appended by SegmentBuffer::pad"),
        };
        if let Some(old) = previous {
            let old_len = super::format::record_len(key.len(), old.value_len as usize) as u64;
            self.segments[old.slot as usize].live_bytes -= old_len;
        }
        // The cache follows the index (see `cache.rs`): the new value, or
        // no entry at all. After the index update, so that the cache lines
        // prefetched above arrive meanwhile.
        if caching {
            let at = (u64::from(offset) - active.tail_start) as usize;
            let value_start = at + RECORD_HEADER_BYTES + align_up(key.len(), RECORD_ALIGN_BYTES);
            let bytes =
                &active.tail.as_ref().expect("just written").as_bytes()[value_start..value_start + value_len as usize];
            match cached {
                Some(value) => {
                    debug_assert!(value.key() == key && *value == *bytes, "a cached value differs from its record");
                    inner.cache.borrow_mut().insert_value(self.id, hash, value);
                }
                None => inner.cache.borrow_mut().insert(self.id, hash, key, bytes),
            }
        } else {
            inner.cache.borrow_mut().invalidate(self.id, hash, key);
        }
        AppendOutcome { buffered_bytes: buffered, needs_flush }
    }

    /// Whether the segment task has anything to do here now.
    /// Under memory `pressure` every tail with a whole block is written, so
    /// that many partially filled buffers cannot hold the whole budget while
    /// writers wait for space.
    fn needs_work(
        &self,
        mode: SyncMode,
        now: Duration,
        flush_interval: Duration,
        closing: bool,
        pressure: bool,
    ) -> bool {
        if self.flushing {
            return false;
        }
        if !self.sealing.is_empty() || self.sync_target > self.synced_lsn {
            return true;
        }
        let Some(active) = &self.active else { return false };
        if active.has_unwritten() {
            return true;
        }
        if pressure && active.tail_used() >= BLOCK_BYTES {
            return true;
        }
        let buffered = active.write_offset > active.tail_start;
        buffered
            && (closing || (mode == SyncMode::None && active.dirty_since.is_some_and(|t| t + flush_interval <= now)))
    }

    /// When the flush interval of this partition's buffer expires (`none` mode).
    fn flush_deadline(&self, flush_interval: Duration) -> Option<Duration> {
        let active = self.active.as_ref()?;
        (active.write_offset > active.tail_start).then_some(active.dirty_since? + flush_interval)
    }
}

/// What the segment task does to a partition's active segment in one job.
enum ActiveAction {
    /// Write the whole blocks already cut.
    WriteCut,
    /// Pad, write everything, and (with `Some((lsn, offset))`) fdatasync:
    /// then every record up to `lsn`, and every byte below `offset`, is durable.
    WriteAll { sync_lsn: Option<(u64, u64)> },
}

/// Events the segment task waits for.
enum SegmentEvent {
    JobDone(u32, Result<()>),
    Work,
    Timer,
}

impl<D: Disk> Inner<D> {
    /// The segment task: runs flush jobs, at most one per partition at a time,
    /// jobs of different partitions concurrently. Ends after close.
    pub(crate) async fn segment_loop(&self) {
        let mut running = FuturesUnordered::new();
        let flush_interval = Duration::from_millis(self.config.flush_interval_ms);
        loop {
            let work = self.segment_work.listen();
            let now = self.disk.now();
            let (jobs, deadline) = {
                let mut st = self.state.borrow_mut();
                if st.closed && running.is_empty() {
                    return;
                }
                // An unhealthy shard writes nothing more; a full one waits
                // for its retry time.
                let retry_wait = st.full_retry_at.filter(|at| *at > now);
                let healthy = st.unhealthy.is_none();
                let pressure = st.buffered_bytes > self.config.write_buffer_bytes_max / 2;
                let closing = st.closing;
                let mut jobs = Vec::new();
                let mut deadline = retry_wait;
                for part in st.partitions.values_mut() {
                    if healthy
                        && retry_wait.is_none()
                        && part.needs_work(self.config.sync_mode, now, flush_interval, closing, pressure)
                    {
                        part.flushing = true;
                        jobs.push(part.id);
                    } else if healthy
                        && retry_wait.is_none()
                        && self.config.sync_mode == SyncMode::None
                        && !part.flushing
                    {
                        if let Some(d) = part.flush_deadline(flush_interval) {
                            deadline = Some(deadline.map_or(d, |x: Duration| x.min(d)));
                        }
                    }
                }
                (jobs, deadline)
            };
            for partition in jobs {
                running.push(async move { (partition, self.flush_partition(partition).await) });
            }
            let mut work = work;
            let mut timer = deadline.map(|d| Box::pin(self.disk.sleep(d.saturating_sub(now))));
            let event = poll_fn(|cx| {
                if let Poll::Ready(Some((p, r))) = running.poll_next_unpin(cx) {
                    return Poll::Ready(SegmentEvent::JobDone(p, r));
                }
                if work.poll_unpin(cx).is_ready() {
                    return Poll::Ready(SegmentEvent::Work);
                }
                if let Some(t) = timer.as_mut() {
                    if t.poll_unpin(cx).is_ready() {
                        return Poll::Ready(SegmentEvent::Timer);
                    }
                }
                Poll::Pending
            })
            .await;
            // Let foreground tasks run between rounds of jobs.
            super::sync::yield_now().await;
            if let SegmentEvent::JobDone(partition, result) = event {
                if let Some(part) = self.state.borrow_mut().partitions.get_mut(&partition) {
                    part.flushing = false;
                }
                match result {
                    Ok(()) | Err(StorageError::StorageFull { .. }) | Err(StorageError::Unhealthy { .. }) => {}
                    // A job that failed any other way would be retried at
                    // once, forever: stop writing instead.
                    Err(error) => self.set_unhealthy(UnhealthyReason::WriteFailed {
                        path: self.paths.partition_dir(partition),
                        source: std::sync::Arc::new(std::io::Error::other(error.to_string())),
                    }),
                }
                self.flushed.notify();
            }
        }
    }

    /// Creates the partition directory (and makes its name durable) once.
    async fn ensure_partition_dir(&self, partition: u32) -> Result<()> {
        let ready = self.state.borrow().partitions.get(&partition).is_some_and(|p| p.dir_ready);
        if ready {
            return Ok(());
        }
        let dir = self.paths.partition_dir(partition);
        self.disk.create_dir_all(&dir).await.map_err(|e| self.write_error(&dir, e))?;
        self.disk.sync_dir(&self.paths.partitions).await.map_err(|e| self.write_error(&self.paths.partitions, e))?;
        if let Some(part) = self.state.borrow_mut().partitions.get_mut(&partition) {
            part.dir_ready = true;
        }
        Ok(())
    }

    /// One flush job: seal retired segments (oldest first), then write (and if
    /// a checkpoint asks, sync) the active segment.
    pub(crate) async fn flush_partition(&self, partition: u32) -> Result<()> {
        self.ensure_partition_dir(partition).await?;
        loop {
            let slot = {
                let mut st = self.state.borrow_mut();
                let st = &mut *st;
                let part = st.partitions.get_mut(&partition).expect("flushed partition exists");
                let Some(retired) = part.sealing.front_mut() else { break };
                st.buffered_bytes += retired.cut_all(&self.disk, self.config.segment_write_bytes, partition);
                let (slot, end) = (retired.slot, retired.write_offset);
                st.partitions.get_mut(&partition).expect("partition").segments[slot as usize].data_end = end;
                slot
            };
            self.write_unwritten(partition, slot).await?;
            self.trim_preallocation(partition, slot).await?;
            self.sync_segment(partition, slot).await?;
            let mut st = self.state.borrow_mut();
            st.stats.segments_sealed += 1;
            let part = st.partitions.get_mut(&partition).expect("flushed partition exists");
            let retired = part.sealing.pop_front().expect("sealed the front");
            assert_eq!(retired.slot, slot);
            part.segments[slot as usize].sealed = true;
            part.synced_lsn = part.synced_lsn.max(retired.last_lsn);
            drop(st);
            self.maintenance_work.notify();
        }
        let now = self.disk.now();
        let (slot, action) = {
            let mut st = self.state.borrow_mut();
            let st = &mut *st;
            let closing = st.closing;
            let part = st.partitions.get_mut(&partition).expect("flushed partition exists");
            let sync = part.sync_target > part.synced_lsn;
            let Some(active) = part.active.as_mut() else {
                if sync {
                    // Everything appended is in sealed segments.
                    part.synced_lsn = part.max_lsn;
                }
                return Ok(());
            };
            let interval_due = self.config.sync_mode == SyncMode::None
                && active.dirty_since.is_some_and(|t| t + Duration::from_millis(self.config.flush_interval_ms) <= now);
            let action = if sync || closing || interval_due {
                st.buffered_bytes += active.cut_all(&self.disk, self.config.segment_write_bytes, partition);
                active.dirty_since = None;
                part.segments[active.slot as usize].data_end = active.write_offset;
                ActiveAction::WriteAll { sync_lsn: sync.then_some((part.max_lsn, active.write_offset)) }
            } else {
                if st.buffered_bytes > self.config.write_buffer_bytes_max / 2 {
                    // Memory pressure: write the whole blocks of this tail
                    // even though it is not a full write unit.
                    active.cut(&self.disk, false);
                }
                ActiveAction::WriteCut
            };
            (active.slot, action)
        };
        self.write_unwritten(partition, slot).await?;
        if let ActiveAction::WriteAll { sync_lsn: Some((lsn, offset)) } = action {
            self.sync_segment(partition, slot).await?;
            let mut st = self.state.borrow_mut();
            let part = st.partitions.get_mut(&partition).expect("flushed partition exists");
            part.synced_lsn = part.synced_lsn.max(lsn);
            if let Some(buffer) = part.buffer_of_mut(slot) {
                buffer.synced_offset = buffer.synced_offset.max(offset);
            }
        }
        Ok(())
    }

    /// Writes the unwritten blocks of segment `slot` in order, creating the
    /// file on the first write. On failure the blocks stay queued.
    async fn write_unwritten(&self, partition: u32, slot: u16) -> Result<()> {
        loop {
            let (offset, buffer, file, id) = {
                let st = self.state.borrow();
                let part = &st.partitions[&partition];
                let Some(buffer) = part.buffer_of(slot) else { return Ok(()) };
                let Some((offset, block)) = buffer.unwritten.front() else { return Ok(()) };
                let segment = &part.segments[slot as usize];
                (*offset, block.clone(), segment.file.clone(), segment.id)
            };
            let path = self.paths.segment(partition, id);
            let file = match file {
                Some(file) => file,
                None => {
                    let file =
                        self.disk.open(&path, OpenMode::CreateNew).await.map_err(|e| self.write_error(&path, e))?;
                    let file = Rc::new(file);
                    let mut st = self.state.borrow_mut();
                    let part = st.partitions.get_mut(&partition).expect("partition");
                    part.segments[slot as usize].file = Some(file.clone());
                    part.dir_sync_pending = true;
                    file
                }
            };
            let len = buffer.len();
            let end = offset + len as u64;
            let allocated = self.state.borrow().partitions[&partition].segments[slot as usize].allocated;
            let step = self.config.segment_preallocate_bytes;
            if end > allocated && step > 0 {
                // Allocate ahead in steps, so that writes land inside the
                // file's size (and ENOSPC shows up here, not mid-write).
                let target = align_up_u64(end, step).min(self.segment_allocation_cap()).max(end);
                file.allocate(target).await.map_err(|e| self.write_error(&path, e))?;
                if let Some(s) = self.state.borrow_mut().segment_mut(partition, slot) {
                    s.allocated = s.allocated.max(target);
                }
            }
            file.write_at(buffer, offset).await.map_err(|e| self.write_error(&path, e))?;
            let mut st = self.state.borrow_mut();
            st.buffered_bytes -= len;
            st.stats.segment_writes += 1;
            st.stats.segment_bytes_written += len as u64;
            let part = st.partitions.get_mut(&partition).expect("partition");
            let written = part.buffer_of_mut(slot).and_then(|b| b.unwritten.pop_front());
            assert_eq!(written.map(|(o, _)| o), Some(offset), "segment blocks written out of order");
            drop(st);
            self.clear_full();
            self.flushed.notify();
        }
    }

    /// Classifies a failed write: ENOSPC is retryable, anything else makes the
    /// shard unhealthy.
    fn write_error(&self, path: &Path, error: std::io::Error) -> StorageError {
        if is_no_space(&error) {
            return self.set_full(path);
        }
        // Any other failure to create or write a segment (EIO, EMFILE, ...)
        // leaves data that cannot reach the disk; retrying in a loop would
        // not help, and acknowledging further writes would be a lie.
        self.set_unhealthy(UnhealthyReason::WriteFailed { path: path.to_owned(), source: std::sync::Arc::new(error) });
        self.unhealthy_error()
    }

    /// Largest size a segment file is preallocated to: a full segment plus
    /// its final pad.
    fn segment_allocation_cap(&self) -> u64 {
        align_up_u64(self.config.segment_bytes, BLOCK_BYTES as u64) + 2 * BLOCK_BYTES as u64
    }

    /// Cuts the unused preallocated space off a segment being sealed, so
    /// sealed files are exactly their data.
    async fn trim_preallocation(&self, partition: u32, slot: u16) -> Result<()> {
        let (file, id, data_end, allocated) = {
            let st = self.state.borrow();
            let s = &st.partitions[&partition].segments[slot as usize];
            (s.file.clone(), s.id, s.data_end, s.allocated)
        };
        let Some(file) = file else { return Ok(()) };
        if allocated > data_end {
            let path = self.paths.segment(partition, id);
            file.truncate(data_end).await.map_err(|e| self.write_error(&path, e))?;
            if let Some(s) = self.state.borrow_mut().segment_mut(partition, slot) {
                s.allocated = data_end;
            }
        }
        Ok(())
    }

    /// fdatasync of a segment, then of the directory if a file was created.
    async fn sync_segment(&self, partition: u32, slot: u16) -> Result<()> {
        let (file, id) = {
            let st = self.state.borrow();
            let segment = &st.partitions[&partition].segments[slot as usize];
            (segment.file.clone(), segment.id)
        };
        let path = self.paths.segment(partition, id);
        if let Some(file) = file {
            if let Err(error) = file.fdatasync().await {
                self.set_unhealthy(UnhealthyReason::FsyncFailed { path, source: std::sync::Arc::new(error) });
                return Err(self.unhealthy_error());
            }
            self.state.borrow_mut().stats.segment_fsyncs += 1;
        }
        self.sync_partition_dir(partition).await
    }

    pub(crate) async fn sync_partition_dir(&self, partition: u32) -> Result<()> {
        let pending = {
            let mut st = self.state.borrow_mut();
            let part = st.partitions.get_mut(&partition).expect("partition");
            std::mem::take(&mut part.dir_sync_pending)
        };
        if pending {
            let dir = self.paths.partition_dir(partition);
            if let Err(error) = self.disk.sync_dir(&dir).await {
                self.set_unhealthy(UnhealthyReason::FsyncFailed { path: dir, source: std::sync::Arc::new(error) });
                return Err(self.unhealthy_error());
            }
        }
        Ok(())
    }

    /// Asks the segment task to make records up to each partition's current
    /// max lsn durable, and waits until it has (or the shard fails).
    pub(crate) async fn checkpoint_all(&self) -> Result<()> {
        let targets: Vec<(u32, u64)> = {
            let mut st = self.state.borrow_mut();
            st.partitions
                .values_mut()
                .map(|part| {
                    part.sync_target = part.sync_target.max(part.max_lsn);
                    (part.id, part.max_lsn)
                })
                .collect()
        };
        self.wait_synced(&targets).await
    }

    /// Makes every record of one partition so far durable in its segments.
    pub(crate) async fn sync_partition(&self, partition: u32) -> Result<()> {
        let target = {
            let mut st = self.state.borrow_mut();
            let Some(part) = st.partitions.get_mut(&partition) else { return Ok(()) };
            part.sync_target = part.sync_target.max(part.max_lsn);
            part.max_lsn
        };
        self.wait_synced(&[(partition, target)]).await
    }

    async fn wait_synced(&self, targets: &[(u32, u64)]) -> Result<()> {
        self.segment_work.notify();
        loop {
            let progress = self.flushed.listen();
            {
                let st = self.state.borrow();
                if st.unhealthy.is_some() {
                    return Err(self.unhealthy_error());
                }
                let done = targets.iter().all(|(p, lsn)| {
                    st.partitions.get(p).is_none_or(|part| part.synced_lsn >= *lsn && part.sealing.is_empty())
                });
                if done {
                    return Ok(());
                }
                if let Some(path) = &st.full {
                    return Err(StorageError::StorageFull { path: path.clone() });
                }
            }
            progress.await;
        }
    }
}

/// How a scan treats bytes that are not a valid record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ScanMode {
    /// The valid data ends at the first invalid record (a torn tail), and
    /// lsns must strictly increase (stale records after a tear are rejected).
    StopAtInvalid,
    /// A sealed segment: report an invalid record and search forward (in
    /// 16-byte steps, where records start) for the next valid one.
    Resync,
}

/// What a scan found.
#[derive(Debug, Default)]
pub(crate) struct ScanOutcome {
    /// End of the last valid record (or pad).
    pub valid_end: u64,
    pub file_bytes: u64,
    pub records: u64,
    /// Invalid records found in `Resync` mode (offset, error); zero bytes
    /// are not errors.
    pub errors: Vec<(u64, RecordError)>,
}

const SCAN_CHUNK_BYTES: usize = 1 << 20;

/// Reads a segment from `start` to its end and calls `visit` for every valid
/// record (pads included) with its offset and raw bytes.
pub(crate) async fn scan_file<F: DiskFile>(
    file: &F,
    path: &Path,
    start: u64,
    mode: ScanMode,
    visit: impl FnMut(u64, &RecordView<'_>, &[u8]),
) -> Result<ScanOutcome> {
    scan_file_to(file, path, start, u64::MAX, mode, visit).await
}

/// `scan_file` stopping at `end` (or the file's end, if sooner): the end of
/// the bytes in use, for a segment whose preallocated space follows.
pub(crate) async fn scan_file_to<F: DiskFile>(
    file: &F,
    path: &Path,
    start: u64,
    end: u64,
    mode: ScanMode,
    mut visit: impl FnMut(u64, &RecordView<'_>, &[u8]),
) -> Result<ScanOutcome> {
    let file_bytes = file.size().await.map_err(|e| StorageError::io(IoOp::Stat, path, e))?.min(end);
    let mut outcome = ScanOutcome { valid_end: start, file_bytes, ..ScanOutcome::default() };
    let mut buf: Vec<u8> = Vec::new();
    let mut buf_start = start;
    let mut read_to = start;
    let mut at = start;
    let mut last_lsn = 0u64;
    let mut in_error = false;
    loop {
        let rel = (at - buf_start) as usize;
        let available = &buf[rel.min(buf.len())..];
        let mut parsed = parse_record(available);
        // A pad's zero fill up to the block boundary belongs to it; check it
        // is all there and zero (any other byte there is damage).
        if let Ok(pad) = &parsed {
            if pad.kind == RecordKind::Pad {
                let next = super::format::next_record_offset(at, RecordKind::Pad, pad.len).min(file_bytes);
                let span = (next - at) as usize;
                if available.len() < span {
                    parsed = Err(RecordError::Truncated { needed_bytes: span, available_bytes: available.len() });
                } else if available[RECORD_HEADER_BYTES..span].iter().any(|&b| b != 0) {
                    parsed = Err(RecordError::BadHeader);
                }
            }
        }
        let need_more = match parsed {
            // Lengths that run past the end of the file are damage, not a
            // reason to read further.
            Err(RecordError::Truncated { needed_bytes, .. }) => {
                read_to < file_bytes && at + needed_bytes as u64 <= file_bytes
            }
            _ => false,
        };
        if need_more {
            // Drop consumed bytes, then read the next chunk.
            buf.drain(..rel.min(buf.len()));
            buf_start = at;
            let len = SCAN_CHUNK_BYTES.min((file_bytes - read_to) as usize);
            let chunk = file.read_at(read_to, len).await.map_err(|e| StorageError::io(IoOp::Read, path, e))?;
            if chunk.is_empty() {
                break;
            }
            read_to += chunk.len() as u64;
            buf.extend_from_slice(&chunk);
            continue;
        }
        match parsed {
            Ok(record) => {
                let lsn_ok = record.kind == RecordKind::Pad || record.lsn > last_lsn || mode == ScanMode::Resync;
                if !lsn_ok {
                    break;
                }
                if record.kind != RecordKind::Pad {
                    last_lsn = record.lsn;
                    outcome.records += 1;
                }
                visit(at, &record, &available[..record.len]);
                in_error = false;
                let next = super::format::next_record_offset(at, record.kind, record.len);
                // A pad owns everything up to its block boundary (even past a
                // shorter file's end): nothing may be appended inside it.
                outcome.valid_end = next;
                at = next;
            }
            Err(error) => match mode {
                ScanMode::StopAtInvalid => break,
                ScanMode::Resync => {
                    if at >= file_bytes {
                        break;
                    }
                    let zero = matches!(error, RecordError::Unwritten)
                        || (matches!(error, RecordError::Truncated { .. }) && available.iter().all(|&b| b == 0));
                    if !zero && !in_error {
                        outcome.errors.push((at, error));
                        in_error = true;
                    }
                    // Whole zero blocks (preallocated space) are skipped at once.
                    let block = BLOCK_BYTES.min(available.len());
                    if zero
                        && at.is_multiple_of(BLOCK_BYTES as u64)
                        && block == BLOCK_BYTES
                        && available[..block].iter().all(|&b| b == 0)
                    {
                        at += BLOCK_BYTES as u64;
                    } else {
                        at += RECORD_ALIGN_BYTES as u64;
                    }
                }
            },
        }
    }
    Ok(outcome)
}

/// Encodes a hint file: header block plus entries, padded to a block.
pub(crate) fn encode_hint<D: Disk>(disk: &D, header: &mut HintHeader, entries: &[u8]) -> D::Buffer {
    header.entries_len = entries.len() as u64;
    header.entries_crc = crc32fast::hash(entries);
    let total = FILE_HEADER_BYTES + align_up(entries.len(), BLOCK_BYTES);
    let mut buffer = disk.alloc_buffer(total);
    let bytes = buffer.as_bytes_mut();
    header.encode(&mut bytes[..FILE_HEADER_BYTES]);
    bytes[FILE_HEADER_BYTES..FILE_HEADER_BYTES + entries.len()].copy_from_slice(entries);
    bytes[FILE_HEADER_BYTES + entries.len()..].fill(0);
    buffer
}

/// Reads and validates a hint file; None if missing or invalid (the caller
/// falls back to scanning the segment).
pub(crate) async fn read_hint<D: Disk>(disk: &D, path: &Path) -> Option<(HintHeader, Vec<u8>)> {
    let file = disk.open(path, OpenMode::Existing).await.ok()?;
    let bytes = match file.size().await {
        Ok(size) => file.read_at(0, size as usize).await,
        Err(error) => Err(error),
    };
    close_quietly(file, path).await;
    let bytes = bytes.ok()?;
    let header = match HintHeader::decode(&bytes) {
        Ok(h) => h,
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "hint file ignored; the segment is scanned instead");
            return None;
        }
    };
    let end = FILE_HEADER_BYTES.checked_add(usize::try_from(header.entries_len).ok()?)?;
    if end > bytes.len() || crc32fast::hash(&bytes[FILE_HEADER_BYTES..end]) != header.entries_crc {
        tracing::warn!(path = %path.display(), "hint file entries damaged; the segment is scanned instead");
        return None;
    }
    if HintEntries::new(&bytes[FILE_HEADER_BYTES..end]).any(|e| e.is_err()) {
        return None;
    }
    Some((header, bytes[FILE_HEADER_BYTES..end].to_vec()))
}

/// Writes `entries` as the hint file of a segment (temporary name, sync,
/// rename), replacing any older hint.
pub(crate) async fn write_hint<D: Disk>(disk: &D, path: &Path, mut header: HintHeader, entries: &[u8]) -> Result<()> {
    let tmp = Paths::temporary(path);
    let buffer = encode_hint(disk, &mut header, entries);
    let _ = disk.remove(&tmp).await;
    let file = disk.open(&tmp, OpenMode::CreateNew).await.map_err(|e| StorageError::io(IoOp::Open, &tmp, e))?;
    file.write_at(Rc::new(buffer), 0).await.map_err(|e| StorageError::io(IoOp::Write, &tmp, e))?;
    file.fdatasync().await.map_err(|e| StorageError::io(IoOp::Sync, &tmp, e))?;
    close_quietly(file, &tmp).await;
    disk.rename(&tmp, path).await.map_err(|e| StorageError::io(IoOp::Rename, &tmp, e))?;
    Ok(())
}

/// Encodes one hint entry from a scanned record.
pub(crate) fn push_hint(entries: &mut Vec<u8>, offset: u64, record: &RecordView<'_>) {
    if record.kind == RecordKind::Pad {
        return;
    }
    HintEntry {
        kind: record.kind,
        value_len: record.value.len() as u32,
        offset: u32::try_from(offset).expect("segment offsets fit u32"),
        lsn: record.lsn,
        key: record.key,
    }
    .encode(entries);
}

/// Checks a segment header read from disk, naming the file on refusal.
pub(crate) fn check_segment_header(
    bytes: &[u8],
    path: &Path,
    partition: u32,
    partition_count: u32,
) -> Result<SegmentHeader> {
    let header =
        SegmentHeader::decode(bytes).map_err(|error| StorageError::BadFile { path: path.to_owned(), error })?;
    if header.partition != partition {
        return Err(StorageError::BadFile {
            path: path.to_owned(),
            error: super::format::HeaderError::BadField("segment belongs to another partition"),
        });
    }
    if header.partition_count != partition_count {
        return Err(StorageError::PartitionCountMismatch {
            found: header.partition_count,
            configured: partition_count,
        });
    }
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::sim_disk::SimDisk;

    fn buffer(tail_bytes: usize) -> SegmentBuffer<SimDisk> {
        SegmentBuffer {
            slot: 0,
            write_offset: 0,
            tail_start: 0,
            tail: None,
            tail_bytes,
            unwritten: VecDeque::new(),
            last_lsn: 0,
            synced_offset: 0,
            dirty_since: None,
        }
    }

    #[test]
    fn a_busy_partition_grows_its_tail_to_the_write_unit_and_an_idle_one_shrinks_it() {
        let disk = SimDisk::new();
        let write_unit = 1 << 20;
        let mut segment = buffer(tail_bytes_min(write_unit));
        // Record lengths are multiples of 16 (`RECORD_ALIGN_BYTES`).
        let record = 1008;
        segment.push(&disk, write_unit, record, |out| out.fill(1));
        assert_eq!(segment.tail_capacity(), TAIL_BYTES_MIN);
        // Filling tail after tail doubles each new one, up to the write unit.
        let mut sizes = vec![segment.tail_capacity()];
        while segment.write_offset < 8 * write_unit as u64 {
            segment.push(&disk, write_unit, record, |out| out.fill(1));
            if segment.tail_capacity() != *sizes.last().expect("one") {
                sizes.push(segment.tail_capacity());
            }
        }
        assert_eq!(sizes, [32 << 10, 64 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20]);
        // The cut blocks are whole blocks, in order, with no gaps.
        let mut next = 0;
        for (start, cut) in &segment.unwritten {
            assert_eq!(*start, next);
            assert_eq!(cut.len() % BLOCK_BYTES, 0);
            next += cut.len() as u64;
        }
        assert_eq!(next, segment.tail_start);
        // Flushes that find the tail barely used halve the next one, down
        // to the minimum.
        for _ in 0..10 {
            segment.push(&disk, write_unit, record, |out| out.fill(1));
            segment.cut_all(&disk, write_unit, 7);
            assert!(segment.tail.is_none(), "a flush writes the whole tail");
            assert_eq!(segment.write_offset % BLOCK_BYTES as u64, 0, "padded to a block");
        }
        segment.push(&disk, write_unit, record, |out| out.fill(1));
        assert_eq!(segment.tail_capacity(), TAIL_BYTES_MIN);
    }

    #[test]
    fn a_write_unit_below_the_minimum_tail_bounds_it() {
        let disk = SimDisk::new();
        let mut segment = buffer(tail_bytes_min(BLOCK_BYTES));
        for _ in 0..20 {
            segment.push(&disk, BLOCK_BYTES, 1008, |out| out.fill(1));
            // A block, or two when a record straddles the boundary.
            assert!(segment.tail_capacity() <= 2 * BLOCK_BYTES, "tail of {} bytes", segment.tail_capacity());
        }
    }
}
