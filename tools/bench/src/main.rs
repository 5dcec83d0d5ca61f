//! ringkv-bench: the bundled load generator.
//!
//! YCSB workloads A, B, C, D, F and a custom mix; uniform, zipfian
//! (scrambled, as YCSB) and latest key distributions; a load phase; closed
//! loop or open loop at a target rate, with latency measured from each
//! request's *intended* send time so a stalled server cannot hide its
//! queueing (no coordinated omission); one pacer timer per thread releases
//! due requests to whichever connection has room. Talks ringkv's native protocol
//! (shard-aware: each connection serves the keys of one shard, on that
//! shard's port) or, with `--resp`, any Redis-protocol server, so one tool
//! measures both sides of a comparison.
//!
//! Reports per operation: throughput, errors, p50/p90/p99/p99.9/p99.99/max
//! (HdrHistogram), siblings seen on reads; `--json` writes a summary and
//! `--hdr-log` an interval log (one histogram per second per operation).

mod keys;

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use clap::{CommandFactory, Parser, ValueEnum};
use futures::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use glommio::{LocalExecutorBuilder, Placement};
use hdrhistogram::Histogram;
use keys::{key_name, Chooser, Distribution};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use ringkv::logic::dvv::encoding;
use ringkv::logic::ring::{partition_of, shard_of};
use ringkv::protocol::frame::{self, Opcode, Status};
use ringkv::protocol::messages::{encode_request, NodeStatus, Request};
use ringkv::protocol::resp;
use ringkv::storage::sync::Notify;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Workload {
    /// 50% read, 50% update, zipfian.
    A,
    /// 95% read, 5% update, zipfian.
    B,
    /// 100% read, zipfian.
    C,
    /// 95% read, 5% insert, latest.
    D,
    /// 50% read, 50% read-modify-write, zipfian.
    F,
    /// The --read/--update/--insert/--delete/--rmw proportions.
    Custom,
}

#[derive(Parser, Debug, Clone)]
#[command(name = "ringkv-bench", about = "Load generator for ringkv and Redis-protocol servers")]
struct Options {
    /// Server address: a ringkv client port, or a Redis port with --resp.
    #[arg(long, default_value = "127.0.0.1:7700")]
    address: SocketAddr,
    /// Speak RESP2 (any Redis-protocol server) instead of ringkv's protocol.
    #[arg(long)]
    resp: bool,
    #[arg(long, value_enum, default_value = "a")]
    workload: Workload,
    /// Key distribution (default: the workload's own).
    #[arg(long, value_enum)]
    distribution: Option<Distribution>,
    /// With --workload custom: weight of reads (weights are relative:
    /// --read 3 --update 1 is 75% reads)
    #[arg(long, default_value_t = 0.0, value_parser = weight)]
    read: f64,
    /// With --workload custom: weight of updates of existing keys
    #[arg(long, default_value_t = 0.0, value_parser = weight)]
    update: f64,
    /// With --workload custom: weight of inserts of new keys
    #[arg(long, default_value_t = 0.0, value_parser = weight)]
    insert: f64,
    /// With --workload custom: weight of deletes
    #[arg(long, default_value_t = 0.0, value_parser = weight)]
    delete: f64,
    /// With --workload custom: weight of read-modify-writes (a read, then a
    /// write with its context)
    #[arg(long, default_value_t = 0.0, value_parser = weight)]
    rmw: f64,
    /// Keys in the data set.
    #[arg(long, default_value_t = 100_000)]
    records: u64,
    #[arg(long, default_value_t = 100)]
    value_bytes: usize,
    /// Insert every record before the run.
    #[arg(long)]
    load: bool,
    /// Only load, no run.
    #[arg(long)]
    load_only: bool,
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 1)]
    pipeline: usize,
    /// Executor threads running the connections.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// Stop after this many operations instead of after the duration.
    #[arg(long)]
    operations: Option<u64>,
    /// Open loop: this many operations per second in total (0 = closed loop).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Write a JSON summary here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write an HdrHistogram interval log here.
    #[arg(long)]
    hdr_log: Option<PathBuf>,
    /// Ignore shard ports; send everything to --address.
    #[arg(long)]
    no_shard_aware: bool,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Pin executor threads to CPUs starting here (default: unpinned).
    #[arg(long)]
    pin_from: Option<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Op {
    Read,
    Update,
    Insert,
    Delete,
    Rmw,
}

