//! The runtime seam: the only code that calls glommio. Spawning, timers and
//! the O_DIRECT disk (`DmaDisk`) live here, so the rest of the crate does not
//! depend on glommio 0.9.0's API (the last release under that name) and a
//! later change of runtime touches one module.

mod dma_disk;

pub use dma_disk::{DmaDisk, DmaFile};

use std::future::Future;
use std::io;
use std::time::Duration;

/// Converts a glommio error, keeping the OS error code (glommio's own
/// conversion drops it, and the engine needs ENOSPC to tell "full" apart).
pub fn into_io<T>(error: glommio::GlommioError<T>) -> io::Error {
    match error {
        glommio::GlommioError::IoError(e) => e,
        glommio::GlommioError::EnhancedIoError { source, .. } => source,
        other => io::Error::from(other),
    }
}

/// Runs `future` on the current shard in the background. Dropping a glommio
/// task handle cancels the task, so the handle is detached here.
pub fn spawn_detached(future: impl Future<Output = ()> + 'static) {
    glommio::spawn_local(future).detach();
}

/// Runs `future` in a low-priority task queue: the shard runs it when its
/// other tasks have nothing to do (or now and then, by its share).
pub fn spawn_when_idle(future: impl Future<Output = ()> + 'static) {
    let queue =
        glommio::executor().create_task_queue(glommio::Shares::Static(1), glommio::Latency::NotImportant, "when-idle");
    glommio::spawn_local_into(future, queue).expect("the queue was just created").detach();
}

pub async fn sleep(duration: Duration) {
    glommio::timer::sleep(duration).await;
}

/// Lets other tasks of the shard run if this one has used its time slice.
pub async fn yield_if_needed() {
    glommio::yield_if_needed().await;
}

/// The allocator of the `ringkv` binary, declared there with
/// `#[global_allocator]` (a library must not choose one for the programs
/// that embed its client). mimalloc's per-thread heaps suit executors that
/// never share memory, and with 2 MiB pages (see `tune_allocator`) the
/// random accesses of index and cache lookups miss the TLB far less. On the
/// Redis-port benchmark (-P 16, 2 shards) against glibc malloc, same run:
/// sync `none` SET 1.09x, GET 1.20x; sync `group` SET 1.02x, GET 1.15x.
pub type Allocator = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc v3's `mimalloc.h` (the Rust bindings
/// do not name it); `the_mimalloc_purge_option_is_the_one_we_mean` checks it.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Process-wide allocator settings for the engine's allocation pattern: DMA
/// buffers of up to a few MiB are allocated and freed at high rates, and
/// every lookup touches random cache lines of a large heap. Call once at
/// startup, before any shard starts. Both allocators are tuned, since which
/// one serves the process is the binary's choice:
/// - glibc serves allocations over 128 KiB with mmap and returns freed
///   memory to the kernel, so every buffer would be page-faulted in again
///   (measured: a quarter of the CPU of a 16 KiB-value ingest). Keeping them
///   in the heap makes reuse free.
/// - mimalloc (`Allocator`) purges freed memory a second after it is freed,
///   which under write load means page-faulting write buffers in again
///   (measured: SET 0.79x); it keeps what it has instead, so a node's
///   resident memory stays at its peak, which the configured cache and
///   write-buffer limits bound. Its heap is backed by transparent huge
///   pages where the kernel allows them (madvise mode is enough).
pub fn tune_allocator() {
    // SAFETY: mallopt and mi_option_set only change allocator parameters;
    // called before other threads allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1);
        libmimalloc_sys::mi_option_set(libmimalloc_sys::mi_option_large_os_pages, 1);
    }
}

