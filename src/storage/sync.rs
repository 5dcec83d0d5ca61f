//! Single-threaded async coordination used inside one shard: a notification
//! with no lost wake-ups, a cooperative yield, and the gate that keeps a
//! path from being removed while it is being opened. Runtime-agnostic so
//! the same engine code runs on glommio and on the simulated executor.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// Wakes every listener registered before `notify`. Take a listener *before*
/// checking the condition you wait for, then await it: a notification
/// between the check and the await is not lost.
///
/// Each listener owns at most one waker slot, replaced when it is polled
/// again and freed when it is dropped, so abandoned listeners (the loser of
/// a select) do not accumulate.
#[derive(Default)]
pub struct Notify {
    generation: Cell<u64>,
    wakers: RefCell<slab::Slab<Waker>>,
}

impl Notify {
    pub fn notify(&self) {
        self.generation.set(self.generation.get() + 1);
        let wakers = std::mem::take(&mut *self.wakers.borrow_mut());
        for (_, waker) in wakers {
            waker.wake();
        }
    }

    pub fn listen(&self) -> Listen<'_> {
        Listen { notify: self, generation: self.generation.get(), slot: None }
    }
}

pub struct Listen<'a> {
    notify: &'a Notify,
    generation: u64,
    /// Our waker's slot, valid while the generation has not moved.
    slot: Option<usize>,
}

impl Future for Listen<'_> {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.notify.generation.get() != self.generation {
            self.slot = None;
            return Poll::Ready(());
        }
        let mut wakers = self.notify.wakers.borrow_mut();
        match self.slot {
            Some(slot) => wakers[slot].clone_from(cx.waker()),
            None => {
                let slot = wakers.insert(cx.waker().clone());
                drop(wakers);
                self.slot = Some(slot);
            }
        }
        Poll::Pending
    }
}

impl Drop for Listen<'_> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            if self.notify.generation.get() == self.generation {
                self.notify.wakers.borrow_mut().try_remove(slot);
            }
        }
    }
}

/// Lets other tasks of the shard run before continuing.
pub fn yield_now() -> impl Future<Output = ()> {
    struct Yield(bool);
    impl Future for Yield {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if self.0 {
                return Poll::Ready(());
            }
            self.0 = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
    Yield(false)
}

/// Paths with an open in flight. glommio 0.9 opens a file and then calls
/// `statfs(path).unwrap()`, so a path removed or renamed away by another
/// task between the two panics the executor; `Disk` implementations hold an
/// `Opening` across their open and make removals and renames of the same
/// path wait for it (`until_unopened`), so no engine code has to arrange
/// that itself.
#[derive(Default)]
pub struct OpenGate {
    opening: RefCell<HashMap<PathBuf, usize>>,
    ended: Notify,
}

/// An open of one path in flight; ends when dropped.
pub struct Opening<'a> {
    gate: &'a OpenGate,
    path: PathBuf,
}

impl OpenGate {
    pub fn begin(&self, path: &Path) -> Opening<'_> {
        *self.opening.borrow_mut().entry(path.to_owned()).or_insert(0) += 1;
        Opening { gate: self, path: path.to_owned() }
    }

    /// Resolves once no open of `path` is in flight.
    pub async fn until_unopened(&self, path: &Path) {
        loop {
            let ended = self.ended.listen();
            if !self.opening.borrow().contains_key(path) {
                return;
            }
            ended.await;
        }
    }
}

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        let mut opening = self.gate.opening.borrow_mut();
        if let Some(count) = opening.get_mut(&self.path) {
            *count -= 1;
            if *count == 0 {
                opening.remove(&self.path);
            }
        }
        drop(opening);
        self.gate.ended.notify();
    }
}