const OPS: [Op; 5] = [Op::Read, Op::Update, Op::Insert, Op::Delete, Op::Rmw];

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Update => "update",
            Op::Insert => "insert",
            Op::Delete => "delete",
            Op::Rmw => "read-modify-write",
        }
    }
}

#[derive(Clone, Debug)]
struct Mix {
    weights: Vec<(Op, f64)>,
    distribution: Distribution,
}

/// A --read/--update/... weight: finite and not negative.
fn weight(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(w) if w.is_finite() && w >= 0.0 => Ok(w),
        Ok(_) => Err("a weight is a number >= 0".into()),
        Err(e) => Err(e.to_string()),
    }
}

impl Mix {
    fn of(o: &Options) -> Result<Self, String> {
        let custom_weights = [o.read, o.update, o.insert, o.delete, o.rmw];
        if o.workload != Workload::Custom && custom_weights.iter().any(|w| *w > 0.0) {
            return Err("--read/--update/--insert/--delete/--rmw apply to --workload custom only".into());
        }
        use Distribution::*;
        let (weights, distribution) = match o.workload {
            Workload::A => (vec![(Op::Read, 0.5), (Op::Update, 0.5)], Zipfian),
            Workload::B => (vec![(Op::Read, 0.95), (Op::Update, 0.05)], Zipfian),
            Workload::C => (vec![(Op::Read, 1.0)], Zipfian),
            Workload::D => (vec![(Op::Read, 0.95), (Op::Insert, 0.05)], Latest),
            Workload::F => (vec![(Op::Read, 0.5), (Op::Rmw, 0.5)], Zipfian),
            Workload::Custom => (
                vec![
                    (Op::Read, o.read),
                    (Op::Update, o.update),
                    (Op::Insert, o.insert),
                    (Op::Delete, o.delete),
                    (Op::Rmw, o.rmw),
                ],
                Uniform,
            ),
        };
        let total: f64 = weights.iter().map(|(_, w)| w).sum();
        if total <= 0.0 {
            return Err(
                "--workload custom needs a weight above 0 for at least one of --read --update --insert --delete --rmw"
                    .into(),
            );
        }
        Ok(Self {
            weights: weights.into_iter().map(|(op, w)| (op, w / total)).collect(),
            distribution: o.distribution.unwrap_or(distribution),
        })
    }

    fn pick(&self, rng: &mut ChaCha8Rng) -> Op {
        let mut x: f64 = rng.gen();
        for (op, w) in &self.weights {
            if x < *w {
                return *op;
            }
            x -= w;
        }
        self.weights.last().expect("weights").0
    }
}

/// Histograms per operation, latencies in microseconds.
#[derive(Clone)]
struct Recorder {
    latency: HashMap<Op, Histogram<u64>>,
    errors: HashMap<Op, u64>,
    siblings_seen: u64,
    reads_with_siblings: u64,
}

