//! The data directory as a whole: an exclusive lock (so a second process
//! cannot open it: glommio binds with SO_REUSEPORT, so a port conflict would
//! not stop it), and the manifest recording the shard and partition counts.
//! Runs with std::fs on the main thread before any shard starts.
//!
//! Also writes the marker file every shard opens first with O_DIRECT
//! (glommio 0.9.0 mis-detects polled I/O when a thread's first DMA file on a
//! device is new and empty; see DEPENDENCY_NOTES.md).

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::commit_log::parse_log_file_name;
use super::format::{parse_record, CommitLogHeader, ManifestHeader, RecordKind, BLOCK_BYTES, FILE_HEADER_BYTES};
use super::{IoOp, Result, StorageError};

const LOCK_FILE: &str = "LOCK";
const MANIFEST_FILE: &str = "MANIFEST";

/// A locked, initialised data directory. The lock is held until drop.
#[derive(Debug)]
pub struct DataDir {
    root: PathBuf,
    _lock: File,
    manifest: ManifestHeader,
}

fn io(op: IoOp, path: &Path) -> impl FnOnce(std::io::Error) -> StorageError + '_ {
    move |e| StorageError::io(op, path, e)
}

impl DataDir {
    /// Creates (if needed), locks and checks `root` for a node with this
    /// many shards and partitions.
    pub fn open(root: &Path, shard_count: u32, partition_count: u32) -> Result<Self> {
        fs::create_dir_all(root).map_err(io(IoOp::CreateDir, root))?;
        let lock = Self::lock(root)?;
        let manifest_path = root.join(MANIFEST_FILE);
        let wanted = ManifestHeader { shard_count, partition_count };
        let manifest = match fs::read(&manifest_path) {
            Ok(bytes) => {
                let found = ManifestHeader::decode(&bytes)
                    .map_err(|error| StorageError::BadFile { path: manifest_path.clone(), error })?;
                if found.partition_count != partition_count {
                    return Err(StorageError::PartitionCountMismatch {
                        found: found.partition_count,
                        configured: partition_count,
                    });
                }
                if found.shard_count != shard_count {
                    Self::change_shard_count(root, found.shard_count, shard_count)?;
                    write_manifest(&manifest_path, &wanted)?;
                }
                wanted
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                write_manifest(&manifest_path, &wanted)?;
                sync_dir(root)?;
                wanted
            }
            Err(e) => return Err(StorageError::io(IoOp::Read, &manifest_path, e)),
        };
        Ok(Self { root: root.to_owned(), _lock: lock, manifest })
    }

