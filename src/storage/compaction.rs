//! Per-partition compaction, hint writing for sealed segments (the
//! maintenance task), and scrubbing (`verify_partition`).
//!
//! Compaction rewrites sealed segments whose dead ratio passes the threshold:
//! 1. scan every input (a damaged input is left out and kept, so damage is
//!    never erased by compaction; reads keep reporting it);
//! 2. keep each put the index still points at, and each tombstone whose key
//!    is absent and which may still shadow an older record: outside the
//!    inputs (some other segment's lowest lsn is below the tombstone's) or
//!    in the output itself (outside `group` mode a put whose key's newer
//!    state is not yet durable is kept, and durability moves while the
//!    inputs are read, so the tombstones are decided after the scan), and
//!    always the inputs' newest record, so that the lsn below which
//!    recovery skips commit-log records never falls;
//! 3. write them to `seg-N.seg.tmp` whose header lists the inputs it
//!    supersedes, fdatasync, write its hint, rename, sync the directory:
//!    from here recovery deletes the inputs itself;
//! 4. repoint the index, entry by entry, only where it still points at the
//!    old place (a newer write wins), yielding between chunks so foreground
//!    work waits at most one chunk;
//! 5. delete the inputs.
//!
//! A crash before 3 leaves a temporary file (deleted on open); after 3 the
//! output is complete and supersedes the inputs. Nothing is lost (every live
//! record is in the output before an input disappears) and nothing returns
//! (a dropped tombstone had no older record left to shadow).

use std::rc::Rc;

use super::disk::{Disk, DiskBuffer, DiskFile, OpenMode};
use super::format::{
    align_up, encode_pad, pad_len, HintHeader, RecordKind, SegmentHeader, SegmentKind, BLOCK_BYTES, FILE_HEADER_BYTES,
};
use super::index::Location;
use super::segment::{push_hint, read_hint, scan_file, slot_id, write_hint, ScanMode, SegmentState};
use super::store::{Inner, Paths, VerifyReport};
use super::sync::yield_now;
use super::{IoOp, Result, StorageError};

/// A record chosen for the output.
struct Kept {
    key: Vec<u8>,
    kind: RecordKind,
    lsn: u64,
    from: Location,
    to_offset: u32,
    len: usize,
}

/// Clears a partition's `compacting` flag however compaction ends.
struct CompactingGuard<'a, D: Disk> {
    inner: &'a Inner<D>,
    partition: u32,
}

impl<D: Disk> Drop for CompactingGuard<'_, D> {
    fn drop(&mut self) {
        if let Some(part) = self.inner.state.borrow_mut().partitions.get_mut(&self.partition) {
            part.compacting = false;
        }
    }
}

const SWAP_CHUNK_RECORDS: usize = 1024;

/// Appends a record chosen for the output (its bytes, its hint entry).
fn keep_record(
    out: &mut Vec<u8>,
    hints: &mut Vec<u8>,
    kept: &mut Vec<Kept>,
    from: Location,
    record: &super::format::RecordView<'_>,
    raw: &[u8],
) {
    let to = (FILE_HEADER_BYTES + out.len()) as u64;
    push_hint(hints, to, record);
    kept.push(Kept {
        key: record.key.to_vec(),
        kind: record.kind,
        lsn: record.lsn,
        from,
        to_offset: to as u32,
        len: raw.len(),
    });
    out.extend_from_slice(raw);
}

