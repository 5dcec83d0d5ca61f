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

pub async fn sleep(duration: Duration) {
    glommio::timer::sleep(duration).await;
}

/// Lets other tasks of the shard run if this one has used its time slice.
pub async fn yield_if_needed() {
    glommio::yield_if_needed().await;
}

/// Process-wide allocator settings for the engine's allocation pattern: DMA
/// buffers of up to a few MiB are allocated and freed at high rates. glibc
/// serves allocations over 128 KiB with mmap and returns freed memory to the
/// kernel, so every buffer would be page-faulted in again (measured: a
/// quarter of the CPU of a 16 KiB-value ingest). Keeping them in the heap
/// makes reuse free. Call once at startup, before any shard starts.
pub fn tune_allocator() {
    // SAFETY: mallopt only changes allocator parameters; called before
    // other threads allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
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
