//! The simulated disk and the deterministic single-threaded executor that
//! drives storage tests on it.
//!
//! `SimDisk` keeps, per file, what reads see and what would survive a crash,
//! and per directory which names are durable. `crash_image(seed)` returns the
//! disk as a reboot would find it: names not yet made durable by `sync_dir`
//! are gone, and every write since the file's last `fdatasync` is applied
//! whole, dropped, or torn at 512-byte sector granularity, chosen by the seed.
//! Faults: crash at the n-th operation (every later operation fails), EIO on
//! chosen operations, ENOSPC past a byte capacity, and bit flips.
//!
//! Time is virtual: `sleep` registers a timer and `SimExecutor::block_on`
//! advances the clock to the next timer whenever no task can run, so timed
//! behaviour is instant and reproducible.

use super::sync::OpenGate;
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::disk::{Disk, DiskBuffer, DiskFile, OpenMode};
use super::format::BLOCK_BYTES;

const SECTOR_BYTES: usize = 512;

/// Which operations a fault rule matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimOp {
    Write,
    Read,
    Fsync,
    Metadata,
}

#[derive(Clone, Debug)]
struct FaultRule {
    op: SimOp,
    /// Matches only paths containing this text, when set.
    path_contains: Option<String>,
    errno: i32,
    remaining: u32,
}

#[derive(Clone, Debug)]
enum PendingOp {
    Write { pos: u64, bytes: Vec<u8> },
    Truncate { len: u64 },
}

#[derive(Clone, Debug, Default)]
struct Inode {
    data: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<PendingOp>,
}

#[derive(Default)]
struct SimState {
    names: BTreeMap<PathBuf, u64>,
    durable_names: BTreeMap<PathBuf, u64>,
    dirs: BTreeSet<PathBuf>,
    inodes: BTreeMap<u64, Inode>,
    next_inode: u64,
    ops: u64,
    crash_at_op: Option<u64>,
    crashed: bool,
    capacity_bytes: Option<u64>,
    /// Times a read yields to other tasks after taking its bytes, so
    /// tests can interleave work with reads in flight (as a real disk does).
    read_yields: u32,
    faults: Vec<FaultRule>,
    now: Duration,
    timers: BTreeMap<(Duration, u64), Waker>,
    next_timer: u64,
    stats: SimStats,
}

/// Counters of what the engine asked of the disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimStats {
    pub writes: u64,
    pub written_bytes: u64,
    pub reads: u64,
    pub read_bytes: u64,
    pub fsyncs: u64,
    pub dir_syncs: u64,
}

fn os_error(errno: i32) -> io::Error {
    io::Error::from_raw_os_error(errno)
}

/// The error every operation returns once the simulated machine has crashed.
pub fn crashed_error() -> io::Error {
    io::Error::other("simulated crash: the disk no longer answers")
}

impl SimState {
    fn used_bytes(&self) -> u64 {
        self.inodes.values().map(|i| i.data.len() as u64).sum()
    }

    /// Counts one operation and applies crash and fault rules to it.
    fn begin(&mut self, op: SimOp, path: &Path) -> io::Result<()> {
        if self.crashed {
            return Err(crashed_error());
        }
        self.ops += 1;
        if self.crash_at_op == Some(self.ops) {
            self.crashed = true;
            return Err(crashed_error());
        }
        let text = path.to_string_lossy();
        if let Some(rule) = self
            .faults
            .iter_mut()
            .find(|r| r.op == op && r.remaining > 0 && r.path_contains.as_deref().is_none_or(|p| text.contains(p)))
        {
            rule.remaining -= 1;
            return Err(os_error(rule.errno));
        }
        Ok(())
    }

    fn inode_of(&self, path: &Path) -> io::Result<u64> {
        self.names.get(path).copied().ok_or_else(|| os_error(libc::ENOENT))
    }
}