    /// Locks an existing data directory as it is, with the layout its
    /// manifest records: creates nothing and changes nothing (for offline
    /// tools, which must not relayout or initialise what they inspect).
    pub fn open_existing(root: &Path) -> Result<Self> {
        let manifest_path = root.join(MANIFEST_FILE);
        let bytes = match fs::read(&manifest_path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StorageError::NotADataDirectory { path: root.to_owned() })
            }
            Err(e) => return Err(StorageError::io(IoOp::Read, &manifest_path, e)),
        };
        let manifest =
            ManifestHeader::decode(&bytes).map_err(|error| StorageError::BadFile { path: manifest_path, error })?;
        let lock = Self::lock(root)?;
        Ok(Self { root: root.to_owned(), _lock: lock, manifest })
    }

    /// Takes the directory's lock file (held until drop).
    fn lock(root: &Path) -> Result<File> {
        let lock_path = root.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(IoOp::Open, &lock_path))?;
        match lock.try_lock() {
            Ok(()) => Ok(lock),
            Err(std::fs::TryLockError::WouldBlock) => Err(StorageError::Locked { path: root.to_owned() }),
            Err(std::fs::TryLockError::Error(e)) => Err(StorageError::io(IoOp::Lock, &lock_path, e)),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn shard_count(&self) -> u32 {
        self.manifest.shard_count
    }

    pub fn partition_count(&self) -> u32 {
        self.manifest.partition_count
    }

    /// A non-empty file each shard opens with O_DIRECT before anything else.
    pub fn marker_path(&self) -> PathBuf {
        self.root.join(MANIFEST_FILE)
    }

    /// Partitions move between shards when the count changes, but commit
    /// logs are per shard: refuse unless every old log is empty (a clean
    /// stop empties them), then drop the old logs.
    fn change_shard_count(root: &Path, found: u32, configured: u32) -> Result<()> {
        let logs = root.join("commitlog");
        for shard in 0..found {
            let dir = logs.join(format!("shard-{shard:03}"));
            let Ok(entries) = fs::read_dir(&dir) else { continue };
            for entry in entries {
                let entry = entry.map_err(io(IoOp::List, &dir))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if parse_log_file_name(&name).is_some() && log_has_records(&entry.path())? {
                    return Err(StorageError::ShardCountChanged { found, configured });
                }
            }
        }
        for shard in 0..found.max(configured) {
            let dir = logs.join(format!("shard-{shard:03}"));
            let Ok(entries) = fs::read_dir(&dir) else { continue };
            for entry in entries.flatten() {
                if parse_log_file_name(&entry.file_name().to_string_lossy()).is_some() {
                    fs::remove_file(entry.path()).map_err(io(IoOp::Remove, &entry.path()))?;
                }
            }
            sync_dir(&dir)?;
        }
        tracing::info!(found, configured, "shard count changed; empty commit logs removed");
        Ok(())
    }
}

fn write_manifest(path: &Path, manifest: &ManifestHeader) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut block = vec![0u8; BLOCK_BYTES];
    manifest.encode(&mut block);
    let mut file = File::create(&tmp).map_err(io(IoOp::Open, &tmp))?;
    file.write_all(&block).map_err(io(IoOp::Write, &tmp))?;
    file.sync_all().map_err(io(IoOp::Sync, &tmp))?;
    fs::rename(&tmp, path).map_err(io(IoOp::Rename, &tmp))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(IoOp::SyncDir, dir))
}

/// Whether a commit-log file holds a record of its current incarnation.
fn log_has_records(path: &Path) -> Result<bool> {
    let mut bytes = vec![0u8; FILE_HEADER_BYTES + BLOCK_BYTES];
    let mut file = File::open(path).map_err(io(IoOp::Open, path))?;
    let mut read = 0;
    while read < bytes.len() {
        match file.read(&mut bytes[read..]).map_err(io(IoOp::Read, path))? {
            0 => break,
            n => read += n,
        }
    }
    let Ok(header) = CommitLogHeader::decode(&bytes[..read]) else {
        // A damaged header cannot vouch for emptiness.
        return Ok(read > FILE_HEADER_BYTES);
    };
    Ok(match parse_record(&bytes[FILE_HEADER_BYTES..read]) {
        Ok(r) => r.kind != RecordKind::Pad && r.lsn >= header.first_lsn,
        Err(_) => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_open_of_the_same_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let first = DataDir::open(dir.path(), 2, 256).unwrap();
        let err = DataDir::open(dir.path(), 2, 256).unwrap_err();
        assert!(matches!(err, StorageError::Locked { .. }), "{err}");
        drop(first);
        DataDir::open(dir.path(), 2, 256).unwrap();
    }

    #[test]
    fn partition_count_is_fixed_at_creation() {
        let dir = tempfile::tempdir().unwrap();
        drop(DataDir::open(dir.path(), 1, 256).unwrap());
        let err = DataDir::open(dir.path(), 1, 1024).unwrap_err();
        assert!(matches!(err, StorageError::PartitionCountMismatch { found: 256, configured: 1024 }));
    }

    #[test]
    fn a_foreign_manifest_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(MANIFEST_FILE), vec![7u8; 4096]).unwrap();
        let err = DataDir::open(dir.path(), 1, 256).unwrap_err();
        assert!(err.to_string().contains("MANIFEST"), "{err}");
    }
}