impl<D: Disk> Inner<D> {
    /// The maintenance task: hints for newly sealed segments, then compaction
    /// of one partition at a time. Ends after close.
    pub(crate) async fn maintenance_loop(&self) {
        loop {
            let work = self.maintenance_work.listen();
            let (hint_job, compaction_job) = {
                let st = self.state.borrow();
                if st.closed || st.closing {
                    return;
                }
                let hint_job = st.partitions.values().find_map(|p| {
                    p.segments
                        .iter()
                        .find(|(_, s)| s.sealed && !s.hinted && s.file.is_some() && s.kind == SegmentKind::Appended)
                        .map(|(slot, _)| (p.id, slot_id(slot)))
                });
                let threshold = self.config.compaction_dead_ratio;
                let compaction_job = st
                    .partitions
                    .values()
                    .find(|p| !p.compacting && !p.verifying && p.segments.iter().any(|(_, s)| s.compactable(threshold)))
                    .map(|p| p.id);
                (hint_job, compaction_job)
            };
            if let Some((partition, slot)) = hint_job {
                if let Err(error) = self.write_segment_hint(partition, slot, true).await {
                    tracing::warn!(partition, %error, "writing a hint file failed; the segment will be scanned on open");
                }
                // One attempt per segment and run, whatever came of it: a
                // failed write or a damaged segment (which gets no hint)
                // left unhinted would be picked again at once, for ever.
                if let Some(s) = self.state.borrow_mut().segment_mut(partition, slot) {
                    s.hinted = true;
                }
                continue;
            }
            if let Some(partition) = compaction_job {
                match self.compact_partition(partition).await {
                    Ok(true) => continue,
                    Ok(false) => {}
                    Err(error) => {
                        tracing::warn!(partition, %error, "compaction failed; it will be retried on the next trigger")
                    }
                }
            }
            work.await;
        }
    }

