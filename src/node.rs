//! A node: the process around the shards. Startup (lock, identity, port
//! checks, one pinned executor per shard, a barrier until every shard has
//! recovered its storage and bound its sockets), supervision (a shard that
//! ends unexpectedly, e.g. by a panic, brings the node down cleanly with a
//! non-zero exit), and graceful stop on SIGTERM/SIGINT (stop accepting,
//! drain in-flight requests within `drain_timeout_ms`, sync, exit 0).
//!
//! Runs on the main thread with std; everything per shard runs in
//! `shard_main` on that shard's executor.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use glommio::{LocalExecutorBuilder, Placement};

use crate::config::{Config, ConfigError};
use crate::runtime::{spawn_detached, DmaDisk};
use crate::server::{accept_loop, Protocol};
use crate::shard::{serve_peers, PeerMessage, Shard};
use crate::storage::data_dir::DataDir;
use crate::storage::{ShardLayout, ShardStore, StorageError};

/// Why a node could not start or stopped badly.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("{address} is in use by another process ({source}); choose another port or stop that process")]
    PortInUse { address: SocketAddr, source: std::io::Error },
    #[error("node identity file {path}: {message}")]
    Identity { path: PathBuf, message: String },
    #[error("shard {shard} failed to start: {message}")]
    ShardStart { shard: u32, message: String },
    #[error("shard {shard} stopped unexpectedly{}; the node was shut down", if *panicked { " (it panicked)" } else { "" })]
    ShardDied { shard: u32, panicked: bool },
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
}

const IDENTITY_FILE: &str = "NODE";
const IDENTITY_MAGIC: &[u8; 8] = b"RINGKVID";

/// The node's actor id for dots: created with the data directory (a wiped
/// or restored directory gets a new one, so dots are never reused) and made
/// durable before the node serves anything.
pub fn load_or_create_actor(root: &Path) -> Result<u64, NodeError> {
    let path = root.join(IDENTITY_FILE);
    let fail = |message: String| NodeError::Identity { path: path.clone(), message };
    match std::fs::read(&path) {
        Ok(bytes) => {
            if bytes.len() != 20 || &bytes[..8] != IDENTITY_MAGIC {
                return Err(fail("not a ringkv identity file".into()));
            }
            let crc = u32::from_le_bytes(bytes[16..20].try_into().expect("4"));
            if crc32fast::hash(&bytes[..16]) != crc {
                return Err(fail("checksum mismatch".into()));
            }
            Ok(u64::from_le_bytes(bytes[8..16].try_into().expect("8")))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let actor = loop {
                let candidate: u64 = rand::random();
                if candidate != 0 {
                    break candidate;
                }
            };
            let mut bytes = Vec::with_capacity(20);
            bytes.extend_from_slice(IDENTITY_MAGIC);
            bytes.extend_from_slice(&actor.to_le_bytes());
            bytes.extend_from_slice(&crc32fast::hash(&bytes).to_le_bytes());
            let tmp = path.with_extension("tmp");
            let write = || -> std::io::Result<()> {
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(&bytes)?;
                f.sync_all()?;
                std::fs::rename(&tmp, &path)?;
                std::fs::File::open(root)?.sync_all()
            };
            write().map_err(|e| fail(e.to_string()))?;
            Ok(actor)
        }
        Err(e) => Err(fail(e.to_string())),
    }
}

/// Ports a node with `shards` shards binds, and what for.
pub fn ports(config: &Config, shards: u32) -> Vec<(u16, Protocol, Option<u32>)> {
    let node = &config.node;
    let mut ports = vec![(node.client_port, Protocol::Native, None)];
    for s in 0..shards {
        ports.push((node.client_port + 1 + s as u16, Protocol::Native, Some(s)));
    }
    if node.redis_port != 0 {
        ports.push((node.redis_port, Protocol::Redis, None));
    }
    ports
}

/// How long a busy port is retried before startup fails. A node killed with
/// SIGKILL keeps its listening sockets open until the kernel has torn down
/// its io_uring rings, which happens asynchronously after the process is
/// gone; an immediate restart (a supervisor, a crash loop) must not fail
/// because of that, while a port that another server really holds still
/// fails within this bound.
const BUSY_PORT_WAIT: Duration = Duration::from_secs(3);
const BUSY_PORT_POLL: Duration = Duration::from_millis(20);

/// glommio binds with SO_REUSEPORT, so a port held by another process that
/// also set it would be shared silently: check each port without it first.
fn check_ports(address: IpAddr, ports: &[(u16, Protocol, Option<u32>)]) -> Result<(), NodeError> {
    let give_up_at = std::time::Instant::now() + BUSY_PORT_WAIT;
    for (port, _, _) in ports {
        let address = SocketAddr::new(address, *port);
        let mut warned = false;
        loop {
            match probe_port(address) {
                Ok(()) => break,
                Err(source) if source.kind() == std::io::ErrorKind::AddrInUse => {
                    if std::time::Instant::now() >= give_up_at {
                        return Err(NodeError::PortInUse { address, source });
                    }
                    if !warned {
                        tracing::info!(%address, wait_ms = BUSY_PORT_WAIT.as_millis() as u64, "port busy; waiting in case a previous instance is still closing");
                        warned = true;
                    }
                    std::thread::sleep(BUSY_PORT_POLL);
                }
                Err(source) => return Err(NodeError::PortInUse { address, source }),
            }
        }
    }
    Ok(())
}