/// A simulated disk; clones share state.
#[derive(Clone, Default)]
pub struct SimDisk {
    state: Rc<RefCell<SimState>>,
    /// Removals and renames wait for opens of the same path, as on the
    /// real disk (see `OpenGate`).
    opening: Rc<OpenGate>,
}

impl SimDisk {
    /// The inode `open` finds or creates for `path`.
    fn open_name(&self, path: &Path, mode: OpenMode) -> io::Result<u64> {
        let mut s = self.state.borrow_mut();
        s.begin(SimOp::Metadata, path)?;
        let parent = path.parent().unwrap_or(Path::new(""));
        if !s.dirs.contains(parent) {
            return Err(os_error(libc::ENOENT));
        }
        let inode = match (mode, s.names.get(path).copied()) {
            (OpenMode::Existing, Some(ino)) => ino,
            (OpenMode::Existing, None) => return Err(os_error(libc::ENOENT)),
            (OpenMode::CreateNew, Some(_)) => return Err(os_error(libc::EEXIST)),
            (OpenMode::CreateNew, None) => {
                s.next_inode += 1;
                let ino = s.next_inode;
                s.inodes.insert(ino, Inode::default());
                s.names.insert(path.to_owned(), ino);
                ino
            }
        };
        Ok(inode)
    }

    pub fn new() -> Self {
        Self::default()
    }

    /// Crash at the `n`-th operation from now (1 = the next one).
    pub fn crash_after_ops(&self, n: u64) {
        let mut s = self.state.borrow_mut();
        s.crash_at_op = Some(s.ops + n);
    }

    /// Cancels a crash planned with `crash_after_ops` that has not happened.
    pub fn cancel_crash(&self) {
        self.state.borrow_mut().crash_at_op = None;
    }

    pub fn crash_now(&self) {
        self.state.borrow_mut().crashed = true;
    }

    pub fn has_crashed(&self) -> bool {
        self.state.borrow().crashed
    }

    pub fn ops(&self) -> u64 {
        self.state.borrow().ops
    }

    pub fn stats(&self) -> SimStats {
        self.state.borrow().stats
    }

    /// Fails the next `times` operations of kind `op` (on paths containing
    /// `path_contains`, if given) with `errno`.
    pub fn fail(&self, op: SimOp, path_contains: Option<&str>, errno: i32, times: u32) {
        self.state.borrow_mut().faults.push(FaultRule {
            op,
            path_contains: path_contains.map(str::to_owned),
            errno,
            remaining: times,
        });
    }

    pub fn clear_faults(&self) {
        self.state.borrow_mut().faults.clear();
    }

    /// Writes that would grow the total size past `bytes` fail with ENOSPC.
    pub fn set_capacity(&self, bytes: Option<u64>) {
        self.state.borrow_mut().capacity_bytes = bytes;
    }

    /// Makes every later read return only after yielding `times` times to
    /// the executor, with the bytes it saw when it began.
    pub fn set_read_yields(&self, times: u32) {
        self.state.borrow_mut().read_yields = times;
    }

    pub fn used_bytes(&self) -> u64 {
        self.state.borrow().used_bytes()
    }

    /// The disk as a reboot after a crash now would find it.
    pub fn crash_image(&self, seed: u64) -> SimDisk {
        let s = self.state.borrow();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut image = SimState { dirs: s.dirs.clone(), next_inode: s.next_inode, now: s.now, ..SimState::default() };
        for (path, ino) in &s.durable_names {
            let inode = &s.inodes[ino];
            let mut data = inode.durable.clone();
            for op in &inode.pending {
                match op {
                    PendingOp::Write { pos, bytes } => {
                        let choice = rng.gen_range(0..3);
                        if choice == 1 {
                            continue;
                        }
                        for (i, sector) in bytes.chunks(SECTOR_BYTES).enumerate() {
                            if choice == 2 && rng.gen_bool(0.5) {
                                continue;
                            }
                            let at = *pos as usize + i * SECTOR_BYTES;
                            if data.len() < at + sector.len() {
                                data.resize(at + sector.len(), 0);
                            }
                            data[at..at + sector.len()].copy_from_slice(sector);
                        }
                    }
                    PendingOp::Truncate { len } => {
                        if rng.gen_bool(0.5) {
                            data.resize(*len as usize, 0);
                        }
                    }
                }
            }
            image.names.insert(path.clone(), *ino);
            image.durable_names.insert(path.clone(), *ino);
            image.inodes.insert(*ino, Inode { data: data.clone(), durable: data, pending: Vec::new() });
        }
        SimDisk { state: Rc::new(RefCell::new(image)), opening: Rc::default() }
    }