impl Recorder {
    fn new() -> Self {
        let latency =
            OPS.iter().map(|op| (*op, Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds"))).collect();
        Self { latency, errors: HashMap::new(), siblings_seen: 0, reads_with_siblings: 0 }
    }

    fn record(&mut self, op: Op, micros: u64) {
        let _ = self.latency.get_mut(&op).expect("op").record(micros.clamp(1, 60_000_000));
    }

    fn merge(&mut self, other: &Recorder) {
        for (op, h) in &other.latency {
            self.latency.get_mut(op).expect("op").add(h).expect("compatible histograms");
        }
        for (op, n) in &other.errors {
            *self.errors.entry(*op).or_default() += n;
        }
        self.siblings_seen += other.siblings_seen;
        self.reads_with_siblings += other.reads_with_siblings;
    }

    fn total(&self) -> u64 {
        self.latency.values().map(|h| h.len()).sum()
    }
}

/// What the main thread hears from executor threads.
enum Report {
    Interval(Recorder),
    Final(Recorder),
}

/// State shared by the connections of one executor thread.
struct Shared {
    options: Options,
    mix: Mix,
    chooser: Chooser,
    /// Next key number for inserts (shared by all threads).
    next_insert: Arc<AtomicU64>,
    issued: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    interval: RefCell<Recorder>,
    total: RefCell<Recorder>,
    node: Option<NodeStatus>,
    value: Vec<u8>,
    /// Open loop: this thread's send schedule.
    pace: Option<Pace>,
}

/// An open-loop schedule: request k of this thread is due at
/// `start + k × interval`. Any connection with room in its window takes the
/// next due request, so one timer per thread (the pacer) drives the whole
/// schedule; per-connection timers cost the client more than the server
/// and showed up as latency. Latency counts from the due time, so a
/// request held back by a full window or a late wake-up is charged for it.
struct Pace {
    start: Instant,
    interval_s: f64,
    taken: std::cell::Cell<u64>,
    /// Notified when requests become due.
    due: Notify,
}

impl Pace {
    fn due_at(&self, k: u64) -> Instant {
        self.start + Duration::from_secs_f64(k as f64 * self.interval_s)
    }

    /// Takes the next request if it is due by `now`; returns its due time.
    fn take_due(&self, now: Instant) -> Option<Instant> {
        let k = self.taken.get();
        let at = self.due_at(k);
        (at <= now).then(|| {
            self.taken.set(k + 1);
            at
        })
    }
}

/// Wakes idle senders when requests fall due. One timer per thread.
async fn pacer(shared: Rc<Shared>) {
    let Some(pace) = &shared.pace else { return };
    while !shared.stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let next = pace.due_at(pace.taken.get());
        if next > now {
            glommio::timer::sleep(next - now).await;
        } else {
            // A backlog: every connection's window is full, and replies
            // wake the senders; look again shortly for idle ones.
            pace.due.notify();
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
        pace.due.notify();
    }
    pace.due.notify();
}

/// One request in flight.
struct InFlight {
    op: Op,
    start: Instant,
    /// For read-modify-write: the key still to write after the read.
    rmw_key: Option<Vec<u8>>,
}

fn encode_native(out: &mut Vec<u8>, id: u64, request: &Request<'_>) {
    let mut body = Vec::new();
    encode_request(&mut body, request);
    frame::encode(out, ringkv::protocol::messages::opcode_of(request) as u8, 0, 0, id, &body);
}

fn encode_resp(out: &mut Vec<u8>, args: &[&[u8]]) {
    resp::array(out, args.len());
    for a in args {
        resp::bulk(out, a);
    }
}

/// Parses one RESP reply; returns (is_error, bytes consumed) or None.
fn parse_resp_reply(buf: &[u8]) -> Option<(bool, Option<Vec<u8>>, usize)> {
    let line_end = buf.windows(2).position(|w| w == b"\r\n")?;
    let line = &buf[1..line_end];
    match buf.first()? {
        b'+' | b':' => Some((false, None, line_end + 2)),
        b'-' => Some((true, None, line_end + 2)),
        b'$' => {
            let len: i64 = std::str::from_utf8(line).ok()?.parse().ok()?;
            if len < 0 {
                return Some((false, None, line_end + 2));
            }
            let end = line_end + 2 + len as usize;
            if buf.len() < end + 2 {
                return None;
            }
            Some((false, Some(buf[line_end + 2..end].to_vec()), end + 2))
        }
        b'*' => {
            // Only empty or bulk arrays are expected here.
            let n: i64 = std::str::from_utf8(line).ok()?.parse().ok()?;
            let mut at = line_end + 2;
            for _ in 0..n.max(0) {
                let (_, _, used) = parse_resp_reply(&buf[at..])?;
                at += used;
            }
            Some((false, None, at))
        }
        _ => Some((true, None, buf.len())),
    }
}

/// One connection's bookkeeping, shared by its sender and receiver tasks.
struct Conn {
    in_flight: HashMap<u64, InFlight>,
    /// Request ids in send order (RESP replies come back in this order).
    order: std::collections::VecDeque<u64>,
    next_id: u64,
    /// Encoded requests not yet written (follow-up writes of read-modify-
    /// write are queued here by the receiver).
    out: Vec<u8>,
    closed: bool,
}

fn encode_op(shared: &Shared, conn: &mut Conn, op: Op, key: &[u8], start: Instant, context: Option<&[u8]>) {
    let o = &shared.options;
    let id = conn.next_id;
    conn.next_id += 1;
    let value = &shared.value;
    let out = &mut conn.out;
    let follow_up = context.is_some();
    if o.resp {
        match (op, follow_up) {
            (Op::Rmw, true) | (Op::Update | Op::Insert, _) => encode_resp(out, &[b"SET", key, value]),
            (Op::Read | Op::Rmw, _) => encode_resp(out, &[b"GET", key]),
            (Op::Delete, _) => encode_resp(out, &[b"DEL", key]),
        }
    } else {
        let request = match (op, context) {
            (Op::Rmw, Some(context)) => Request::Put { key, context, value },
            (Op::Read | Op::Rmw, _) => Request::Get { key },
            (Op::Update | Op::Insert, _) => Request::Overwrite { key, value },
            (Op::Delete, _) => Request::DeleteAll { key },
        };
        encode_native(out, id, &request);
    }
    let rmw_key = (op == Op::Rmw && !follow_up).then(|| key.to_vec());
    conn.in_flight.insert(id, InFlight { op, start, rmw_key });
    conn.order.push_back(id);
}

/// A connection: a sender keeps `pipeline` requests in flight (closed loop)
/// or sends each request at its intended time (open loop; latency counts
/// from that time even if the window held it back), and a receiver
/// completes replies. Two tasks, so that neither waits on the other.
async fn connection(shared: Rc<Shared>, index: usize, shard: Option<u32>) {
    let o = &shared.options;
    let address = match (&shared.node, shard) {
        (Some(node), Some(s)) => SocketAddr::new(o.address.ip(), node.client_port + 1 + s as u16),
        _ => o.address,
    };
    let stream = match TcpStream::connect(address).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("connection {index}: connecting to {address}: {e}");
            shared.stop.store(true, Ordering::Relaxed);
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    let (mut reader, mut writer) = stream.split();
    let conn = Rc::new(RefCell::new(Conn {
        in_flight: HashMap::new(),
        order: std::collections::VecDeque::new(),
        next_id: 1,
        out: Vec::with_capacity(64 << 10),
        closed: false,
    }));
    let wake_sender = Rc::new(Notify::default());
    let sender = {
        let (shared, conn, wake) = (shared.clone(), conn.clone(), wake_sender.clone());
        async move {
            let o = &shared.options;
            let mut rng = ChaCha8Rng::seed_from_u64(o.seed.wrapping_add(index as u64 * 7919));
            let owner = |key: &[u8]| match &shared.node {
                Some(node) => shard_of(partition_of(key, node.partition_count), node.shard_count),
                None => 0,
            };
            let pick_key = |rng: &mut ChaCha8Rng, op: Op| -> Vec<u8> {
                loop {
                    let number = if op == Op::Insert {
                        shared.next_insert.fetch_add(1, Ordering::Relaxed)
                    } else {
                        shared.chooser.next(rng, shared.next_insert.load(Ordering::Relaxed))
                    };
                    let key = key_name(number);
                    if shard.is_none_or(|s| owner(&key) == s) {
                        return key;
                    }
                }
            };
            let mut buffer = Vec::new();
            loop {
                let woken = wake.listen();
                let paced = shared.pace.as_ref().map(|p| p.due.listen());
                let stopping = shared.stop.load(Ordering::Relaxed);
                {
                    let mut c = conn.borrow_mut();
                    if c.closed {
                        return;
                    }
                    if stopping && c.in_flight.is_empty() {
                        // Half-close: the server answers with EOF, which ends
                        // the receiver even if it is parked in a read.
                        drop(c);
                        let _ = writer.close().await;
                        return;
                    }
                    let now = Instant::now();
                    while !stopping && c.in_flight.len() < o.pipeline {
                        let start = match &shared.pace {
                            Some(pace) => match pace.take_due(now) {
                                Some(due) => due,
                                None => break,
                            },
                            None => now,
                        };
                        if let Some(limit) = o.operations {
                            if shared.issued.fetch_add(1, Ordering::Relaxed) >= limit {
                                shared.stop.store(true, Ordering::Relaxed);
                                break;
                            }
                        }
                        let op = shared.mix.pick(&mut rng);
                        let key = pick_key(&mut rng, op);
                        encode_op(&shared, &mut c, op, &key, start, None);
                    }
                    std::mem::swap(&mut buffer, &mut c.out);
                }
                if !buffer.is_empty() {
                    if writer.write_all(&buffer).await.is_err() {
                        conn.borrow_mut().closed = true;
                        return;
                    }
                    buffer.clear();
                    continue;
                }
                // Wait for a reply (room in the window, a follow-up to send)
                // or, with room in an open loop, for requests to fall due.
                let window_open = conn.borrow().in_flight.len() < o.pipeline;
                match paced {
                    Some(paced) if window_open && !stopping => {
                        futures::future::select(Box::pin(woken), Box::pin(paced)).await;
                    }
                    _ => woken.await,
                }
            }
        }
    };
    let receiver = {
        let (shared, conn, wake) = (shared.clone(), conn.clone(), wake_sender.clone());
        async move {
            let o = &shared.options;
            let mut input = vec![0u8; 256 << 10];
            let (mut start, mut end) = (0usize, 0usize);
            loop {
                {
                    let c = conn.borrow();
                    if c.closed || (shared.stop.load(Ordering::Relaxed) && c.in_flight.is_empty()) {
                        drop(c);
                        wake.notify();
                        return;
                    }
                }
                if end == input.len() {
                    input.copy_within(start..end, 0);
                    end -= start;
                    start = 0;
                    if end == input.len() {
                        input.resize(input.len() * 2, 0);
                    }
                }
                match reader.read(&mut input[end..]).await {
                    Ok(0) | Err(_) => {
                        if !shared.stop.load(Ordering::Relaxed) {
                            eprintln!("connection {index}: the server closed the connection");
                        }
                        shared.stop.store(true, Ordering::Relaxed);
                        conn.borrow_mut().closed = true;
                        wake.notify();
                        return;
                    }
                    Ok(n) => end += n,
                }
                let mut c = conn.borrow_mut();
                loop {
                    let (id, failed, payload, used) = if o.resp {
                        match parse_resp_reply(&input[start..end]) {
                            Some((err, payload, used)) => {
                                (c.order.pop_front().expect("a reply to a request"), err, payload, used)
                            }
                            None => break,
                        }
                    } else {
                        match frame::decode(&input[start..end], 64 << 20) {
                            Ok(Some((h, body, used))) => {
                                let status = Status::from_u8(h.status).unwrap_or(Status::Internal);
                                let failed = !matches!(status, Status::Ok | Status::NotFound);
                                (h.request_id, failed, (status == Status::Ok).then(|| body.to_vec()), used)
                            }
                            Ok(None) => break,
                            Err(e) => {
                                eprintln!("connection {index}: protocol error: {e}");
                                shared.stop.store(true, Ordering::Relaxed);
                                c.closed = true;
                                drop(c);
                                wake.notify();
                                return;
                            }
                        }
                    };
                    start += used;
                    let Some(mut request) = c.in_flight.remove(&id) else { continue };
                    if !o.resp {
                        c.order.retain(|x| *x != id);
                    }
                    if failed {
                        *shared.interval.borrow_mut().errors.entry(request.op).or_default() += 1;
                        continue;
                    }
                    let mut context = None;
                    if let (false, Some(bytes)) = (o.resp, &payload) {
                        if let Ok(set) = encoding::decode(bytes) {
                            let live = set.values().filter(|s| !s.tombstone).count() as u64;
                            if live > 1 {
                                let mut r = shared.interval.borrow_mut();
                                r.siblings_seen += live;
                                r.reads_with_siblings += 1;
                            }
                            context = Some(set.join().encode());
                        }
                    }
                    if let Some(key) = request.rmw_key.take() {
                        // The write half of read-modify-write, with the
                        // context just read (none if the key was absent).
                        let context = context.unwrap_or_default();
                        encode_op(&shared, &mut c, Op::Rmw, &key, request.start, Some(&context));
                        continue;
                    }
                    let micros = request.start.elapsed().as_micros() as u64;
                    shared.interval.borrow_mut().record(request.op, micros);
                }
                if start == end {
                    start = 0;
                    end = 0;
                }
                drop(c);
                wake.notify();
            }
        }
    };
    futures::future::join(sender, receiver).await;
}

/// Loads every record (one Overwrite/SET each), pipelined, through the
/// shared port (the node routes each key to its shard, so no record is
/// skipped whatever the connection count).
async fn load_phase(shared: Rc<Shared>, index: usize, of: usize) {
    let o = &shared.options;
    let address = o.address;
    let mut stream = TcpStream::connect(address).await.expect("connect for load");
    let mut out = Vec::new();
    let mut input = vec![0u8; 1 << 20];
    let batch = 256u64;
    let mut number = index as u64;
    while number < o.records {
        let mut sent = 0;
        while sent < batch && number < o.records {
            let key = key_name(number);
            number += of as u64;
            if o.resp {
                encode_resp(&mut out, &[b"SET", &key, &shared.value]);
            } else {
                encode_native(&mut out, sent + 1, &Request::Overwrite { key: &key, value: &shared.value });
            }
            sent += 1;
        }
        let batch_start = Instant::now();
        stream.write_all(&out).await.expect("load write");
        out.clear();
        let (mut got, mut end, mut at) = (0, 0, 0);
        while got < sent {
            let n = stream.read(&mut input[end..]).await.expect("load read");
            assert!(n > 0, "server closed during load");
            end += n;
            loop {
                let used = if o.resp {
                    match parse_resp_reply(&input[at..end]) {
                        Some((err, _, used)) => {
                            assert!(!err, "load write refused");
                            used
                        }
                        None => break,
                    }
                } else {
                    match frame::decode(&input[at..end], 1 << 20).expect("frame") {
                        Some((h, body, used)) => {
                            assert_eq!(h.status, 0, "load write refused: {}", String::from_utf8_lossy(body));
                            used
                        }
                        None => break,
                    }
                };
                at += used;
                got += 1;
                // Each insert's latency is its batch's round trip: the
                // batch is written at once and its replies stream back.
                shared.interval.borrow_mut().record(Op::Insert, batch_start.elapsed().as_micros() as u64);
            }
            input.copy_within(at..end, 0);
            end -= at;
            at = 0;
        }
    }
}

fn node_status(o: &Options) -> Option<NodeStatus> {
    if o.resp {
        return None;
    }
    let client = ringkv::client::Client::connect(o.address, Default::default()).unwrap_or_else(|e| {
        eprintln!("ringkv-bench: cannot reach {}: {e}", o.address);
        std::process::exit(2)
    });
    Some(client.node().clone())
}

fn percentiles(h: &Histogram<u64>) -> [f64; 6] {
    let ms = |v: u64| v as f64 / 1000.0;
    [
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.9)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.999)),
        ms(h.value_at_quantile(0.9999)),
        ms(h.max()),
    ]
}