/// Binds `address` with SO_REUSEADDR but without SO_REUSEPORT (then drops
/// it): fails only if another socket is listening there, not because of
/// lingering connections from an earlier run.
fn probe_port(address: SocketAddr) -> std::io::Result<()> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(address), socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&address.into())?;
    socket.listen(1)
}

enum Event {
    Signal(i32),
    ShardExited { shard: u32, panicked: bool },
}

/// Sends `ShardExited` when a shard's thread ends. It lives in a thread
/// local because thread-local destructors run however the thread ends,
/// while glommio does not drop the shard's future when a task panics.
struct ExitGuard {
    shard: u32,
    events: mpsc::Sender<Event>,
    clean: bool,
}

impl Drop for ExitGuard {
    fn drop(&mut self) {
        let _ = self.events.send(Event::ShardExited { shard: self.shard, panicked: !self.clean });
    }
}

thread_local! {
    static EXIT_GUARD: std::cell::RefCell<Option<ExitGuard>> = const { std::cell::RefCell::new(None) };
}

/// Marks this shard's thread as ending normally (not by a panic).
fn exit_cleanly() {
    EXIT_GUARD.with(|g| {
        if let Some(guard) = g.borrow_mut().as_mut() {
            guard.clean = true;
        }
    });
}

struct ShardSetup {
    index: u32,
    shard_count: u32,
    config: Config,
    actor: u64,
    root: PathBuf,
    marker: PathBuf,
    peers: Vec<async_channel::Sender<PeerMessage>>,
    inbound: async_channel::Receiver<PeerMessage>,
    control: async_channel::Receiver<()>,
    ready: mpsc::Sender<Result<(), String>>,
    events: mpsc::Sender<Event>,
    board: Arc<crate::balance::Board>,
}

/// Everything a shard does, on its own executor.
async fn shard_main(setup: ShardSetup) {
    let ShardSetup { index, shard_count, config, actor, root, marker, peers, inbound, control, ready, events, board } =
        setup;
    EXIT_GUARD.with(|g| *g.borrow_mut() = Some(ExitGuard { shard: index, events, clean: false }));
    let layout = ShardLayout { shard: index, shard_count, partition_count: config.node.partition_count };
    let opened = async {
        DmaDisk::prime(&marker).await.map_err(|e| format!("opening {} with O_DIRECT: {e}", marker.display()))?;
        let (store, background) = ShardStore::open(DmaDisk::default(), &root, config.storage.clone(), layout)
            .await
            .map_err(|e| e.to_string())?;
        let mut listeners = Vec::new();
        for (port, protocol, owner) in ports(&config, shard_count) {
            if owner.is_some_and(|o| o != index) {
                continue;
            }
            let address = SocketAddr::new(config.node.listen_address, port);
            let listener = crate::runtime::bind_listener(address).map_err(|e| format!("binding {address}: {e}"))?;
            listeners.push((listener, protocol));
        }
        Ok::<_, String>((store, background, listeners))
    }
    .await;
    let (store, background, listeners) = match opened {
        Ok(x) => x,
        Err(message) => {
            let _ = ready.send(Err(message));
            exit_cleanly();
            return;
        }
    };
    spawn_detached(background);
    let (client_port, redis_port) = (config.node.client_port, config.node.redis_port);
    let drain = Duration::from_millis(config.node.drain_timeout_ms);
    let balancer = crate::balance::Balancer::new(
        index,
        board,
        config.node.connection_balance_wait_permille,
        config.node.connections_max_per_shard,
    );
    let balance_interval = Duration::from_millis(config.node.connection_balance_interval_ms);
    let shard = Rc::new(Shard::new(
        index,
        shard_count,
        actor,
        store,
        Rc::new(config),
        peers,
        client_port,
        redis_port,
        balancer,
    ));
    spawn_detached(serve_peers(shard.clone(), inbound));
    if shard_count > 1 && !balance_interval.is_zero() {
        spawn_detached(balance_connections(shard.clone(), balance_interval));
    }
    for (listener, protocol) in listeners {
        spawn_detached(accept_loop(shard.clone(), listener, protocol));
    }
    let _ = ready.send(Ok(()));
    // Serve until told to stop (or the control channel is dropped).
    let _ = control.recv().await;
    shard.stopping.set(true);
    shard.stop.notify();
    shard.outbox.stop();
    // Drain: connections finish their current turn and close.
    let deadline = std::time::Instant::now() + drain;
    while shard.connections.get() > 0 {
        let closed = shard.connection_closed.listen();
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            tracing::warn!(
                shard = index,
                open = shard.connections.get(),
                "drain deadline passed; closing with requests in flight"
            );
            break;
        }
        futures::future::select(Box::pin(closed), Box::pin(crate::runtime::sleep(left))).await;
    }
    if let Err(e) = shard.store.close().await {
        tracing::error!(shard = index, error = %e, "closing storage failed");
    }
    exit_cleanly();
}

