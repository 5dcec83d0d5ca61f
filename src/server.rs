//! Network front ends of a shard: accept loops (with a connection cap) and
//! the native protocol's connection handler.
//!
//! A connection is served in turns: read what has arrived, parse every
//! complete frame, route each operation to its owning shard (`Dispatch`:
//! one batch per shard), then write the replies, reads' as soon as they are
//! done and writes' once durable (two lanes; replies are matched by request
//! id). A turn's write lane stays in flight while later turns are read and
//! served (at most `WRITE_TURNS_IN_FLIGHT_MAX` per connection). Malformed
//! frames, wrong magic or version, an oversize frame, key or value, or an
//! unknown opcode get an error reply and the connection is closed; the
//! shard keeps serving everyone else. A connection that stops mid-frame for
//! `read_timeout_ms` is closed; idle connections between frames are kept.

use std::future::poll_fn;
use std::rc::Rc;
use std::task::Poll;
use std::time::Duration;

use futures::{AsyncReadExt, AsyncWriteExt, FutureExt};
use glommio::net::{TcpListener, TcpStream};

use crate::protocol::frame::{self, FrameError, Opcode, Status, HEADER_BYTES};
use crate::protocol::messages::{batch, decode_request, Request};
use crate::shard::{client_opcode_allowed, Dispatch, Route, Shard};

/// Which protocol a listener speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Native,
    Redis,
}

/// Counts a connection for as long as it lives.
pub struct ConnectionGuard(Rc<Shard>);

impl ConnectionGuard {
    pub fn new(shard: &Rc<Shard>) -> Self {
        shard.connections.set(shard.connections.get() + 1);
        Self(shard.clone())
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections.set(self.0.connections.get() - 1);
        self.0.connection_closed.notify();
    }
}

/// Accepts connections until the shard stops.
pub async fn accept_loop(shard: Rc<Shard>, listener: TcpListener, protocol: Protocol) {
    loop {
        let stop = shard.stop.listen();
        if shard.stopping.get() {
            return;
        }
        let mut accept = Box::pin(listener.accept());
        let mut stop = stop;
        let accepted = poll_fn(|cx| {
            if stop.poll_unpin(cx).is_ready() {
                return Poll::Ready(None);
            }
            accept.poll_unpin(cx).map(Some)
        })
        .await;
        let stream = match accepted {
            None => return,
            Some(Ok(stream)) => stream,
            Some(Err(e)) => {
                // EMFILE and friends: back off briefly rather than spin.
                tracing::warn!(shard = shard.index, error = %e, "accept failed");
                crate::runtime::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if shard.connections.get() >= shard.config.node.connections_max_per_shard {
            shard.stats.borrow_mut().connections_refused += 1;
            crate::runtime::spawn_detached(refuse(stream, protocol));
            continue;
        }
        let guard = ConnectionGuard::new(&shard);
        let shard = shard.clone();
        crate::runtime::spawn_detached(async move {
            let _guard = guard;
            let _ = stream.set_nodelay(true);
            match protocol {
                Protocol::Native => serve_native(shard, stream).await,
                Protocol::Redis => crate::redis::serve_redis(shard, stream).await,
            }
        });
    }
}

/// Hands an idle Redis connection (nothing read ahead, nothing in flight)
/// to shard `target`, which serves it from then on; `false` if it cannot
/// take it now (its queue is full or it is gone), and the connection stays.
pub fn hand_over_redis_connection(shard: &Shard, stream: &TcpStream, target: u32) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is the open socket `stream` owns; the borrow
    // ends before this function returns, while `stream` is alive.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(stream.as_raw_fd()) };
    // A second descriptor for the same socket: `stream` closes its own
    // when the caller drops it, and the target owns this one.
    let Ok(fd) = borrowed.try_clone_to_owned() else { return false };
    if shard.peers[target as usize].try_send(crate::shard::PeerMessage::RedisConnection(fd)).is_err() {
        return false;
    }
    shard.stats.borrow_mut().connections_handed_over += 1;
    true
}

/// Serves a Redis connection another shard handed over.
pub fn adopt_redis_connection(shard: &Rc<Shard>, fd: std::os::fd::OwnedFd) {
    use std::os::fd::{FromRawFd, IntoRawFd};
    shard.stats.borrow_mut().connections_taken_over += 1;
    let guard = ConnectionGuard::new(shard);
    let shard = shard.clone();
    // SAFETY: `fd` is an open, connected TCP socket that nothing else owns.
    let stream = unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) };
    crate::runtime::spawn_detached(async move {
        let _guard = guard;
        crate::redis::serve_redis(shard, stream).await;
    });
}