/// Makes a command-line tool end on a closed stdout (`ringkv get k | head
/// -1`) the way other tools do, by SIGPIPE. Rust ignores SIGPIPE, so
/// `println!` would panic instead. Not for servers: with SIGPIPE ignored,
/// a socket whose peer left reports EPIPE, an error to handle. Call before
/// starting threads.
pub fn end_on_closed_stdout() {
    // SAFETY: restores a signal's default disposition; no handler runs.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// A listening socket for glommio with SO_REUSEADDR as well as
/// SO_REUSEPORT. glommio's own `bind` sets only the latter; connections it
/// accepts inherit that, and after a restart their lingering FIN_WAIT2
/// sockets then conflict with binding the port again.
pub fn bind_listener(address: std::net::SocketAddr) -> io::Result<glommio::net::TcpListener> {
    use std::os::fd::IntoRawFd;
    let domain = socket2::Domain::for_address(address);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&address.into())?;
    socket.listen(1024)?;
    let fd = socket.into_raw_fd();
    // SAFETY: `fd` is a bound, listening TCP socket we own; glommio takes
    // ownership of it.
    Ok(unsafe { <glommio::net::TcpListener as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use glommio::{LocalExecutorBuilder, Placement};
    use std::time::Instant;

    /// The vendored glommio's rings post completions when the shard next
    /// enters the kernel or returns from an interrupt (tools/vendor/README.md),
    /// the preempt timer's among them. A task that computes without a system
    /// call must still be told to yield, or one busy task would starve every
    /// other. (With `IORING_SETUP_DEFER_TASKRUN`, which runs such work only
    /// inside `io_uring_enter`, it never is: this test then fails.)
    #[test]
    fn a_task_that_never_enters_the_kernel_is_still_told_to_yield() {
        let told_after = LocalExecutorBuilder::new(Placement::Unbound)
            .preempt_timer(Duration::from_millis(10))
            .spawn(|| async {
                // Instant::now reads the clock through the vDSO: no syscall.
                let start = Instant::now();
                while start.elapsed() < Duration::from_secs(30) {
                    if glommio::executor().need_preempt() {
                        return Some(start.elapsed());
                    }
                    std::hint::spin_loop();
                }
                None
            })
            .expect("an executor starts")
            .join()
            .expect("the test's executor ends");
        assert!(told_after.is_some(), "a busy task was never told to yield (30 s)");
    }

    /// The vendored glommio keeps a round's preemption timers while they
    /// are pending instead of re-arming them every round
    /// (tools/vendor/README.md). One that fired must still be re-armed:
    /// a busy task that yields whenever told to, next to a task that wakes
    /// the executor every millisecond (so rounds keep timers often), is
    /// told to yield again and again.
    #[test]
    fn a_busy_task_is_told_to_yield_again_and_again() {
        const YIELDS: u32 = 50;
        let told = LocalExecutorBuilder::new(Placement::Unbound)
            .preempt_timer(Duration::from_millis(10))
            .spawn(|| async {
                let done = std::rc::Rc::new(std::cell::Cell::new(false));
                let ticker = glommio::spawn_local({
                    let done = done.clone();
                    async move {
                        while !done.get() {
                            glommio::timer::sleep(Duration::from_millis(1)).await;
                        }
                    }
                });
                let start = Instant::now();
                let mut told = 0;
                while told < YIELDS && start.elapsed() < Duration::from_secs(60) {
                    if glommio::executor().need_preempt() {
                        told += 1;
                        glommio::yield_if_needed().await;
                    }
                    std::hint::spin_loop();
                }
                done.set(true);
                ticker.await;
                told
            })
            .expect("an executor starts")
            .join()
            .expect("the test's executor ends");
        assert_eq!(told, YIELDS, "a busy task stopped being told to yield (60 s)");
    }

    /// The vendored glommio parks with a pair of fences instead of a
    /// `membarrier` (tools/vendor/README.md). A wake lost between two
    /// shards would leave one asleep for good: here each of 20,000 round
    /// trips parks both executors and wakes each from the other's thread.
    #[test]
    fn wakes_between_shards_are_never_lost() {
        round_trips_between_two_executors(None);
    }

    /// The same with the node's default spin before parking: most wakes
    /// then come while the other executor spins (and yields its CPU).
    #[test]
    fn wakes_between_spinning_shards_are_never_lost() {
        let spin_us = crate::config::Config::default().node.spin_before_park_us;
        assert!(spin_us > 0, "the default spins");
        round_trips_between_two_executors(Some(Duration::from_micros(spin_us)));
    }

    fn round_trips_between_two_executors(spin_before_park: Option<Duration>) {
        const ROUND_TRIPS: u32 = 20_000;
        let builder = || {
            let builder = LocalExecutorBuilder::new(Placement::Unbound);
            match spin_before_park {
                Some(spin) => builder.spin_before_park(spin),
                None => builder,
            }
        };
        let (to_echo, echo_inbox) = async_channel::bounded::<u32>(1);
        let (to_origin, origin_inbox) = async_channel::bounded::<u32>(1);
        let echo = builder()
            .spawn(move || async move {
                while let Ok(n) = echo_inbox.recv().await {
                    if to_origin.send(n + 1).await.is_err() {
                        break;
                    }
                }
            })
            .expect("an executor starts");
        let origin = builder()
            .spawn(move || async move {
                for n in 0..ROUND_TRIPS {
                    to_echo.send(n).await.expect("the echo shard runs");
                    assert_eq!(origin_inbox.recv().await, Ok(n + 1));
                }
            })
            .expect("an executor starts");
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let outcome = origin.join().is_ok() && echo.join().is_ok();
            let _ = done.send(outcome);
        });
        match finished.recv_timeout(Duration::from_secs(120)) {
            Ok(outcome) => assert!(outcome, "an executor failed"),
            Err(_) => panic!("{ROUND_TRIPS} round trips did not end in 120 s: a wake was lost"),
        }
    }

    #[test]
    fn the_mimalloc_purge_option_is_the_one_we_mean() {
        // Neighbouring options have other defaults (deprecated eager-commit
        // delay 1, NUMA nodes 0); purge delay is 1000 ms in v3, or -1 once
        // `tune_allocator` has run in this test process.
        // SAFETY: mi_option_get only reads an option.
        let value = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert!(value == 1000 || value == -1, "option {MI_OPTION_PURGE_DELAY} is {value}");
        // SAFETY: as above.
        let large_pages_default = unsafe { libmimalloc_sys::mi_option_get(libmimalloc_sys::mi_option_large_os_pages) };
        assert!(large_pages_default == 0 || large_pages_default == 1);
    }
}
