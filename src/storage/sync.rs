//! Single-threaded async coordination used inside one shard: a notification
//! with no lost wake-ups, and a cooperative yield. Runtime-agnostic so the
//! same engine code runs on glommio and on the simulated executor.

use std::cell::{Cell, RefCell};
use std::future::Future;
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
