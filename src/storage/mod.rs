//! The storage engine: the only code that knows disk layouts.
//!
//! One `ShardStore` per shard (core) owns that shard's partition replicas: a
//! per-shard commit log with group commit (`commit_log`), per-partition
//! append-only segment files with hint files (`segment`), an in-memory key
//! index per partition (`index`), recovery (`recovery`), compaction
//! (`compaction`), and the data-directory lock and manifest (`data_dir`).
//! All file I/O goes through the `Disk` seam (`disk`), implemented over
//! glommio DMA files in `runtime` and in memory by `sim_disk` for tests.
//!
//! Values are opaque bytes here; causality lives above.

pub mod cache;
pub mod commit_log;
pub mod compaction;
pub mod data_dir;
pub mod disk;
pub mod format;
pub mod index;
pub mod partition_table;
pub(crate) mod probing;
pub mod recovery;
pub mod segment;
pub mod sim_disk;
pub mod store;
pub mod sync;

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

pub use cache::Value;
pub use disk::{Disk, DiskBuffer, DiskFile, OpenMode};
pub use store::{Health, PartitionStore, Queued, ShardLayout, ShardStore, StorageStats, TryPut, VerifyReport};

use crate::config::ConfigError;
use format::{HeaderError, RecordError};

/// The file-system operation that failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoOp {
    Open,
    Read,
    Write,
    Sync,
    SyncDir,
    Remove,
    Rename,
    List,
    CreateDir,
    Truncate,
    Stat,
    Lock,
}

impl fmt::Display for IoOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Self::Open => "open",
            Self::Read => "read",
            Self::Write => "write",
            Self::Sync => "fdatasync",
            Self::SyncDir => "sync directory",
            Self::Remove => "remove",
            Self::Rename => "rename",
            Self::List => "list directory",
            Self::CreateDir => "create directory",
            Self::Truncate => "truncate",
            Self::Stat => "stat",
            Self::Lock => "lock",
        };
        f.write_str(name)
    }
}

/// Why a shard stopped accepting writes. Not retryable without a restart.
#[derive(Clone, Debug, thiserror::Error)]
pub enum UnhealthyReason {
    /// After a failed fdatasync the kernel may have dropped the dirty pages;
    /// retrying could report success for data that is gone (the 2018
    /// PostgreSQL "fsyncgate"), so the shard never acknowledges again.
    #[error(
        "fdatasync of {path} failed: {source}; writes are refused until restart (recovery replays the commit log)"
    )]
    FsyncFailed { path: PathBuf, source: Arc<io::Error> },
    #[error("write to {path} failed: {source}; writes are refused until restart")]
    WriteFailed { path: PathBuf, source: Arc<io::Error> },
}

/// Every way a storage operation can fail.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StorageError {
    #[error("key is empty")]
    EmptyKey,
    #[error("key of {len} bytes is over the limit of {limit} bytes")]
    KeyTooLarge { len: usize, limit: usize },
    #[error("value of {len} bytes is over the limit of {limit} bytes")]
    ValueTooLarge { len: usize, limit: usize },
    #[error("storage full: no space left for {path}; reads keep working and writes resume once space is freed")]
    StorageFull { path: PathBuf },
    #[error("shard {shard} is unhealthy: {reason}")]
    Unhealthy { shard: u32, reason: UnhealthyReason },
    #[error("{op} {path}: {source}")]
    Io { op: IoOp, path: PathBuf, source: Arc<io::Error> },
    #[error("{path}: refused: {error}")]
    BadFile { path: PathBuf, error: HeaderError },
    #[error("{path}: corrupt record at offset {offset}: {error}")]
    Corrupt { path: PathBuf, offset: u64, error: RecordError },
    #[error("data directory {path} is in use by another process (its lock file is held)")]
    Locked { path: PathBuf },
    #[error("{path} is not a ringkv data directory (it has no MANIFEST)")]
    NotADataDirectory { path: PathBuf },
    #[error("partition {partition} is not owned by shard {shard} of {shard_count}")]
    WrongShard { partition: u32, shard: u32, shard_count: u32 },
    #[error("partition {partition} is out of range (the ring has {partition_count} partitions)")]
    PartitionOutOfRange { partition: u32, partition_count: u32 },
    #[error(
        "the data directory was last run with {found} shards and its commit logs still hold records; \
         start it once with {found} shards and stop it cleanly before running {configured}"
    )]
    ShardCountChanged { found: u32, configured: u32 },
    #[error("the data directory holds a ring of {found} partitions, the configuration says {configured}")]
    PartitionCountMismatch { found: u32, configured: u32 },
    #[error("the store is closed")]
    Closed,
    #[error(transparent)]
    Config(#[from] ConfigError),
}

impl StorageError {
    pub(crate) fn io(op: IoOp, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self::Io { op, path: path.into(), source: Arc::new(source) }
    }

    /// True for errors after which the same request may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::StorageFull { .. })
    }
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// A small `group`-mode configuration for the in-crate tests: a few hundred
/// writes of a few hundred bytes seal segments and switch commit-log files.
#[cfg(test)]
pub(crate) fn small_test_config() -> crate::config::StorageConfig {
    crate::config::StorageConfig {
        sync_mode: crate::config::SyncMode::Group,
        segment_bytes: 16 << 10,
        segment_write_bytes: 4 << 10,
        commit_batch_bytes_max: 12 << 10,
        read_cache_bytes: 2 << 10,
        key_bytes_max: 32,
        value_bytes_max: 512,
        ..crate::config::StorageConfig::default()
    }
}

/// Runs `body` on a store opened on a fresh simulated disk (its background
/// tasks running), then closes the store: the in-crate tests' setup.
#[cfg(test)]
pub(crate) fn with_sim_store<F: std::future::Future<Output = ()>>(
    config: crate::config::StorageConfig,
    layout: ShardLayout,
    body: impl FnOnce(ShardStore<sim_disk::SimDisk>, sim_disk::SimDisk) -> F,
) {
    let disk = sim_disk::SimDisk::new();
    let exec = sim_disk::SimExecutor::new(disk.clone());
    let spawner = exec.spawner();
    exec.block_on(async {
        let (store, bg) = ShardStore::open(disk.clone(), std::path::Path::new("/data"), config, layout).await.unwrap();
        spawner.spawn(bg);
        body(store.clone(), disk.clone()).await;
        store.close().await.unwrap();
    });
}
