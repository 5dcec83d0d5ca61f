//! `ringkv verify`: the offline check of a stopped node's data directory.
//!
//! Each shard's store is opened as `serve` opens it (the same recovery: a
//! torn commit-log tail is cut and replayed records reach their segments,
//! as a start would do), then every record of every segment is read back
//! and its CRC checked, whatever the hint files say, and the store is
//! closed cleanly. The directory stays locked throughout, so no node can
//! start on it meanwhile, and a running node's directory is refused.
//! Damage is reported by file and offset; the records around it stay
//! readable (recovery skips only what fails its checksum).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use glommio::{LocalExecutorBuilder, Placement};

use crate::config::StorageConfig;
use crate::runtime::{spawn_detached, DmaDisk};
use crate::storage::data_dir::DataDir;
use crate::storage::{ShardLayout, ShardStore, StorageError};

/// Why a data directory could not be checked at all.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("shard {shard}: its executor did not run: {message}")]
    Executor { shard: u32, message: String },
}

/// What the check of one shard found.
#[derive(Debug, Default)]
pub struct ShardFindings {
    pub shard: u32,
    /// Why the shard's store could not be opened or closed: nothing, or
    /// not everything, was checked.
    pub failure: Option<String>,
    pub partitions: u64,
    pub segments: u64,
    pub records: u64,
    pub segment_bytes: u64,
    /// Hint files compared with their segments.
    pub hints: u64,
    pub keys: u64,
    /// Damaged records: file, offset, what is wrong.
    pub damage: Vec<(PathBuf, u64, String)>,
}

/// What the check of a data directory found, shard by shard.
#[derive(Debug)]
pub struct Findings {
    pub root: PathBuf,
    pub partition_count: u32,
    pub shards: Vec<ShardFindings>,
}

impl Findings {
    /// Every shard opened and every record passed its checks.
    pub fn is_clean(&self) -> bool {
        self.shards.iter().all(|s| s.failure.is_none() && s.damage.is_empty())
    }

    /// The report `ringkv verify` prints.
    pub fn report(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "data directory {}: {} shards, {} partitions",
            self.root.display(),
            self.shards.len(),
            self.partition_count
        );
        for s in &self.shards {
            let _ = write!(
                out,
                "shard {}: {} keys; {} partitions with data, {} segments, {} records, {} bytes read, {} hints compared: ",
                s.shard, s.keys, s.partitions, s.segments, s.records, s.segment_bytes, s.hints
            );
            match (&s.failure, s.damage.len()) {
                (Some(failure), _) => {
                    let _ = writeln!(out, "NOT CHECKED: {failure}");
                }
                (None, 0) => {
                    let _ = writeln!(out, "ok");
                }
                (None, n) => {
                    let _ = writeln!(out, "{n} damaged {}", plural(n, "record"));
                }
            }
            for (path, offset, what) in &s.damage {
                let _ = writeln!(out, "  {} at offset {offset}: {what}", path.display());
            }
        }
        let damaged: usize = self.shards.iter().map(|s| s.damage.len()).sum();
        let _ = writeln!(
            out,
            "{}",
            match (self.is_clean(), damaged) {
                (true, _) => "verdict: intact".to_string(),
                (false, 0) => "verdict: not fully checked (see above)".to_string(),
                (false, n) => format!(
                    "verdict: {n} damaged {}; a node reports an error for what they held and serves \
                     every other record (restore those keys from a replica or a backup)",
                    plural(n, "record")
                ),
            }
        );
        out
    }
}

fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        word.to_string()
    } else {
        format!("{word}s")
    }
}

/// Checks the data directory at `root`, one shard at a time, each on its
/// own glommio executor with `io_memory_bytes` of DMA memory.
pub fn verify_data_dir(root: &Path, storage: StorageConfig, io_memory_bytes: usize) -> Result<Findings, VerifyError> {
    let data_dir = DataDir::open_existing(root)?;
    let (shard_count, partition_count) = (data_dir.shard_count(), data_dir.partition_count());
    let mut shards = Vec::with_capacity(shard_count as usize);
    for shard in 0..shard_count {
        let layout = ShardLayout { shard, shard_count, partition_count };
        let (root, marker, storage) = (root.to_owned(), data_dir.marker_path(), storage.clone());
        let executor_error = |message: String| VerifyError::Executor { shard, message };
        let findings = LocalExecutorBuilder::new(Placement::Unbound)
            .name(&format!("ringkv-verify-{shard}"))
            .io_memory(io_memory_bytes)
            .spawn(move || verify_shard(root, marker, storage, layout))
            .map_err(|e| executor_error(crate::runtime::into_io(e).to_string()))?
            .join()
            .map_err(|e| executor_error(crate::runtime::into_io(e).to_string()))?;
        shards.push(findings);
    }
    Ok(Findings { root: root.to_owned(), partition_count, shards })
}

async fn verify_shard(root: PathBuf, marker: PathBuf, storage: StorageConfig, layout: ShardLayout) -> ShardFindings {
    let mut findings = ShardFindings { shard: layout.shard, ..ShardFindings::default() };
    if let Err(e) = DmaDisk::prime(&marker).await {
        findings.failure = Some(format!("opening {} with O_DIRECT: {e}", marker.display()));
        return findings;
    }
    let (store, background) = match ShardStore::open(DmaDisk::default(), &root, storage, layout).await {
        Ok(opened) => opened,
        Err(e) => {
            findings.failure = Some(format!("the store does not open: {e}"));
            return findings;
        }
    };
    spawn_detached(background);
    findings.keys = store.stats().keys;
    for partition in store.partitions() {
        match store.verify(partition).await {
            Ok(report) => {
                findings.partitions += 1;
                findings.segments += report.segments;
                findings.records += report.records;
                findings.segment_bytes += report.bytes;
                findings.hints += report.hints;
                findings
                    .damage
                    .extend(report.errors.into_iter().map(|(path, offset, e)| (path, offset, e.to_string())));
                findings.damage.extend(report.hint_mismatches.into_iter().map(|(path, what)| (path, 0, what)));
            }
            Err(e) => {
                findings.failure = Some(format!("partition {partition}: {e}"));
                break;
            }
        }
    }
    if let Err(e) = store.close().await {
        findings.failure.get_or_insert(format!("closing the store: {e}"));
    }
    findings
}