/// Samples the shard's wait for its CPU every `interval` and decides which
/// connections to hand over (see `balance`), until the shard stops.
async fn balance_connections(shard: Rc<Shard>, interval: Duration) {
    while !shard.stopping.get() {
        shard.balancer.sample();
        crate::runtime::sleep(interval).await;
    }
}

/// Runs a node until SIGTERM/SIGINT (Ok) or a failure (Err).
pub fn serve(config: Config) -> Result<(), NodeError> {
    config.validate()?;
    crate::runtime::tune_allocator();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let shard_count = if config.node.shards == 0 { cpus } else { config.node.shards };
    let root = config.node.data_dir.clone();
    let data_dir = DataDir::open(&root, shard_count, config.node.partition_count)?;
    let actor = load_or_create_actor(&root)?;
    let ports = ports(&config, shard_count);
    check_ports(config.node.listen_address, &ports)?;

    let (events_tx, events) = mpsc::channel();
    let board = crate::balance::Board::new(shard_count);
    let mut inbound = Vec::new();
    let mut peers = Vec::new();
    for _ in 0..shard_count {
        let (tx, rx) = async_channel::bounded(config.node.peer_queue_batches);
        peers.push(tx);
        inbound.push(rx);
    }
    let mut controls = Vec::new();
    let mut handles = Vec::new();
    let mut readies = Vec::new();
    for (index, inbound) in (0..shard_count).zip(inbound) {
        let (control_tx, control) = async_channel::bounded(1);
        let (ready, ready_rx) = mpsc::channel();
        let setup = ShardSetup {
            index,
            shard_count,
            config: config.clone(),
            actor,
            root: root.clone(),
            marker: data_dir.marker_path(),
            peers: peers.clone(),
            inbound,
            control,
            ready,
            events: events_tx.clone(),
            board: board.clone(),
        };
        let mut builder = LocalExecutorBuilder::new(Placement::Fixed((index % cpus) as usize))
            .name(&format!("ringkv-shard-{index}"))
            .io_memory(config.node.io_memory_bytes);
        if config.node.spin_before_park_us > 0 {
            builder = builder.spin_before_park(Duration::from_micros(config.node.spin_before_park_us));
        }
        let handle = builder
            .spawn(move || shard_main(setup))
            .map_err(|e| NodeError::ShardStart { shard: index, message: crate::runtime::into_io(e).to_string() })?;
        controls.push(control_tx);
        handles.push(handle);
        readies.push(ready_rx);
    }
    drop(peers);
    // The barrier: every shard recovered and bound, or the node stops.
    let mut failure = None;
    for (index, ready) in readies.iter().enumerate() {
        match ready.recv() {
            Ok(Ok(())) => {}
            Ok(Err(message)) => {
                failure = Some(NodeError::ShardStart { shard: index as u32, message });
                break;
            }
            Err(_) => {
                failure = Some(NodeError::ShardStart {
                    shard: index as u32,
                    message: "its executor could not start (is `ulimit -l` at least 2 MiB? glommio needs locked memory for io_uring)".into(),
                });
                break;
            }
        }
    }
    if let Some(error) = failure {
        stop_all(&controls);
        for handle in handles {
            if let Err(e) = handle.join() {
                tracing::error!(error = ?e, "shard thread ended with an error");
            }
        }
        return Err(error);
    }
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT])
        .map_err(NodeError::Signals)?;
    let signal_handle = signals.handle();
    let signal_events = events_tx.clone();
    std::thread::Builder::new()
        .name("ringkv-signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if signal_events.send(Event::Signal(signal)).is_err() {
                    return;
                }
            }
        })
        .map_err(NodeError::Signals)?;
    tracing::info!(
        shards = shard_count,
        partitions = config.node.partition_count,
        client = %SocketAddr::new(config.node.listen_address, config.node.client_port),
        redis = config.node.redis_port,
        data_dir = %root.display(),
        sync_mode = ?config.storage.sync_mode,
        "ringkv node serving"
    );
    let outcome = match events.recv() {
        Ok(Event::Signal(signal)) => {
            tracing::info!(signal, "stopping: draining requests, then syncing");
            Ok(())
        }
        Ok(Event::ShardExited { shard, panicked }) => Err(NodeError::ShardDied { shard, panicked }),
        Err(_) => Ok(()),
    };
    stop_all(&controls);
    let mut died = None;
    for (index, handle) in handles.into_iter().enumerate() {
        if handle.join().is_err() {
            died.get_or_insert(NodeError::ShardDied { shard: index as u32, panicked: true });
        }
    }
    signal_handle.close();
    drop(data_dir);
    match (outcome, died) {
        (Err(e), _) => Err(e),
        (Ok(()), Some(e)) => Err(e),
        (Ok(()), None) => {
            tracing::info!("stopped cleanly");
            Ok(())
        }
    }
}

fn stop_all(controls: &[async_channel::Sender<()>]) {
    for control in controls {
        let _ = control.try_send(());
        control.close();
    }
}
