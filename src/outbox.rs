//! The shard's outbox: replies that leave in bursts rather than one by one.
//!
//! Why: a reply's `send` on loopback runs the receiver's network stack in
//! the sender's context, and when the receiving program sleeps in
//! `epoll_wait` it also wakes it (an IPI into an idle vCPU on a VM); that
//! wake-up was ~18% of a one-shard SET profile. redis-server writes every
//! reply of an event-loop round just before it polls again, so its client
//! is woken once per round. A connection here hands its finished reply to
//! the outbox; the replies go out together, each with one non-blocking
//! `send` from the socket's descriptor, when `reply_burst_max` are
//! waiting or when the shard has nothing else to run (the flusher task
//! runs in a low-priority task queue), whichever comes first. What a
//! non-blocking `send` cannot take, the connection writes itself.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::task::{Poll, Waker};

use futures::AsyncWriteExt;
use glommio::net::TcpStream;

use crate::storage::sync::Notify;

struct Waiting {
    fd: RawFd,
    reply: Vec<u8>,
    /// Bytes of `reply` the burst's `send` took; `None` until sent.
    sent: Option<usize>,
    waker: Option<Waker>,
}

/// Per shard (shared by its connections and its flusher task).
pub struct Outbox {
    waiting: RefCell<slab::Slab<Waiting>>,
    /// Slots of `waiting` not yet sent, in arrival order.
    queue: RefCell<Vec<usize>>,
    reply_burst_max: usize,
    work: Notify,
    stopped: Cell<bool>,
    stats: Cell<OutboxStats>,
}

/// Counts since the shard started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutboxStats {
    /// Replies sent through the outbox (in bursts or, at a limit of 1, alone).
    pub replies: u64,
    /// Bursts that sent at least one reply.
    pub bursts: u64,
}

/// Removes a reply from the outbox if its connection goes away first (its
/// descriptor must not be written to once the connection is closed).
struct Slot<'a> {
    outbox: &'a Outbox,
    key: usize,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.outbox.queue.borrow_mut().retain(|&k| k != self.key);
        self.outbox.waiting.borrow_mut().try_remove(self.key);
    }
}

impl Outbox {
    /// An outbox for the current shard, with its flusher task running
    /// (until `stop`).
    pub fn new(reply_burst_max: usize) -> Rc<Self> {
        let outbox = Rc::new(Self {
            waiting: RefCell::new(slab::Slab::new()),
            queue: RefCell::new(Vec::new()),
            reply_burst_max,
            work: Notify::default(),
            stopped: Cell::new(false),
            stats: Cell::new(OutboxStats::default()),
        });
        if reply_burst_max > 1 {
            crate::runtime::spawn_when_idle(outbox.clone().run_flusher());
        }
        outbox
    }

    /// Writes all of `reply` to `stream`, starting in a burst; `reply` is
    /// left empty (its capacity kept for the next reply).
    pub async fn write_all(&self, stream: &mut TcpStream, reply: &mut Vec<u8>) -> std::io::Result<()> {
        let (bytes, sent) = self.send(stream.as_raw_fd(), std::mem::take(reply)).await;
        *reply = bytes;
        let result = match reply.get(sent..) {
            Some(rest) if !rest.is_empty() => stream.write_all(rest).await,
            _ => Ok(()),
        };
        reply.clear();
        result
    }