/// Tells one connection too many why it is closed.
async fn refuse(mut stream: TcpStream, protocol: Protocol) {
    let mut out = Vec::new();
    let message = "too many connections to this shard";
    match protocol {
        Protocol::Native => {
            frame::encode_response_with(&mut out, 0, Status::Overloaded, 0, |o| o.extend_from_slice(message.as_bytes()))
        }
        Protocol::Redis => {
            crate::protocol::resp::error(&mut out, &format!("ERR max number of clients reached ({message})"))
        }
    }
    let _ = stream.write_all(&out).await;
    let _ = stream.close().await;
}

/// A receive buffer: bytes `start..end` of `buf` are unparsed input.
pub struct ReadBuffer {
    pub buf: Vec<u8>,
    pub start: usize,
    pub end: usize,
}

pub enum ReadOutcome {
    Data,
    Closed,
    TimedOut,
    Stopped,
    Failed,
}

impl ReadBuffer {
    pub fn new() -> Self {
        Self { buf: vec![0; 64 << 10], start: 0, end: 0 }
    }

    pub fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Makes room for at least `want` more bytes of one message (bounded by
    /// the caller's limits), moving unparsed bytes to the front.
    fn make_room(&mut self, want: usize) {
        if self.start > 0 && (self.buf.len() - self.end < want.min(4096) || self.end == self.buf.len()) {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let needed = self.end + want.max(1);
        if needed > self.buf.len() {
            self.buf.resize(needed.next_power_of_two(), 0);
        }
    }

    /// Reads whatever arrives (at least one byte), or says why not.
    /// `needed`: bytes the current partial message still needs, if known.
    pub async fn fill(&mut self, stream: &mut TcpStream, shard: &Shard, needed: usize) -> ReadOutcome {
        let partial = self.end > self.start;
        let timeout = partial.then(|| Duration::from_millis(shard.config.node.read_timeout_ms));
        let _ = stream.set_read_timeout(timeout);
        self.make_room(needed.max(4096));
        let stop = shard.stop.listen();
        if shard.stopping.get() {
            return ReadOutcome::Stopped;
        }
        let end = self.end;
        let mut stop = stop;
        let mut read = Box::pin(stream.read(&mut self.buf[end..]));
        let result = poll_fn(|cx| {
            if stop.poll_unpin(cx).is_ready() {
                return Poll::Ready(None);
            }
            read.poll_unpin(cx).map(Some)
        })
        .await;
        drop(read);
        match result {
            None => ReadOutcome::Stopped,
            Some(Ok(0)) => ReadOutcome::Closed,
            Some(Ok(n)) => {
                self.end += n;
                ReadOutcome::Data
            }
            Some(Err(e)) if e.kind() == std::io::ErrorKind::TimedOut => ReadOutcome::TimedOut,
            Some(Err(_)) => ReadOutcome::Failed,
        }
    }
}

impl Default for ReadBuffer {
    fn default() -> Self {
        Self::new()
    }
}

/// What each frame of a turn expects back.
#[derive(Clone, Copy)]
enum Pending {
    /// One operation: its index in its lane's dispatch.
    Single { request_id: u64, opcode: u8, lane: usize, op: usize },
    /// A BATCH frame: `count` operations from `first` in one lane.
    Batch { request_id: u64, lane: usize, first: usize, count: usize },
}

impl Pending {
    fn lane(&self) -> usize {
        match self {
            Pending::Single { lane, .. } | Pending::Batch { lane, .. } => *lane,
        }
    }
}

/// A turn's operations run in two lanes: reads (and everything that does
/// not write) and writes. In `group` mode a write waits for its batch's
/// fdatasync; a read pipelined behind it on the same connection must not,
/// so the read lane's replies are sent as soon as it is done (replies are
/// matched by request id, so their order on the wire is free).
const READ_LANE: usize = 0;
const WRITE_LANE: usize = 1;

fn is_write(opcode: u8) -> bool {
    [Opcode::Put, Opcode::Delete, Opcode::Overwrite, Opcode::DeleteAll].iter().any(|o| *o as u8 == opcode)
}

/// One lane of a turn: its dispatch and the client opcode of each operation.
#[derive(Default)]
struct Lane {
    dispatch: Dispatch,
    opcodes: Vec<u8>,
}

impl Lane {
    fn clear(&mut self) {
        self.dispatch.clear();
        self.opcodes.clear();
    }
}

/// Why a turn ends the connection, with the reply to send first.
struct Fatal {
    request_id: u64,
    opcode: u8,
    status: Status,
    message: String,
}

fn route(shard: &Shard, request: &Request<'_>) -> Route {
    match request {
        Request::Get { key }
        | Request::Put { key, .. }
        | Request::Delete { key, .. }
        | Request::Overwrite { key, .. }
        | Request::DeleteAll { key } => shard.route(key),
        _ => shard.here(),
    }
}

/// Classifies one frame into the turn, or says why the connection ends.
fn admit(
    shard: &Shard,
    header: &frame::Header,
    body: &[u8],
    lanes: &mut [Lane; 2],
    pending: &mut Vec<Pending>,
) -> Result<(), Fatal> {
    let fatal =
        |status, message: String| Fatal { request_id: header.request_id, opcode: header.opcode, status, message };
    if header.is_response() {
        return Err(fatal(Status::BadRequest, "a response frame where a request was expected".into()));
    }
    if !client_opcode_allowed(header.opcode) {
        return Err(fatal(Status::UnknownOpcode, format!("unknown opcode {}", header.opcode)));
    }
    let request = decode_request(header.opcode, body).map_err(|e| fatal(e.status(), e.message()))?;
    if let Request::Batch(entries) = request {
        // Validate every entry first: the batch's lane depends on all of them.
        let mut writes = false;
        for entry in batch::requests(entries) {
            let (opcode, sub_body) = entry.map_err(|e| fatal(e.status(), e.message()))?;
            if !client_opcode_allowed(opcode) || opcode == Opcode::Batch as u8 {
                return Err(fatal(Status::UnknownOpcode, format!("opcode {opcode} is not allowed in a batch")));
            }
            decode_request(opcode, sub_body).map_err(|e| fatal(e.status(), e.message()))?;
            writes |= is_write(opcode);
        }
        let lane_index = if writes { WRITE_LANE } else { READ_LANE };
        let lane = &mut lanes[lane_index];
        let first = lane.dispatch.len();
        for (opcode, sub_body) in batch::requests(entries).map_while(Result::ok) {
            let sub = decode_request(opcode, sub_body).map_err(|e| fatal(e.status(), e.message()))?;
            lane.dispatch.push(route(shard, &sub), opcode, |o| o.extend_from_slice(sub_body));
            lane.opcodes.push(opcode);
        }
        let count = lane.dispatch.len() - first;
        pending.push(Pending::Batch { request_id: header.request_id, lane: lane_index, first, count });
    } else {
        let lane_index = if is_write(header.opcode) { WRITE_LANE } else { READ_LANE };
        let lane = &mut lanes[lane_index];
        let op = lane.dispatch.len();
        lane.dispatch.push(route(shard, &request), header.opcode, |o| o.extend_from_slice(body));
        lane.opcodes.push(header.opcode);
        pending.push(Pending::Single { request_id: header.request_id, opcode: header.opcode, lane: lane_index, op });
    }
    Ok(())
}

/// Statuses after which the stream is not trusted (the "bad input").
fn ends_connection(status: Status) -> bool {
    status.closes_connection() || matches!(status, Status::KeyTooLarge | Status::ValueTooLarge)
}

/// Encodes the replies of `pending`, whose operations ran in `lane`; true
/// if one of them ends the connection.
fn encode_replies(out: &mut Vec<u8>, pending: &[Pending], lane: &Lane) -> bool {
    let mut close = false;
    for p in pending {
        match *p {
            Pending::Single { request_id, opcode, op, .. } => {
                let (status, body) = lane.dispatch.reply(op);
                close |= ends_connection(status);
                frame::encode_response_with(out, opcode, status, request_id, |o| o.extend_from_slice(body));
            }
            Pending::Batch { request_id, first, count, .. } => {
                frame::encode_response_with(out, Opcode::Batch as u8, Status::Ok, request_id, |o| {
                    for (op, &opcode) in lane.opcodes.iter().enumerate().skip(first).take(count) {
                        let (status, body) = lane.dispatch.reply(op);
                        batch::push_response_with(o, opcode, status as u8, |b| b.extend_from_slice(body));
                    }
                });
            }
        }
    }
    close
}

/// Runs a lane, handing it back when done (owned, so that the read lane's
/// replies can be encoded while the write lane is still running).
async fn run_lane(shard: &Shard, mut lane: Lane) -> Lane {
    if !lane.dispatch.is_empty() {
        lane.dispatch.run(shard).await;
    }
    lane
}

/// Most turns' write lanes one connection keeps in flight (each waits for
/// an fdatasync in `group` mode); beyond it the connection stops reading.
const WRITE_TURNS_IN_FLIGHT_MAX: usize = 8;

/// A turn's write lane, with the frames it answers.
#[derive(Default)]
struct WriteTurn {
    lane: Lane,
    pending: Vec<Pending>,
}

impl WriteTurn {
    /// Encodes the replies once the lane has run; true if one ends the
    /// connection. Then keeps the buffers for a later turn.
    fn encode_and_recycle(mut self, out: &mut Vec<u8>, spare: &mut Vec<WriteTurn>) -> bool {
        let close = encode_replies(out, &self.pending, &self.lane);
        self.lane.clear();
        self.pending.clear();
        spare.push(self);
        close
    }
}

type WriteTurnFuture<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = WriteTurn> + 'a>>;

pub async fn serve_native(shard: Rc<Shard>, mut stream: TcpStream) {
    use futures::stream::{FuturesUnordered, StreamExt};
    let limit = shard.config.request_body_bytes_max();
    let mut input = ReadBuffer::new();
    let mut out = Vec::with_capacity(64 << 10);
    let mut lanes: [Lane; 2] = Default::default();
    let mut pending = Vec::new();
    // Write lanes of earlier turns still waiting to be durable: reads that
    // arrive meanwhile are served without waiting for those fdatasyncs.
    let mut in_flight: FuturesUnordered<WriteTurnFuture<'_>> = FuturesUnordered::new();
    // Buffers of finished write turns, reused.
    let mut spare: Vec<WriteTurn> = Vec::new();
    loop {
        // Parse every complete frame already received.
        let mut fatal = None;
        let mut needed = HEADER_BYTES;
        loop {
            match frame::decode(input.data(), limit) {
                Ok(Some((header, body, used))) => {
                    if let Err(f) = admit(&shard, &header, body, &mut lanes, &mut pending) {
                        fatal = Some(f);
                        break;
                    }
                    input.consume(used);
                }
                Ok(None) => {
                    let data = input.data();
                    if data.len() >= HEADER_BYTES {
                        let body = u32::from_le_bytes(data[16..20].try_into().expect("4")) as usize;
                        needed = HEADER_BYTES + body - data.len();
                    }
                    break;
                }
                Err(e) => {
                    fatal = Some(frame_fatal(&e));
                    break;
                }
            }
        }
        let mut close = fatal.is_some();
        // The write lane goes in flight with its frames; the turn's own
        // lanes are refilled from the spares (a default lane allocates
        // nothing until used).
        if !lanes[WRITE_LANE].dispatch.is_empty() {
            let mut turn = spare.pop().unwrap_or_default();
            std::mem::swap(&mut lanes[WRITE_LANE], &mut turn.lane);
            turn.pending.extend(pending.iter().filter(|p| p.lane() == WRITE_LANE).copied());
            pending.retain(|p| p.lane() != WRITE_LANE);
            let shard = &*shard;
            in_flight.push(Box::pin(async move {
                turn.lane = run_lane(shard, turn.lane).await;
                turn
            }));
        }
        let mut finished = Vec::new();
        // The reads run while the write turns progress.
        let reads = std::mem::take(&mut lanes[READ_LANE]);
        {
            let mut read_run = std::pin::pin!(run_lane(&shard, reads));
            lanes[READ_LANE] = loop {
                if in_flight.is_empty() {
                    break read_run.await;
                }
                match futures::future::select(read_run.as_mut(), in_flight.next()).await {
                    futures::future::Either::Left((reads, _)) => break reads,
                    futures::future::Either::Right((Some(turn), _)) => finished.push(turn),
                    futures::future::Either::Right((None, _)) => {}
                }
            };
        }
        // Write turns that are done by now go out in the same send (in
        // `none` mode, usually this turn's own).
        while let Some(Some(turn)) = in_flight.next().now_or_never() {
            finished.push(turn);
        }
        close |= encode_replies(&mut out, &pending, &lanes[READ_LANE]);
        pending.clear();
        for lane in &mut lanes {
            lane.clear();
        }
        if close {
            // Every reply owed is sent before the connection ends.
            while let Some(turn) = in_flight.next().await {
                finished.push(turn);
            }
        }
        for turn in finished {
            close |= turn.encode_and_recycle(&mut out, &mut spare);
        }
        if let Some(f) = fatal {
            frame::encode_response_with(&mut out, f.opcode, f.status, f.request_id, |o| {
                o.extend_from_slice(f.message.as_bytes())
            });
        }
        if !out.is_empty() && shard.outbox.write_all(&mut stream, &mut out).await.is_err() {
            return;
        }
        if close {
            let _ = stream.close().await;
            return;
        }
        // Wait for more input, sending write replies as their turns finish.
        let outcome = loop {
            if in_flight.len() >= WRITE_TURNS_IN_FLIGHT_MAX {
                // Bounded: stop reading until the oldest writes are durable.
                let turn = in_flight.next().await.expect("not empty");
                if !send_write_turn(&shard, &mut stream, &mut out, turn, &mut spare).await {
                    return;
                }
                continue;
            }
            if in_flight.is_empty() {
                break input.fill(&mut stream, &shard, needed).await;
            }
            let finished = {
                // Dropping an unfinished read is safe: glommio keeps the
                // receive in the stream, and the next read resumes it.
                let fill = std::pin::pin!(input.fill(&mut stream, &shard, needed));
                match futures::future::select(fill, in_flight.next()).await {
                    futures::future::Either::Left((outcome, _)) => break outcome,
                    futures::future::Either::Right((turn, _)) => turn.expect("not empty"),
                }
            };
            if !send_write_turn(&shard, &mut stream, &mut out, finished, &mut spare).await {
                return;
            }
        };
        match outcome {
            ReadOutcome::Data => {}
            ReadOutcome::TimedOut => {
                tracing::debug!(shard = shard.index, "connection stalled mid-frame; closed");
                return;
            }
            ReadOutcome::Closed | ReadOutcome::Stopped => {
                // The client is done sending (or the node is stopping):
                // answer what is still in flight, then end.
                while let Some(turn) = in_flight.next().await {
                    if !send_write_turn(&shard, &mut stream, &mut out, turn, &mut spare).await {
                        return;
                    }
                }
                return;
            }
            ReadOutcome::Failed => return,
        }
    }
}

/// Sends a finished write turn's replies; false if the connection is done
/// (the send failed, or a reply ends the connection).
async fn send_write_turn(
    shard: &Shard,
    stream: &mut TcpStream,
    out: &mut Vec<u8>,
    turn: WriteTurn,
    spare: &mut Vec<WriteTurn>,
) -> bool {
    let close = turn.encode_and_recycle(out, spare);
    let sent = shard.outbox.write_all(stream, out).await.is_ok();
    if close {
        let _ = stream.close().await;
    }
    sent && !close
}

fn frame_fatal(e: &FrameError) -> Fatal {
    Fatal { request_id: 0, opcode: 0, status: e.status(), message: e.to_string() }
}