    /// Compacts one partition if any sealed segment passes the threshold.
    /// Returns whether it did.
    pub(crate) async fn compact_partition(&self, partition: u32) -> Result<bool> {
        // 1. Choose inputs.
        let (inputs, output_id, lowest_lsn_elsewhere) = {
            let mut st = self.state.borrow_mut();
            let Some(part) = st.partitions.get_mut(&partition) else { return Ok(false) };
            if part.compacting {
                return Ok(false);
            }
            let threshold = self.config.compaction_dead_ratio;
            let budget = self.config.segment_bytes - (FILE_HEADER_BYTES + 2 * BLOCK_BYTES) as u64;
            let mut kept_bytes = 0u64;
            let mut inputs = Vec::new();
            let mut candidates: Vec<(u64, u16)> = part
                .segments
                .iter()
                .filter(|(_, s)| s.compactable(threshold))
                .map(|(slot, s)| (s.id, slot_id(slot)))
                .collect();
            candidates.sort_unstable();
            for (_, slot) in candidates {
                let s = &part.segments[slot as usize];
                let kept = s.live_bytes + s.tombstone_bytes;
                if inputs.len() == self.config.compaction_inputs_max || kept_bytes + kept > budget {
                    break;
                }
                kept_bytes += kept;
                inputs.push(slot);
            }
            if inputs.is_empty() {
                return Ok(false);
            }
            part.compacting = true;
            let output_id = part.next_segment_id;
            part.next_segment_id += 1;
            let lowest_lsn_elsewhere = part
                .segments
                .iter()
                .filter(|(slot, _)| !inputs.contains(&slot_id(*slot)))
                .map(|(_, s)| s.min_lsn)
                .min()
                .unwrap_or(u64::MAX);
            (inputs, output_id, lowest_lsn_elsewhere)
        };
        let _guard = CompactingGuard { inner: self, partition };
        // Outside group mode an acknowledged write may not be durable yet; a
        // record it supersedes must outlive it on disk. A checkpoint first
        // makes nearly every key's current state durable.
        let group = self.config.sync_mode == crate::config::SyncMode::Group;
        if !group {
            self.sync_partition(partition).await?;
        }
        // 2. Scan inputs and keep what must survive.
        let mut out: Vec<u8> = Vec::new();
        let mut hints: Vec<u8> = Vec::new();
        let mut kept: Vec<Kept> = Vec::new();
        // Tombstones that shadow nothing outside the inputs: kept after the
        // scan only if the output keeps an older put of their key.
        let mut undecided: Vec<(Location, Vec<u8>)> = Vec::new();
        let mut excluded_min_lsn = u64::MAX;
        // The inputs' newest record always stays, whatever it is. Recovery
        // replays a partition's commit-log records above the newest lsn its
        // segments hold. Log files are reused in the order they come clean,
        // so a file still in use can hold a partition's older records while
        // the file with its newer ones has been reused already; dropping
        // the newest record could lower that floor below the older ones,
        // and replay would re-apply an old write of a key without the later
        // ones (a deleted key came back: model seed 322123604343, found when
        // free files still kept their records). A kept record the index
        // does not point at stays dead (the index moves only records it
        // points at).
        let newest_input_lsn = {
            let st = self.state.borrow();
            let part = &st.partitions[&partition];
            inputs.iter().map(|&slot| part.segments[slot as usize].max_lsn).max().unwrap_or(0)
        };
        let mut clean_inputs = Vec::new();
        let mut input_bytes = 0u64;
        let (mut min_lsn, mut max_lsn) = (u64::MAX, 0u64);
        for &slot in &inputs {
            let (file, id) = {
                let st = self.state.borrow();
                let s = &st.partitions[&partition].segments[slot as usize];
                (s.file.clone().expect("sealed segments have files"), s.id)
            };
            let path = self.paths.segment(partition, id);
            let mark = (out.len(), hints.len(), kept.len(), undecided.len());
            let outcome =
                scan_file(&*file, &path, FILE_HEADER_BYTES as u64, ScanMode::Resync, |offset, record, raw| {
                    let st = self.state.borrow();
                    let index = &st.partitions[&partition].index;
                    let part = &st.partitions[&partition];
                    let current = index.get(record.key);
                    // Settled: the key's current state (its newest put, or its
                    // removal) is durable, so older records can go. In group
                    // mode the commit log makes every applied write durable.
                    let settled = group
                        || match current {
                            Some(location) => part.is_durable(location),
                            None => part.last_remove_lsn <= part.synced_lsn,
                        };
                    let here = Location { slot, offset: offset as u32, value_len: record.value.len() as u32 };
                    let keep = match record.kind {
                        RecordKind::Pad => false,
                        _ if record.lsn == newest_input_lsn => true,
                        RecordKind::Put => current == Some(here) || !settled,
                        // A tombstone must stay while an older record could
                        // resurrect the key.
                        RecordKind::Remove if !settled => true,
                        RecordKind::Remove if current.is_some() => false,
                        RecordKind::Remove if lowest_lsn_elsewhere < record.lsn => true,
                        RecordKind::Remove => {
                            undecided.push((here, raw.to_vec()));
                            false
                        }
                    };
                    if keep {
                        keep_record(&mut out, &mut hints, &mut kept, here, record, raw);
                    }
                })
                .await?;
            if outcome.errors.is_empty() {
                clean_inputs.push((slot, id));
                input_bytes += outcome.file_bytes;
            } else {
                tracing::error!(path = %path.display(), errors = outcome.errors.len(), "segment with corrupt records is not compacted; kept for repair");
                out.truncate(mark.0);
                hints.truncate(mark.1);
                kept.truncate(mark.2);
                undecided.truncate(mark.3);
                // It stays, so its records count as elsewhere.
                excluded_min_lsn =
                    excluded_min_lsn.min(self.state.borrow().partitions[&partition].segments[slot as usize].min_lsn);
            }
        }
        if clean_inputs.is_empty() {
            return Ok(false);
        }
        // The oldest put the output keeps of each key, by key hash: a
        // collision can only keep a tombstone more, never drop one.
        let mut oldest_kept_put: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
        for k in kept.iter().filter(|k| k.kind == RecordKind::Put) {
            let lsn = oldest_kept_put.entry(super::cache::key_hash(&k.key)).or_insert(k.lsn);
            *lsn = (*lsn).min(k.lsn);
        }
        for (here, raw) in &undecided {
            let record = super::format::parse_record(raw).expect("scanned records parse");
            let shadows_kept =
                oldest_kept_put.get(&super::cache::key_hash(record.key)).is_some_and(|lsn| *lsn < record.lsn);
            if shadows_kept || excluded_min_lsn < record.lsn {
                keep_record(&mut out, &mut hints, &mut kept, *here, &record, raw);
            }
        }
        for entry in super::format::HintEntries::new(&hints).flatten() {
            min_lsn = min_lsn.min(entry.lsn);
            max_lsn = max_lsn.max(entry.lsn);
        }
        // 3. Write the output under a temporary name, then publish it.
        let path = self.paths.segment(partition, output_id);
        let tmp = Paths::temporary(&path);
        let data_end = (FILE_HEADER_BYTES + out.len()) as u64;
        let total = FILE_HEADER_BYTES + out.len() + pad_len(data_end);
        let mut buffer = self.disk.alloc_buffer(align_up(total, BLOCK_BYTES));
        {
            let bytes = buffer.as_bytes_mut();
            SegmentHeader {
                kind: SegmentKind::Compacted,
                partition,
                segment_id: output_id,
                partition_count: self.layout.partition_count,
                supersedes: clean_inputs.iter().map(|(_, id)| *id).collect(),
            }
            .encode(&mut bytes[..FILE_HEADER_BYTES]);
            bytes[FILE_HEADER_BYTES..data_end as usize].copy_from_slice(&out);
            if total > data_end as usize {
                encode_pad(&mut bytes[data_end as usize..total], partition, max_lsn);
            }
        }
        drop(out);
        let file =
            self.disk.open(&tmp, OpenMode::CreateNew).await.map_err(|e| StorageError::io(IoOp::Open, &tmp, e))?;
        let write = file.write_at(Rc::new(buffer), 0).await;
        if let Err(error) = write {
            let _ = self.disk.remove(&tmp).await;
            return Err(if super::disk::is_no_space(&error) {
                self.set_full(&tmp)
            } else {
                StorageError::io(IoOp::Write, &tmp, error)
            });
        }
        file.fdatasync().await.map_err(|e| StorageError::io(IoOp::Sync, &tmp, e))?;
        let hint = HintHeader {
            sealed: true,
            partition,
            segment_id: output_id,
            covered_end: total as u64,
            entry_count: kept.len() as u64,
            entries_len: 0,
            entries_crc: 0,
            min_lsn,
            max_lsn,
        };
        write_hint(&self.disk, &self.paths.hint(partition, output_id), hint, &hints).await?;
        self.disk.rename(&tmp, &path).await.map_err(|e| StorageError::io(IoOp::Rename, &tmp, e))?;
        let dir = self.paths.partition_dir(partition);
        self.disk.sync_dir(&dir).await.map_err(|e| StorageError::io(IoOp::SyncDir, &dir, e))?;
        // 4. Register the output and repoint the index.
        let output_slot = {
            let mut st = self.state.borrow_mut();
            let part = st.partitions.get_mut(&partition).expect("partition");
            let mut segment = SegmentState::new(output_id, SegmentKind::Compacted);
            segment.file = Some(Rc::new(file));
            segment.data_end = total as u64;
            segment.min_lsn = min_lsn;
            segment.max_lsn = max_lsn;
            segment.sealed = true;
            segment.hinted = true;
            slot_id(part.segments.insert(segment))
        };
        for chunk in kept.chunks(SWAP_CHUNK_RECORDS) {
            {
                let mut st = self.state.borrow_mut();
                let part = st.partitions.get_mut(&partition).expect("partition");
                for k in chunk {
                    match k.kind {
                        RecordKind::Put => {
                            let to = Location { slot: output_slot, offset: k.to_offset, value_len: k.from.value_len };
                            if part.index.replace_if(&k.key, k.from, to) {
                                part.segments[k.from.slot as usize].live_bytes -= k.len as u64;
                                part.segments[output_slot as usize].live_bytes += k.len as u64;
                            }
                        }
                        _ => part.segments[output_slot as usize].tombstone_bytes += k.len as u64,
                    }
                }
            }
            yield_now().await;
        }
        // 5. Drop the inputs.
        let reclaimed = {
            let mut st = self.state.borrow_mut();
            let part = st.partitions.get_mut(&partition).expect("partition");
            for (slot, _) in &clean_inputs {
                let removed = part.segments.remove(*slot as usize);
                debug_assert_eq!(removed.live_bytes, 0, "a live record was left in a compacted input");
            }
            input_bytes.saturating_sub(total as u64)
        };
        for (_, id) in &clean_inputs {
            for p in [self.paths.segment(partition, *id), self.paths.hint(partition, *id)] {
                match self.disk.remove(&p).await {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(StorageError::io(IoOp::Remove, &p, e)),
                }
            }
        }
        self.disk.sync_dir(&dir).await.map_err(|e| StorageError::io(IoOp::SyncDir, &dir, e))?;
        if kept.is_empty() {
            // An output with no records only made the inputs' removal
            // atomic; with the inputs gone it has no job left.
            self.state
                .borrow_mut()
                .partitions
                .get_mut(&partition)
                .expect("partition")
                .segments
                .remove(output_slot as usize);
            for p in [self.paths.segment(partition, output_id), self.paths.hint(partition, output_id)] {
                self.disk.remove(&p).await.map_err(|e| StorageError::io(IoOp::Remove, &p, e))?;
            }
            self.disk.sync_dir(&dir).await.map_err(|e| StorageError::io(IoOp::SyncDir, &dir, e))?;
        }
        let mut st = self.state.borrow_mut();
        st.stats.compactions += 1;
        st.stats.compaction_bytes_reclaimed += reclaimed;
        tracing::debug!(partition, inputs = clean_inputs.len(), output_id, reclaimed, "compacted");
        Ok(true)
    }