    /// Sends `reply` on `fd` as part of a burst; gives back the buffer and
    /// how many bytes went out (the caller writes the rest).
    async fn send(&self, fd: RawFd, reply: Vec<u8>) -> (Vec<u8>, usize) {
        if self.reply_burst_max <= 1 || self.stopped.get() {
            self.count(1);
            let sent = send_now(fd, &reply);
            return (reply, sent);
        }
        let key = self.waiting.borrow_mut().insert(Waiting { fd, reply, sent: None, waker: None });
        let slot = Slot { outbox: self, key };
        let queued = {
            let mut queue = self.queue.borrow_mut();
            queue.push(key);
            queue.len()
        };
        if queued >= self.reply_burst_max {
            self.flush();
        } else if queued == 1 {
            self.work.notify();
        }
        poll_fn(|cx| {
            let mut waiting = self.waiting.borrow_mut();
            let entry = &mut waiting[key];
            if entry.sent.is_some() {
                Poll::Ready(())
            } else {
                entry.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await;
        let entry = self.waiting.borrow_mut().remove(key);
        std::mem::forget(slot);
        (entry.reply, entry.sent.unwrap_or(0))
    }

    pub fn stats(&self) -> OutboxStats {
        self.stats.get()
    }

    fn count(&self, replies: usize) {
        let mut stats = self.stats.get();
        stats.replies += replies as u64;
        stats.bursts += 1;
        self.stats.set(stats);
    }

    /// Sends every waiting reply now.
    fn flush(&self) {
        let queue = std::mem::take(&mut *self.queue.borrow_mut());
        if queue.is_empty() {
            return;
        }
        self.count(queue.len());
        let mut waiting = self.waiting.borrow_mut();
        for key in queue {
            let entry = &mut waiting[key];
            entry.sent = Some(send_now(entry.fd, &entry.reply));
            if let Some(waker) = entry.waker.take() {
                waker.wake();
            }
        }
    }

    /// The flusher: sends what waits whenever it gets to run, which in its
    /// low-priority task queue is when the shard has nothing else to do.
    async fn run_flusher(self: Rc<Self>) {
        while !self.stopped.get() {
            let listen = self.work.listen();
            if self.queue.borrow().is_empty() {
                listen.await;
            }
            self.flush();
        }
    }

    /// Sends what waits and every later reply at once; ends the flusher.
    pub fn stop(&self) {
        self.stopped.set(true);
        self.flush();
        self.work.notify();
    }
}

/// One non-blocking send; the bytes taken (0 if none could be, or on an
/// error, which the connection's own write then reports).
fn send_now(fd: RawFd, bytes: &[u8]) -> usize {
    if bytes.is_empty() {
        return 0;
    }
    // SAFETY: `bytes` is a live slice; `fd` belongs to a connection whose
    // task is waiting on this send (its `Slot` removes the entry before the
    // stream can be dropped), so it is open.
    let sent = unsafe { libc::send(fd, bytes.as_ptr().cast(), bytes.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    usize::try_from(sent).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{AsyncReadExt, FutureExt};
    use glommio::net::TcpListener;
    use glommio::{LocalExecutorBuilder, Placement};

    fn on_executor<T: Send + 'static>(
        test: impl FnOnce() -> futures::future::LocalBoxFuture<'static, T> + Send + 'static,
    ) -> T {
        LocalExecutorBuilder::new(Placement::Unbound)
            .spawn(move || async move { test().await })
            .expect("an executor starts")
            .join()
            .expect("the test's executor ends")
    }

    /// `count` connected pairs over loopback: (server side, client side).
    async fn pairs(count: usize) -> Vec<(TcpStream, TcpStream)> {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let address = listener.local_addr().expect("bound");
        let mut pairs = Vec::new();
        for _ in 0..count {
            let client = TcpStream::connect(address).await.expect("connect");
            let server = listener.accept().await.expect("accept");
            pairs.push((server, client));
        }
        pairs
    }

    async fn read_exactly(stream: &mut TcpStream, len: usize) -> Vec<u8> {
        let mut bytes = vec![0; len];
        stream.read_exact(&mut bytes).await.expect("the reply arrives");
        bytes
    }

    #[test]
    fn a_full_burst_leaves_at_once_and_the_rest_when_the_shard_is_idle() {
        let (stats, received) = on_executor(|| {
            async {
                // Three replies ready in one round, bursts of two: the
                // second reply sends the first two, the third leaves alone.
                let outbox = Outbox::new(2);
                let mut tasks = Vec::new();
                let mut clients = Vec::new();
                for (i, (mut server, client)) in pairs(3).await.into_iter().enumerate() {
                    clients.push(client);
                    let outbox = outbox.clone();
                    tasks.push(glommio::spawn_local(async move {
                        let mut reply = format!("reply {i}").into_bytes();
                        outbox.write_all(&mut server, &mut reply).await.expect("sent");
                        assert!(reply.is_empty(), "the buffer comes back empty");
                        server
                    }));
                }
                let servers = futures::future::join_all(tasks).await;
                let stats = outbox.stats();
                let mut received = Vec::new();
                for client in &mut clients {
                    received.push(String::from_utf8(read_exactly(client, 7).await).unwrap());
                }
                outbox.stop();
                drop(servers);
                (stats, received)
            }
            .boxed_local()
        });
        assert_eq!(stats, OutboxStats { replies: 3, bursts: 2 });
        assert_eq!(received, ["reply 0", "reply 1", "reply 2"]);
    }

    #[test]
    fn a_lone_reply_leaves_when_the_shard_has_nothing_else_to_run() {
        let (stats, received) = on_executor(|| {
            async {
                let outbox = Outbox::new(8);
                let (mut server, mut client) = pairs(1).await.pop().unwrap();
                outbox.write_all(&mut server, &mut b"alone".to_vec()).await.expect("sent");
                let received = read_exactly(&mut client, 5).await;
                outbox.stop();
                (outbox.stats(), received)
            }
            .boxed_local()
        });
        assert_eq!(stats, OutboxStats { replies: 1, bursts: 1 });
        assert_eq!(received, b"alone");
    }

    #[test]
    fn a_reply_larger_than_the_socket_buffer_arrives_whole() {
        const REPLY_BYTES: usize = 32 << 20;
        let (sent, received) = on_executor(|| {
            async {
                let outbox = Outbox::new(2);
                let mut tasks = Vec::new();
                let mut readers = Vec::new();
                for (i, (mut server, mut client)) in pairs(2).await.into_iter().enumerate() {
                    let outbox = outbox.clone();
                    let reply: Vec<u8> = (0..REPLY_BYTES).map(|b| (b * 7 + i) as u8).collect();
                    let expected = reply.clone();
                    tasks.push(glommio::spawn_local(async move {
                        let mut reply = reply;
                        outbox.write_all(&mut server, &mut reply).await.expect("sent");
                    }));
                    readers.push(glommio::spawn_local(async move {
                        read_exactly(&mut client, REPLY_BYTES).await == expected
                    }));
                }
                futures::future::join_all(tasks).await;
                let received = futures::future::join_all(readers).await;
                outbox.stop();
                (outbox.stats().replies, received)
            }
            .boxed_local()
        });
        assert_eq!(sent, 2);
        assert_eq!(received, [true, true], "each reply arrives whole and in order");
    }

    #[test]
    fn a_connection_that_goes_away_leaves_nothing_behind() {
        let (waiting, queued) = on_executor(|| {
            async {
                let outbox = Outbox::new(8);
                let (mut server, _client) = pairs(1).await.pop().unwrap();
                let mut reply = b"never sent".to_vec();
                {
                    let mut send = std::pin::pin!(outbox.write_all(&mut server, &mut reply));
                    assert!(futures::poll!(send.as_mut()).is_pending(), "the reply waits for a burst");
                }
                let left = (outbox.waiting.borrow().len(), outbox.queue.borrow().len());
                outbox.stop();
                left
            }
            .boxed_local()
        });
        assert_eq!((waiting, queued), (0, 0), "a dropped send is forgotten, so its descriptor is never written");
    }
}