    /// The disk after a clean power cycle: everything written survives (as if
    /// all writes had been synced). For reopen-without-crash tests.
    pub fn clean_image(&self) -> SimDisk {
        let s = self.state.borrow();
        let mut image = SimState { dirs: s.dirs.clone(), next_inode: s.next_inode, now: s.now, ..SimState::default() };
        for (path, ino) in &s.names {
            let data = s.inodes[ino].data.clone();
            image.names.insert(path.clone(), *ino);
            image.durable_names.insert(path.clone(), *ino);
            image.inodes.insert(*ino, Inode { data: data.clone(), durable: data, pending: Vec::new() });
        }
        SimDisk { state: Rc::new(RefCell::new(image)), opening: Rc::default() }
    }

    /// Paths of all files, sorted.
    pub fn files(&self) -> Vec<PathBuf> {
        self.state.borrow().names.keys().cloned().collect()
    }

    /// Current contents of a file (what a read sees).
    pub fn contents(&self, path: &Path) -> Option<Vec<u8>> {
        let s = self.state.borrow();
        s.names.get(path).map(|ino| s.inodes[ino].data.clone())
    }

    /// Flips one bit of a file, in both its current and durable contents.
    pub fn flip_bit(&self, path: &Path, bit: u64) {
        let mut s = self.state.borrow_mut();
        let ino = s.names[path];
        let inode = s.inodes.get_mut(&ino).expect("inode of a named file");
        let (byte, mask) = ((bit / 8) as usize, 1u8 << (bit % 8));
        inode.data[byte] ^= mask;
        if byte < inode.durable.len() {
            inode.durable[byte] ^= mask;
        }
    }

    /// Advances virtual time to the earliest timer and wakes it. False when
    /// no timer is pending.
    fn fire_next_timer(&self) -> bool {
        let mut s = self.state.borrow_mut();
        let Some((&(deadline, id), _)) = s.timers.iter().next() else {
            return false;
        };
        let waker = s.timers.remove(&(deadline, id)).expect("timer just seen");
        s.now = s.now.max(deadline);
        drop(s);
        waker.wake();
        true
    }
}

/// A write buffer for the simulated disk.
pub struct SimBuffer(Vec<u8>);

impl DiskBuffer for SimBuffer {
    fn as_bytes(&self) -> &[u8] {
        &self.0
    }
    fn as_bytes_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
    fn trim(&mut self, len: usize) {
        assert!(len <= self.0.len() && len.is_multiple_of(BLOCK_BYTES), "trim to {len} of {}", self.0.len());
        self.0.truncate(len);
    }
}

/// An open file on the simulated disk. Like a real descriptor it keeps
/// reaching its inode after the name is removed or renamed.
pub struct SimFile {
    disk: SimDisk,
    inode: u64,
    path: PathBuf,
}

impl DiskFile for SimFile {
    type Buffer = SimBuffer;
    type Read = Vec<u8>;