fn main() {
    let o = Options::parse();
    ringkv::runtime::end_on_closed_stdout();
    let mix =
        Mix::of(&o).unwrap_or_else(|e| Options::command().error(clap::error::ErrorKind::ArgumentConflict, e).exit());
    let node = node_status(&o);
    let shard_aware = node.is_some() && !o.no_shard_aware;
    let shards = node.as_ref().map_or(1, |n| n.shard_count) as usize;
    let next_insert = Arc::new(AtomicU64::new(o.records));
    let issued = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (reports, rx) = mpsc::channel::<Report>();
    let phases: Vec<bool> = if o.load_only {
        vec![true]
    } else if o.load {
        vec![true, false]
    } else {
        vec![false]
    };
    let mut summary = serde_json::Map::new();
    for load in phases {
        stop.store(false, Ordering::Relaxed);
        let started = Instant::now();
        let mut handles = Vec::new();
        for t in 0..o.threads {
            let (o2, mix2, node2) = (o.clone(), mix.clone(), node.clone());
            let (ni, is, st, rep) = (next_insert.clone(), issued.clone(), stop.clone(), reports.clone());
            let placement = o.pin_from.map_or(Placement::Unbound, |c| Placement::Fixed(c + t));
            handles.push(
                LocalExecutorBuilder::new(placement)
                    .io_memory(1 << 20)
                    .spawn(move || async move {
                        let chooser = Chooser::new(mix2.distribution, o2.records);
                        let value = vec![b'x'; o2.value_bytes];
                        let shared = Rc::new(Shared {
                            options: o2.clone(),
                            mix: mix2,
                            chooser,
                            next_insert: ni,
                            issued: is,
                            stop: st.clone(),
                            interval: RefCell::new(Recorder::new()),
                            total: RefCell::new(Recorder::new()),
                            node: node2,
                            value,
                            pace: (o2.rate > 0 && !load).then(|| Pace {
                                start: Instant::now(),
                                interval_s: o2.threads as f64 / o2.rate as f64,
                                taken: std::cell::Cell::new(0),
                                due: Notify::default(),
                            }),
                        });
                        let pacer = glommio::spawn_local(pacer(shared.clone()));
                        let mine: Vec<usize> = (0..o2.connections).filter(|c| c % o2.threads == t).collect();
                        let tasks: Vec<_> = mine
                            .iter()
                            .map(|&c| {
                                let shard = shard_aware.then_some((c % shards) as u32);
                                let shared = shared.clone();
                                if load {
                                    glommio::spawn_local(load_phase(shared, c, o2.connections))
                                } else {
                                    glommio::spawn_local(connection(shared, c, shard))
                                }
                            })
                            .collect();
                        // Report an interval every second while running.
                        let reporter = {
                            let shared = shared.clone();
                            let rep = rep.clone();
                            glommio::spawn_local(async move {
                                loop {
                                    glommio::timer::sleep(Duration::from_secs(1)).await;
                                    let interval =
                                        std::mem::replace(&mut *shared.interval.borrow_mut(), Recorder::new());
                                    shared.total.borrow_mut().merge(&interval);
                                    if rep.send(Report::Interval(interval)).is_err() {
                                        return;
                                    }
                                }
                            })
                        };
                        futures::future::join_all(tasks).await;
                        pacer.await;
                        drop(reporter);
                        let interval = std::mem::replace(&mut *shared.interval.borrow_mut(), Recorder::new());
                        shared.total.borrow_mut().merge(&interval);
                        let _ = rep.send(Report::Final(shared.total.borrow().clone()));
                    })
                    .expect("executor"),
            );
        }
        // Stop after the duration (closed or open loop without --operations).
        if !load && o.operations.is_none() {
            let stop = stop.clone();
            let d = Duration::from_secs(o.duration_secs);
            std::thread::spawn(move || {
                std::thread::sleep(d);
                stop.store(true, Ordering::Relaxed);
            });
        }
        let mut total = Recorder::new();
        let mut finals = 0;
        let mut log = o.hdr_log.as_ref().filter(|_| !load).map(|p| std::fs::File::create(p).expect("hdr log"));
        let mut second = 0u64;
        if let Some(f) = log.as_mut() {
            use std::io::Write;
            let _ = writeln!(f, "#[ringkv-bench interval log: one line per second per operation]");
            let _ = writeln!(
                f,
                "#[StartTime: {} (seconds since epoch)]",
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
            );
            let _ = writeln!(
                f,
                "\"StartTimestamp\",\"Interval_Length\",\"Interval_Max\",\"Interval_Compressed_Histogram\""
            );
        }
        let mut window = Recorder::new();
        while finals < o.threads {
            match rx.recv_timeout(Duration::from_millis(1100)) {
                Ok(Report::Interval(r)) => window.merge(&r),
                Ok(Report::Final(r)) => {
                    total.merge(&r);
                    finals += 1;
                    continue;
                }
                Err(_) => {}
            }
            // Print progress roughly once per second.
            if window.total() > 0 || load {
                second += 1;
                let read = &window.latency[&Op::Read];
                eprint!(
                    "\r[{:>4}s] {} {:>9} ops/s  read p99 {:>7.3} ms  errors {}        ",
                    second,
                    if load { "load" } else { "run " },
                    window.total() / o.threads.max(1) as u64 * o.threads as u64,
                    read.value_at_quantile(0.99) as f64 / 1000.0,
                    window.errors.values().sum::<u64>()
                );
                if let Some(f) = log.as_mut() {
                    use hdrhistogram::serialization::{Serializer, V2DeflateSerializer};
                    use std::io::Write;
                    for op in OPS {
                        let h = &window.latency[&op];
                        if h.is_empty() {
                            continue;
                        }
                        let mut bytes = Vec::new();
                        V2DeflateSerializer::new().serialize(h, &mut bytes).expect("serialize histogram");
                        let encoded = base64(&bytes);
                        let _ = writeln!(
                            f,
                            "Tag={},{:.3},1.000,{:.3},{}",
                            op.name(),
                            second as f64 - 1.0,
                            h.max() as f64 / 1000.0,
                            encoded
                        );
                    }
                }
                window = Recorder::new();
            }
        }
        eprintln!();
        for h in handles {
            h.join().expect("executor thread");
        }
        let elapsed = started.elapsed().as_secs_f64();
        let phase = if load { "load" } else { "run" };
        println!(
            "== {phase}: {} {} connections x pipeline {} ({}), {:.1} s ==",
            if o.resp { "RESP" } else { "native" },
            o.connections,
            o.pipeline,
            if o.rate > 0 { format!("open loop at {} ops/s", o.rate) } else { "closed loop".into() },
            elapsed
        );
        println!(
            "{:<18} {:>10} {:>11} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "operation", "count", "ops/s", "errors", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "p99.99", "max ms"
        );
        let mut ops_json = serde_json::Map::new();
        for op in OPS {
            let h = &total.latency[&op];
            let errors = total.errors.get(&op).copied().unwrap_or(0);
            if h.is_empty() && errors == 0 {
                continue;
            }
            let p = percentiles(h);
            let rate = h.len() as f64 / elapsed;
            println!(
                "{:<18} {:>10} {:>11.0} {:>8} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
                op.name(),
                h.len(),
                rate,
                errors,
                p[0],
                p[1],
                p[2],
                p[3],
                p[4],
                p[5]
            );
            ops_json.insert(
                op.name().into(),
                serde_json::json!({"count": h.len(), "ops_per_s": rate, "errors": errors,
                    "p50_ms": p[0], "p90_ms": p[1], "p99_ms": p[2], "p999_ms": p[3], "p9999_ms": p[4], "max_ms": p[5]}),
            );
        }
        let throughput = total.total() as f64 / elapsed;
        println!(
            "total {:.0} ops/s; reads that saw siblings: {} ({} siblings)",
            throughput, total.reads_with_siblings, total.siblings_seen
        );
        summary.insert(
            phase.into(),
            serde_json::json!({"seconds": elapsed, "ops_per_s": throughput, "operations": ops_json,
                "reads_with_siblings": total.reads_with_siblings, "siblings_seen": total.siblings_seen}),
        );
    }
    if let Some(path) = &o.json {
        summary.insert(
            "options".into(),
            serde_json::json!({"address": o.address.to_string(), "resp": o.resp, "workload": format!("{:?}", o.workload),
                "records": o.records, "value_bytes": o.value_bytes, "connections": o.connections, "pipeline": o.pipeline,
                "rate": o.rate, "threads": o.threads}),
        );
        std::fs::write(path, serde_json::to_string_pretty(&summary).expect("json")).expect("write --json");
    }
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[allow(dead_code)]
fn is_opcode(o: u8) -> bool {
    Opcode::from_u8(o).is_some()
}
