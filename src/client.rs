//! `ringkv::client`: an async client usable from any executor (tokio, a
//! plain `futures::executor::block_on`, glommio) because its I/O does not
//! depend on one: each connection is a std socket with one reader thread
//! that completes `futures` oneshot channels.
//!
//! - Shard-aware: the key's partition (SHA-1, like the node) names the
//!   owning shard, and the request goes to that shard's own port, so the
//!   node never needs a cross-core hop for it.
//! - Pipelining: any number of requests in flight per connection, replies
//!   matched by request id; connections are reused. Requests in flight
//!   together are concurrent: the node may apply them in any order, so a
//!   read that must see a write is sent after the write's reply.
//! - Per-request timeouts: a request without a reply in time fails with
//!   `UnknownOutcome`: the write may or may not have happened. It is never
//!   reported as failed.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::channel::oneshot;

use crate::logic::dvv::{encoding, Context, VersionSet};
use crate::logic::ring::{partition_of, shard_of};
use crate::protocol::frame::{self, Opcode, Status, HEADER_BYTES};
use crate::protocol::messages::{encode_request, opcode_of, NodeStatus, Request};

/// What a client call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to {address}: {source}")]
    Connect { address: SocketAddr, source: std::io::Error },
    #[error("connection lost: {0}")]
    Io(String),
    /// No reply within the timeout: the request may or may not have taken
    /// effect. Retry a write only with the causal context you used.
    #[error("no reply within {after:?}: the outcome is unknown")]
    UnknownOutcome { after: Duration },
    #[error("server refused the request ({status:?}): {message}")]
    Server { status: Status, message: String },
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl ClientError {
    pub fn status(&self) -> Option<Status> {
        match self {
            Self::Server { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A key's live values (siblings) and the causal context to write back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versions {
    pub siblings: Vec<Vec<u8>>,
    /// Opaque: pass it to `put` or `delete` to supersede what was read.
    pub context: Vec<u8>,
}

#[derive(Clone, Debug)]
pub struct ClientOptions {
    pub timeout: Duration,
    /// Route each key to its owning shard's port (else use the shared port).
    pub shard_aware: bool,
    pub response_bytes_max: u32,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self { timeout: Duration::from_secs(10), shard_aware: true, response_bytes_max: 64 << 20 }
    }
}

type Reply = Result<(Status, Vec<u8>), ClientError>;

struct Waiter {
    deadline: Instant,
    reply: oneshot::Sender<Reply>,
}

/// One socket: writers share it under a lock; a reader thread completes
/// waiters by request id and expires overdue ones.
struct Connection {
    writer: Mutex<TcpStream>,
    pending: Arc<Mutex<HashMap<u64, Waiter>>>,
    alive: Arc<AtomicBool>,
}

impl Connection {
    fn open(address: SocketAddr, options: &ClientOptions) -> Result<Arc<Self>, ClientError> {
        let stream = TcpStream::connect_timeout(&address, options.timeout)
            .map_err(|source| ClientError::Connect { address, source })?;
        let _ = stream.set_nodelay(true);
        let reader = stream.try_clone().map_err(|source| ClientError::Connect { address, source })?;
        let pending: Arc<Mutex<HashMap<u64, Waiter>>> = Arc::default();
        let alive = Arc::new(AtomicBool::new(true));
        let connection = Arc::new(Self { writer: Mutex::new(stream), pending: pending.clone(), alive: alive.clone() });
        let limit = options.response_bytes_max;
        let timeout = options.timeout;
        std::thread::Builder::new()
            .name("ringkv-client".into())
            .spawn(move || read_loop(reader, pending, alive, limit, timeout))
            .map_err(|source| ClientError::Connect { address, source })?;
        Ok(connection)
    }

    fn send(
        &self,
        id: u64,
        opcode: u8,
        body: &[u8],
        timeout: Duration,
    ) -> Result<oneshot::Receiver<Reply>, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("pending").insert(id, Waiter { deadline: Instant::now() + timeout, reply: tx });
        let mut frame = Vec::with_capacity(HEADER_BYTES + body.len());
        frame::encode(&mut frame, opcode, 0, 0, id, body);
        let written = self.writer.lock().expect("writer").write_all(&frame);
        if let Err(e) = written {
            self.pending.lock().expect("pending").remove(&id);
            self.alive.store(false, Ordering::Relaxed);
            return Err(ClientError::Io(e.to_string()));
        }
        Ok(rx)
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if let Ok(w) = self.writer.lock() {
            let _ = w.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn read_loop(
    mut stream: TcpStream,
    pending: Arc<Mutex<HashMap<u64, Waiter>>>,
    alive: Arc<AtomicBool>,
    limit: u32,
    timeout: Duration,
) {
    // Wake up regularly to expire overdue requests even when nothing arrives.
    let _ = stream.set_read_timeout(Some(Duration::from_millis(20).min(timeout)));
    let mut buf = vec![0u8; 64 << 10];
    let (mut start, mut end) = (0usize, 0usize);
    let failure = loop {
        // Deliver every complete frame.
        loop {
            match frame::decode(&buf[start..end], limit) {
                Ok(Some((header, body, used))) => {
                    let waiter = pending.lock().expect("pending").remove(&header.request_id);
                    if let Some(w) = waiter {
                        let status = Status::from_u8(header.status).unwrap_or(Status::Internal);
                        let _ = w.reply.send(Ok((status, body.to_vec())));
                    } else if header.request_id == 0 && header.status != 0 {
                        // A connection-level error (refused, malformed).
                        break;
                    }
                    start += used;
                }
                Ok(None) => break,
                Err(e) => {
                    alive.store(false, Ordering::Relaxed);
                    fail_all(&pending, || ClientError::Protocol(e.to_string()));
                    return;
                }
            }
        }
        if start == end {
            start = 0;
            end = 0;
        } else if end == buf.len() {
            buf.copy_within(start..end, 0);
            end -= start;
            start = 0;
            if end == buf.len() {
                let want = frame::decode_header(&buf[..HEADER_BYTES], limit)
                    .map_or(buf.len() * 2, |h| HEADER_BYTES + h.body_len as usize);
                buf.resize(want.max(buf.len() + 1), 0);
            }
        }
        expire(&pending);
        match stream.read(&mut buf[end..]) {
            Ok(0) => break "connection closed by the node".to_string(),
            Ok(n) => end += n,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => break e.to_string(),
        }
        if !alive.load(Ordering::Relaxed) {
            break "connection closed".to_string();
        }
    };
    alive.store(false, Ordering::Relaxed);
    fail_all(&pending, || ClientError::Io(failure.clone()));
}

fn expire(pending: &Mutex<HashMap<u64, Waiter>>) {
    let now = Instant::now();
    let mut map = pending.lock().expect("pending");
    let overdue: Vec<u64> = map.iter().filter(|(_, w)| w.deadline <= now).map(|(id, _)| *id).collect();
    for id in overdue {
        if let Some(w) = map.remove(&id) {
            let after = now.saturating_duration_since(w.deadline - Duration::ZERO);
            let _ = w.reply.send(Err(ClientError::UnknownOutcome { after }));
        }
    }
}

fn fail_all(pending: &Mutex<HashMap<u64, Waiter>>, error: impl Fn() -> ClientError) {
    for (_, w) in pending.lock().expect("pending").drain() {
        let _ = w.reply.send(Err(error()));
    }
}

/// A client of one node.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    address: SocketAddr,
    options: ClientOptions,
    status: NodeStatus,
    next_id: AtomicU64,
    /// Index 0: the shared port; 1 + s: shard s's port.
    connections: Vec<Mutex<Option<Arc<Connection>>>>,
}

impl Client {
    /// Connects to a node (its shared client port) and learns its layout.
    pub fn connect(address: impl ToSocketAddrs, options: ClientOptions) -> Result<Self, ClientError> {
        let address = address
            .to_socket_addrs()
            .map_err(|e| ClientError::Io(e.to_string()))?
            .next()
            .ok_or_else(|| ClientError::Io("no address".into()))?;
        let first = Connection::open(address, &options)?;
        let rx = first.send(1, Opcode::Status as u8, &[], options.timeout)?;
        let (status, body) =
            futures::executor::block_on(rx).map_err(|_| ClientError::Io("connection lost".into()))??;
        if status != Status::Ok {
            return Err(ClientError::Server { status, message: String::from_utf8_lossy(&body).into_owned() });
        }
        let node = NodeStatus::decode(&body).ok_or_else(|| ClientError::Protocol("malformed status".into()))?;
        let mut connections: Vec<Mutex<Option<Arc<Connection>>>> =
            (0..=node.shard_count).map(|_| Mutex::new(None)).collect();
        connections[0] = Mutex::new(Some(first));
        Ok(Self { inner: Arc::new(Inner { address, options, status: node, next_id: AtomicU64::new(2), connections }) })
    }

    /// The node's layout as learned at connect.
    pub fn node(&self) -> &NodeStatus {
        &self.inner.status
    }

    fn connection(&self, slot: usize) -> Result<Arc<Connection>, ClientError> {
        let mut guard = self.inner.connections[slot].lock().expect("connections");
        if let Some(c) = guard.as_ref().filter(|c| c.alive.load(Ordering::Relaxed)) {
            return Ok(c.clone());
        }
        let port = if slot == 0 { self.inner.address.port() } else { self.inner.status.client_port + slot as u16 };
        let address = SocketAddr::new(self.inner.address.ip(), port);
        let connection = Connection::open(address, &self.inner.options)?;
        *guard = Some(connection.clone());
        Ok(connection)
    }

    fn slot_for(&self, key: Option<&[u8]>) -> usize {
        match key {
            Some(key) if self.inner.options.shard_aware => {
                let s = &self.inner.status;
                1 + shard_of(partition_of(key, s.partition_count), s.shard_count) as usize
            }
            _ => 0,
        }
    }

    /// Sends one request and waits for its reply.
    pub async fn call(&self, request: &Request<'_>) -> Result<(Status, Vec<u8>), ClientError> {
        let key = match request {
            Request::Get { key }
            | Request::Put { key, .. }
            | Request::Delete { key, .. }
            | Request::Overwrite { key, .. }
            | Request::DeleteAll { key } => Some(*key),
            _ => None,
        };
        let mut body = Vec::new();
        encode_request(&mut body, request);
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let timeout = self.inner.options.timeout;
        let slot = self.slot_for(key);
        let connection = match self.connection(slot) {
            Ok(c) => c,
            // The shard's port is unreachable: the shared port still works
            // (one cross-core hop inside the node).
            Err(_) if slot != 0 => self.connection(0)?,
            Err(e) => return Err(e),
        };
        let rx = connection.send(id, opcode_of(request) as u8, &body, timeout)?;
        rx.await.map_err(|_| ClientError::Io("connection lost".into()))?
    }

    fn refused(status: Status, body: &[u8]) -> ClientError {
        ClientError::Server { status, message: String::from_utf8_lossy(body).into_owned() }
    }

    /// Every live sibling and the context, or None (with no context needed:
    /// a write without context after a not-found read is a plain write).
    pub async fn get(&self, key: &[u8]) -> Result<Option<Versions>, ClientError> {
        match self.call(&Request::Get { key }).await? {
            (Status::Ok, bytes) => {
                let set: VersionSet = encoding::decode(&bytes).map_err(|e| ClientError::Protocol(e.to_string()))?;
                let siblings = set.values().filter(|s| !s.tombstone).map(|s| s.value.clone()).collect();
                Ok(Some(Versions { siblings, context: set.join().encode() }))
            }
            (Status::NotFound, _) => Ok(None),
            (status, body) => Err(Self::refused(status, &body)),
        }
    }

    /// The causal context of a key even when it reads as not found (after a
    /// delete, writing with it supersedes the tombstone).
    pub async fn context(&self, key: &[u8]) -> Result<Vec<u8>, ClientError> {
        match self.call(&Request::Get { key }).await? {
            (Status::Ok, bytes) => {
                let set = encoding::decode(&bytes).map_err(|e| ClientError::Protocol(e.to_string()))?;
                Ok(set.join().encode())
            }
            (Status::NotFound, context) => Ok(if context.is_empty() { Context::default().encode() } else { context }),
            (status, body) => Err(Self::refused(status, &body)),
        }
    }

    /// Writes `value`. With the context of a read it supersedes exactly what
    /// was read; without one it adds a sibling. Returns the new context.
    pub async fn put(&self, key: &[u8], value: &[u8], context: Option<&[u8]>) -> Result<Vec<u8>, ClientError> {
        match self.call(&Request::Put { key, context: context.unwrap_or(&[]), value }).await? {
            (Status::Ok, context) => Ok(context),
            (status, body) => Err(Self::refused(status, &body)),
        }
    }

    /// Deletes what `context` covers (writes a tombstone).
    pub async fn delete(&self, key: &[u8], context: &[u8]) -> Result<Vec<u8>, ClientError> {
        match self.call(&Request::Delete { key, context }).await? {
            (Status::Ok, context) => Ok(context),
            (status, body) => Err(Self::refused(status, &body)),
        }
    }

    /// Last-writer-wins write: supersedes every version the node holds.
    pub async fn overwrite(&self, key: &[u8], value: &[u8]) -> Result<(), ClientError> {
        match self.call(&Request::Overwrite { key, value }).await? {
            (Status::Ok, _) => Ok(()),
            (status, body) => Err(Self::refused(status, &body)),
        }
    }

    pub async fn ping(&self) -> Result<Duration, ClientError> {
        let start = Instant::now();
        match self.call(&Request::Ping(b"ping")).await? {
            (Status::Ok, _) => Ok(start.elapsed()),
            (status, body) => Err(Self::refused(status, &body)),
        }
    }

    pub async fn status(&self) -> Result<NodeStatus, ClientError> {
        match self.call(&Request::Status).await? {
            (Status::Ok, body) => {
                NodeStatus::decode(&body).ok_or_else(|| ClientError::Protocol("malformed status".into()))
            }
            (status, body) => Err(Self::refused(status, &body)),
        }
    }
}

/// Hex for contexts shown to people (CLI, Redis port).
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn from_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok()).collect()
}