    async fn write_at(&self, buffer: Rc<SimBuffer>, pos: u64) -> io::Result<()> {
        let mut s = self.disk.state.borrow_mut();
        s.begin(SimOp::Write, &self.path)?;
        let bytes = buffer.as_bytes();
        if !pos.is_multiple_of(BLOCK_BYTES as u64) || !bytes.len().is_multiple_of(BLOCK_BYTES) {
            return Err(os_error(libc::EINVAL));
        }
        let end = pos as usize + bytes.len();
        let current = s.inodes[&self.inode].data.len();
        if let Some(cap) = s.capacity_bytes {
            if end > current && s.used_bytes() + (end - current) as u64 > cap {
                return Err(os_error(libc::ENOSPC));
            }
        }
        s.stats.writes += 1;
        s.stats.written_bytes += bytes.len() as u64;
        let inode = s.inodes.get_mut(&self.inode).expect("open inode");
        if inode.data.len() < end {
            inode.data.resize(end, 0);
        }
        inode.data[pos as usize..end].copy_from_slice(bytes);
        inode.pending.push(PendingOp::Write { pos, bytes: bytes.to_vec() });
        Ok(())
    }

    async fn read_at(&self, pos: u64, len: usize) -> io::Result<Vec<u8>> {
        let (bytes, yields) = {
            let mut s = self.disk.state.borrow_mut();
            s.begin(SimOp::Read, &self.path)?;
            s.stats.reads += 1;
            let data = &s.inodes[&self.inode].data;
            let start = (pos as usize).min(data.len());
            let end = (pos as usize).saturating_add(len).min(data.len());
            let bytes = data[start..end].to_vec();
            s.stats.read_bytes += bytes.len() as u64;
            (bytes, s.read_yields)
        };
        for _ in 0..yields {
            super::sync::yield_now().await;
        }
        Ok(bytes)
    }

    async fn fdatasync(&self) -> io::Result<()> {
        let mut s = self.disk.state.borrow_mut();
        s.begin(SimOp::Fsync, &self.path)?;
        s.stats.fsyncs += 1;
        let inode = s.inodes.get_mut(&self.inode).expect("open inode");
        inode.durable = inode.data.clone();
        inode.pending.clear();
        Ok(())
    }

    async fn size(&self) -> io::Result<u64> {
        let mut s = self.disk.state.borrow_mut();
        s.begin(SimOp::Metadata, &self.path)?;
        Ok(s.inodes[&self.inode].data.len() as u64)
    }

    async fn allocate(&self, len: u64) -> io::Result<()> {
        let mut s = self.disk.state.borrow_mut();
        s.begin(SimOp::Write, &self.path)?;
        let current = s.inodes[&self.inode].data.len() as u64;
        if len <= current {
            return Ok(());
        }
        if let Some(cap) = s.capacity_bytes {
            if s.used_bytes() + (len - current) > cap {
                return Err(os_error(libc::ENOSPC));
            }
        }
        let inode = s.inodes.get_mut(&self.inode).expect("open inode");
        inode.data.resize(len as usize, 0);
        // The new size is durable only after fdatasync, like any extension.
        inode.pending.push(PendingOp::Truncate { len });
        Ok(())
    }

    async fn truncate(&self, len: u64) -> io::Result<()> {
        let mut s = self.disk.state.borrow_mut();
        s.begin(SimOp::Metadata, &self.path)?;
        let inode = s.inodes.get_mut(&self.inode).expect("open inode");
        inode.data.resize(len as usize, 0);
        inode.pending.push(PendingOp::Truncate { len });
        Ok(())
    }

    /// Nothing to release: a simulated file is a handle into the disk's
    /// state, and closing has no durability effect to model.
    async fn close(self) -> io::Result<()> {
        Ok(())
    }
}

/// Future of `SimDisk::sleep`.
struct Sleep {
    disk: SimDisk,
    deadline: Duration,
    timer: Option<(Duration, u64)>,
}

