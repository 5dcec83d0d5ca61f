//! `Disk` over glommio DMA files: O_DIRECT reads and writes through io_uring,
//! fdatasync, and directory syncs. Directory listing, renames and removals
//! are rare metadata operations done with std::fs.

use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use glommio::io::{Directory, DmaBuffer, OpenOptions, ReadResult};

use super::into_io;
use crate::storage::disk::{Disk, DiskBuffer, DiskFile, OpenMode};
use crate::storage::sync::OpenGate;

/// The real disk, for the shard whose executor calls it.
#[derive(Clone)]
pub struct DmaDisk {
    origin: Instant,
    /// Removals and renames wait for opens of the same path (see `OpenGate`).
    opening: Rc<OpenGate>,
}

impl Default for DmaDisk {
    fn default() -> Self {
        Self { origin: Instant::now(), opening: Rc::default() }
    }
}

impl DmaDisk {
    /// Opens an existing non-empty file with O_DIRECT before anything else on
    /// this executor: glommio 0.9.0 otherwise may cache "pollable" for the
    /// device from a new empty file and fail every later read with EOPNOTSUPP.
    pub async fn prime(marker: &Path) -> io::Result<()> {
        let file = glommio::io::DmaFile::open(marker).await.map_err(into_io)?;
        let probe = file.read_at(0, 512).await.map_err(into_io)?;
        drop(probe);
        file.close().await.map_err(into_io)
    }
}

impl DiskBuffer for DmaBuffer {
    fn as_bytes(&self) -> &[u8] {
        DmaBuffer::as_bytes(self)
    }
    fn as_bytes_mut(&mut self) -> &mut [u8] {
        DmaBuffer::as_bytes_mut(self)
    }
    fn trim(&mut self, len: usize) {
        self.trim_to_size(len);
    }
}

/// An open O_DIRECT file.
pub struct DmaFile(glommio::io::DmaFile);

impl DiskFile for DmaFile {
    type Buffer = DmaBuffer;
    type Read = ReadResult;

    async fn write_at(&self, buffer: Rc<DmaBuffer>, pos: u64) -> io::Result<()> {
        let len = buffer.len();
        let written = self.0.write_rc_at(buffer, pos).await.map_err(into_io)?;
        if written < len {
            // O_DIRECT writes are short only when the device is out of space.
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        Ok(())
    }

    async fn read_at(&self, pos: u64, len: usize) -> io::Result<ReadResult> {
        self.0.read_at(pos, len).await.map_err(into_io)
    }

    async fn fdatasync(&self) -> io::Result<()> {
        #[cfg(debug_assertions)]
        hold_commit_log_sync(&self.0).await;
        self.0.fdatasync().await.map_err(into_io)
    }

    async fn size(&self) -> io::Result<u64> {
        // glommio's file_size() stats the file by its path, which fails once
        // the file is renamed or unlinked (compaction does both while reads
        // still hold the file); fstat of the descriptor does not. It is a
        // metadata call that does no I/O.
        let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: the descriptor is open for the lifetime of self, and fstat
        // fully initialises `stat` when it returns 0.
        let rc = unsafe { libc::fstat(self.0.as_raw_fd(), stat.as_mut_ptr()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: initialised by the successful fstat above.
        let size = unsafe { stat.assume_init() }.st_size;
        u64::try_from(size).map_err(|_| io::Error::other("negative file size"))
    }

    async fn allocate(&self, len: u64) -> io::Result<()> {
        self.0.pre_allocate(len, false).await.map_err(into_io)
    }

    async fn truncate(&self, len: u64) -> io::Result<()> {
        self.0.truncate(len).await.map_err(into_io)
    }

    async fn close(self) -> io::Result<()> {
        self.0.close().await.map_err(into_io)
    }
}

impl Disk for DmaDisk {
    type Buffer = DmaBuffer;
    type File = DmaFile;

    fn alloc_buffer(&self, len: usize) -> DmaBuffer {
        glommio::allocate_dma_buffer(len)
    }

    async fn open(&self, path: &Path, mode: OpenMode) -> io::Result<DmaFile> {
        let _opening = self.opening.begin(path);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(mode == OpenMode::CreateNew)
            .dma_open(path)
            .await
            .map_err(into_io)?;
        Ok(DmaFile(file))
    }

    async fn remove(&self, path: &Path) -> io::Result<()> {
        self.opening.until_unopened(path).await;
        std::fs::remove_file(path)
    }

    async fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.opening.until_unopened(from).await;
        std::fs::rename(from, to)
    }

    async fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }

    async fn sync_dir(&self, path: &Path) -> io::Result<()> {
        // glommio opens directories with openat(-1, path): a relative path
        // fails with EBADF, so resolve it first.
        let dir = Directory::open(std::path::absolute(path)?).await.map_err(into_io)?;
        dir.sync().await.map_err(into_io)?;
        dir.close().await.map_err(into_io)
    }

    async fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let mut names: Vec<String> = std::fs::read_dir(path)?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        Ok(names)
    }

    async fn sleep(&self, duration: Duration) {
        glommio::timer::sleep(duration).await;
    }

    fn now(&self) -> Duration {
        self.origin.elapsed()
    }
}

/// Fault injection for tests (debug builds only): while the file named by
/// `RINGKV_FAULT_HOLD_SYNC` exists, commit-log fdatasyncs wait, after
/// creating `<that file>.reached` to say one is being held. Lets a test keep
/// a write waiting for durability for exactly as long as it needs.
#[cfg(debug_assertions)]
async fn hold_commit_log_sync(file: &glommio::io::DmaFile) {
    static HOLD: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    // Read once: fdatasync is on the write path.
    let Some(hold) = HOLD.get_or_init(|| std::env::var_os("RINGKV_FAULT_HOLD_SYNC").map(Into::into)) else { return };
    let is_log = file.path().is_some_and(|p| p.components().any(|c| c.as_os_str() == "commitlog"));
    if !is_log || !hold.exists() {
        return;
    }
    let mut reached = hold.clone().into_os_string();
    reached.push(".reached");
    let _ = std::fs::write(&reached, b"");
    while hold.exists() {
        glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
    }
}