    /// Reads every segment of a partition end to end and reports every
    /// record that fails its checks (and any non-zero byte where only
    /// padding may be).
    pub(crate) async fn verify_partition(&self, partition: u32) -> Result<VerifyReport> {
        // Compaction removes segments with their hints: no compaction
        // starts on the partition while it is verified, so that every hint
        // present is compared, and hints are compared only when none was
        // running (it could remove them midway).
        let check_hints = {
            let mut st = self.state.borrow_mut();
            let Some(part) = st.partitions.get_mut(&partition) else { return Ok(VerifyReport::default()) };
            part.verifying = true;
            !part.compacting
        };
        let report = self.verify_segments(partition, check_hints).await;
        if let Some(part) = self.state.borrow_mut().partitions.get_mut(&partition) {
            part.verifying = false;
        }
        self.maintenance_work.notify();
        report
    }

    async fn verify_segments(&self, partition: u32, check_hints: bool) -> Result<VerifyReport> {
        let segments: Vec<(u64, Rc<D::File>)> = {
            let st = self.state.borrow();
            let Some(part) = st.partitions.get(&partition) else { return Ok(VerifyReport::default()) };
            part.segments.iter().filter_map(|(_, s)| s.file.clone().map(|f| (s.id, f))).collect()
        };
        let mut report = VerifyReport::default();
        for (id, file) in segments {
            let path = self.paths.segment(partition, id);
            let head = file.read_at(0, FILE_HEADER_BYTES).await.map_err(|e| StorageError::io(IoOp::Read, &path, e))?;
            if let Err(error) =
                super::segment::check_segment_header(&head, &path, partition, self.layout.partition_count)
            {
                tracing::error!(%error, "segment header failed verification");
                report.errors.push((path.clone(), 0, super::format::RecordError::BadHeader));
            }
            // A hint valid by its own checksum is what recovery trusts
            // instead of the segment: its entries must be what a scan of
            // the bytes it covers gives.
            let hint_path = self.paths.hint(partition, id);
            let hint = match check_hints {
                true => read_hint(&self.disk, &hint_path).await,
                false => None,
            }
            .filter(|(header, _)| header.partition == partition && header.segment_id == id);
            let covered_end = hint.as_ref().map_or(0, |(header, _)| header.covered_end);
            let mut scanned = Vec::new();
            let outcome = scan_file(&*file, &path, FILE_HEADER_BYTES as u64, ScanMode::Resync, |offset, record, _| {
                if offset < covered_end {
                    push_hint(&mut scanned, offset, record);
                }
            })
            .await?;
            // As recovery: a hint claiming more than the file holds is ignored.
            if let Some((header, entries)) = hint.filter(|(header, _)| header.covered_end <= outcome.file_bytes) {
                report.hints += 1;
                if outcome.errors.is_empty() && entries != scanned {
                    report.hint_mismatches.push((
                        hint_path,
                        format!(
                            "its {} entry bytes up to offset {} differ from the {} a scan of the segment gives",
                            entries.len(),
                            header.covered_end,
                            scanned.len()
                        ),
                    ));
                }
            }
            report.segments += 1;
            report.records += outcome.records;
            report.bytes += outcome.file_bytes;
            report.errors.extend(outcome.errors.into_iter().map(|(offset, error)| (path.clone(), offset, error)));
        }
        Ok(report)
    }