impl Future for Sleep {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let disk = self.disk.clone();
        let mut s = disk.state.borrow_mut();
        if s.now >= self.deadline {
            if let Some(key) = self.timer.take() {
                s.timers.remove(&key);
            }
            return Poll::Ready(());
        }
        let key = match self.timer {
            Some(key) => key,
            None => {
                s.next_timer += 1;
                let key = (self.deadline, s.next_timer);
                self.timer = Some(key);
                key
            }
        };
        s.timers.insert(key, cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let Some(key) = self.timer.take() {
            if let Ok(mut s) = self.disk.state.try_borrow_mut() {
                s.timers.remove(&key);
            }
        }
    }
}

impl Disk for SimDisk {
    type Buffer = SimBuffer;
    type File = SimFile;

    fn alloc_buffer(&self, len: usize) -> SimBuffer {
        assert!(len.is_multiple_of(BLOCK_BYTES), "buffer of {len} bytes is not block aligned");
        // Garbage, not zeros: code that relied on fresh buffers being zeroed
        // would write garbage to disk, and the tests would see it.
        SimBuffer(vec![0xa5; len])
    }

    async fn open(&self, path: &Path, mode: OpenMode) -> io::Result<SimFile> {
        let _opening = self.opening.begin(path);
        let inode = self.open_name(path, mode)?;
        // glommio 0.9 opens asynchronously, then calls `statfs(path)
        // .unwrap()`: a path removed (or renamed away) by another task
        // meanwhile panics the executor. Other tasks may run here, as they
        // can on the real disk; `OpenGate` holds back their removals and
        // renames of this path, and this checks that it does.
        super::sync::yield_now().await;
        let still_there = self.state.borrow().names.get(path) == Some(&inode);
        assert!(
            still_there || self.state.borrow().crashed,
            "{} was removed while being opened: glommio 0.9 panics on that (statfs unwrap)",
            path.display()
        );
        Ok(SimFile { disk: self.clone(), inode, path: path.to_owned() })
    }

    async fn remove(&self, path: &Path) -> io::Result<()> {
        self.opening.until_unopened(path).await;
        let mut s = self.state.borrow_mut();
        s.begin(SimOp::Metadata, path)?;
        s.names.remove(path).map(|_| ()).ok_or_else(|| os_error(libc::ENOENT))
    }

    async fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.opening.until_unopened(from).await;
        let mut s = self.state.borrow_mut();
        s.begin(SimOp::Metadata, from)?;
        let ino = s.inode_of(from)?;
        s.names.remove(from);
        s.names.insert(to.to_owned(), ino);
        Ok(())
    }

    async fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut s = self.state.borrow_mut();
        s.begin(SimOp::Metadata, path)?;
        // Directories are modelled as durable at creation: the engine syncs
        // the parent after creating one, and nothing here tests otherwise.
        for ancestor in path.ancestors() {
            s.dirs.insert(ancestor.to_owned());
        }
        Ok(())
    }

    async fn sync_dir(&self, path: &Path) -> io::Result<()> {
        let mut s = self.state.borrow_mut();
        s.begin(SimOp::Fsync, path)?;
        s.stats.dir_syncs += 1;
        let in_dir = |p: &Path| p.parent() == Some(path);
        let durable: Vec<_> = s.durable_names.keys().filter(|p| in_dir(p)).cloned().collect();
        for p in durable {
            s.durable_names.remove(&p);
        }
        let current: Vec<_> = s.names.iter().filter(|(p, _)| in_dir(p)).map(|(p, i)| (p.clone(), *i)).collect();
        s.durable_names.extend(current);
        Ok(())
    }

    async fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let mut s = self.state.borrow_mut();
        s.begin(SimOp::Metadata, path)?;
        if !s.dirs.contains(path) {
            return Err(os_error(libc::ENOENT));
        }
        let mut names: Vec<String> = s
            .names
            .keys()
            .chain(s.dirs.iter())
            .filter(|p| p.parent() == Some(path))
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    fn sleep(&self, duration: Duration) -> impl Future<Output = ()> {
        let deadline = self.state.borrow().now + duration;
        Sleep { disk: self.clone(), deadline, timer: None }
    }

    fn now(&self) -> Duration {
        self.state.borrow().now
    }
}

type LocalTask = Pin<Box<dyn Future<Output = ()>>>;

struct TaskWaker {
    id: usize,
    ready: Arc<Mutex<VecDeque<usize>>>,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.ready.lock().expect("ready queue").push_back(self.id);
    }
}

/// Deterministic single-threaded executor: tasks run in FIFO wake order, and
/// when nothing can run, virtual time jumps to the next timer of `disk`.
pub struct SimExecutor {
    disk: SimDisk,
    ready: Arc<Mutex<VecDeque<usize>>>,
    tasks: Rc<RefCell<slab::Slab<Option<LocalTask>>>>,
    wakers: RefCell<BTreeMap<usize, Waker>>,
}

/// Spawns tasks onto a `SimExecutor` from inside other tasks.
#[derive(Clone)]
pub struct SimSpawner {
    ready: Arc<Mutex<VecDeque<usize>>>,
    tasks: Rc<RefCell<slab::Slab<Option<LocalTask>>>>,
}

impl SimSpawner {
    pub fn spawn(&self, task: impl Future<Output = ()> + 'static) {
        let id = self.tasks.borrow_mut().insert(Some(Box::pin(task)));
        self.ready.lock().expect("ready queue").push_back(id);
    }
}

impl SimExecutor {
    pub fn new(disk: SimDisk) -> Self {
        Self { disk, ready: Arc::default(), tasks: Rc::default(), wakers: RefCell::default() }
    }

    pub fn spawner(&self) -> SimSpawner {
        SimSpawner { ready: self.ready.clone(), tasks: self.tasks.clone() }
    }

    pub fn spawn(&self, task: impl Future<Output = ()> + 'static) {
        self.spawner().spawn(task);
    }

    /// Runs `main` and every spawned task until `main` completes.
    ///
    /// Panics when no task can run and no timer is pending (a deadlock).
    pub fn block_on<T>(&self, main: impl Future<Output = T>) -> T {
        let mut main = std::pin::pin!(main);
        let main_woken = Arc::new(MainFlag(Mutex::new(true)));
        let main_waker = Waker::from(main_woken.clone());
        loop {
            if std::mem::take(&mut *main_woken.0.lock().expect("flag")) {
                if let Poll::Ready(v) = main.as_mut().poll(&mut Context::from_waker(&main_waker)) {
                    return v;
                }
                continue;
            }
            let next = self.ready.lock().expect("ready queue").pop_front();
            match next {
                Some(id) => self.run_task(id),
                None => {
                    if !self.disk.fire_next_timer() {
                        panic!("simulation deadlock: no runnable task and no pending timer");
                    }
                }
            }
        }
    }

    fn run_task(&self, id: usize) {
        let task = match self.tasks.borrow_mut().get_mut(id) {
            Some(slot) => slot.take(),
            None => return,
        };
        // A task already running (woken while polled) or finished is skipped.
        let Some(mut task) = task else { return };
        // One waker per task id, as real executors do (wakers compare equal
        // across polls).
        let waker = self
            .wakers
            .borrow_mut()
            .entry(id)
            .or_insert_with(|| Waker::from(Arc::new(TaskWaker { id, ready: self.ready.clone() })))
            .clone();
        match task.as_mut().poll(&mut Context::from_waker(&waker)) {
            Poll::Ready(()) => {
                self.tasks.borrow_mut().remove(id);
                self.wakers.borrow_mut().remove(&id);
            }
            Poll::Pending => {
                if let Some(slot) = self.tasks.borrow_mut().get_mut(id) {
                    *slot = Some(task);
                }
            }
        }
    }
}

struct MainFlag(Mutex<bool>);

impl Wake for MainFlag {
    fn wake(self: Arc<Self>) {
        *self.0.lock().expect("flag") = true;
    }
}