    /// Runs the three background loops until close.
    pub(crate) async fn run_background(self: Rc<Self>) {
        self.background_running.set(true);
        let log = async {
            if self.state.borrow().log.is_some() && self.config.sync_mode != crate::config::SyncMode::None {
                self.log_loop().await;
            }
        };
        futures::join!(log, self.segment_loop(), self.maintenance_loop());
        self.background_running.set(false);
        self.background_ended.notify();
    }
}

#[cfg(test)]
mod tests {
    use crate::config::StorageConfig;
    use crate::storage::sim_disk::SimDisk;
    use crate::storage::{ShardLayout, ShardStore};

    /// Partition 0's sealed segments: (id, newest lsn).
    fn sealed_segments(store: &ShardStore<SimDisk>) -> Vec<(u64, u64)> {
        let st = store.inner.state.borrow();
        let part = &st.partitions[&0];
        part.segments.iter().filter(|(_, s)| s.sealed).map(|(_, s)| (s.id, s.max_lsn)).collect()
    }

    /// The newest lsn of a partition's segments is recovery's replay floor;
    /// a compaction must keep it where it was, even when the inputs' newest
    /// record is dead (see the keep rule in `compact_partition`).
    #[test]
    fn a_compaction_keeps_its_inputs_newest_record_even_when_it_is_dead() {
        let config = StorageConfig {
            commit_log_file_bytes: 64 << 10,
            write_buffer_bytes_max: 64 << 10,
            compaction_dead_ratio: 0.4,
            ..crate::storage::small_test_config()
        };
        let layout = ShardLayout { shard: 0, shard_count: 1, partition_count: 1 };
        crate::storage::with_sim_store(config, layout, |store, _| async move {
            // Rounds over the same keys: every record of a sealed segment,
            // its newest included, is overwritten by a later round.
            for round in 0..4u8 {
                for k in 0..40 {
                    store.put(0, format!("key-{k}").as_bytes(), &[round; 300]).await.unwrap();
                }
            }
            store.sync().await.unwrap();
            let before = sealed_segments(&store);
            assert!(before.len() >= 2, "sealed segments: {before:?}");
            assert!(store.compact(0).await.unwrap(), "nothing compacted: {before:?}");
            let after = sealed_segments(&store);
            let inputs: Vec<_> = before.iter().filter(|s| !after.contains(s)).collect();
            let outputs: Vec<_> = after.iter().filter(|s| !before.contains(s)).collect();
            let newest = |s: &[&(u64, u64)]| s.iter().map(|(_, lsn)| *lsn).max();
            assert!(!inputs.is_empty(), "{before:?} -> {after:?}");
            assert_eq!(newest(&outputs), newest(&inputs), "inputs {inputs:?}, outputs {outputs:?}");
        });
    }
}
