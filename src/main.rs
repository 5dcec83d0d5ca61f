//! The `ringkv` command line: run a node, and talk to one.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use ringkv::client::{from_hex, to_hex, Client, ClientOptions};
use ringkv::config::{Config, SyncMode};

#[global_allocator]
static ALLOCATOR: ringkv::runtime::Allocator = ringkv::runtime::Allocator {};

#[derive(Parser)]
#[command(name = "ringkv", version, about = "A Dynamo-style, highly available key-value store", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Sync {
    Group,
    Interval,
    None,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node (with no flags: a single node on 127.0.0.1:7700, Redis
    /// protocol on 6380, data in ./ringkv-data, sync mode `group`).
    Serve {
        /// TOML configuration (see tuning/default.toml); flags override it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Data directory [default: ./ringkv-data]; locked while a node uses it.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Executors, one per core [default: 0 = one per CPU].
        #[arg(long)]
        shards: Option<u32>,
        /// Address to listen on [default: 127.0.0.1, loopback only].
        #[arg(long)]
        listen: Option<std::net::IpAddr>,
        /// Native-protocol port [default: 7700]; shard i also listens on
        /// this port + 1 + i, for shard-aware clients.
        #[arg(long)]
        client_port: Option<u16>,
        /// Redis-protocol port [default: 6380; 0 = off].
        #[arg(long)]
        redis_port: Option<u16>,
        /// Ring size Q (power of two) [default: 256], fixed when the data
        /// directory is created.
        #[arg(long)]
        partitions: Option<u32>,
        /// When writes are acknowledged: after fdatasync of their batch
        /// (group), at once with a periodic fdatasync (interval), or at once
        /// with no commit log (none) [default: group].
        #[arg(long, value_enum)]
        sync: Option<Sync>,
        /// Per-shard value cache, in MiB [default: 64].
        #[arg(long)]
        cache_mib: Option<usize>,
    },
    /// Read a key: every live sibling and the causal context.
    Get {
        /// The key (UTF-8 as given).
        key: String,
        /// The node's native-protocol address.
        #[arg(long, default_value = "127.0.0.1:7700")]
        node: SocketAddr,
    },
    /// Write a key. With --context (from `get`) the write supersedes what was
    /// read; without, it adds a sibling next to whatever is there.
    Put {
        /// The key (UTF-8 as given).
        key: String,
        /// The value (UTF-8 as given).
        value: String,
        /// Causal context printed by `get` (hex).
        #[arg(long)]
        context: Option<String>,
        /// The node's native-protocol address.
        #[arg(long, default_value = "127.0.0.1:7700")]
        node: SocketAddr,
    },
    /// Delete what --context covers (from `get`). Without --context the key
    /// is read first and everything read is deleted.
    Del {
        /// The key (UTF-8 as given).
        key: String,
        /// Causal context printed by `get` (hex).
        #[arg(long)]
        context: Option<String>,
        /// The node's native-protocol address.
        #[arg(long, default_value = "127.0.0.1:7700")]
        node: SocketAddr,
    },
    /// Check a stopped node's data directory offline: open each shard as
    /// `serve` would (the same recovery), read every record of every
    /// segment and check its CRC, then close cleanly. Prints a report; exit
    /// status 0 intact, 1 damaged (or not fully checked), 2 not checked
    /// (e.g. the directory is in use by a running node).
    Verify {
        /// Data directory [default: ./ringkv-data].
        #[arg(long, default_value = "ringkv-data")]
        data_dir: PathBuf,
        /// The node's TOML configuration, for its storage section (sync
        /// mode, sizes) [default: the defaults, in sync mode `none`, which
        /// creates no commit-log files; existing logs are replayed either way].
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Administration.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Node identity, layout and per-shard state.
    Status {
        /// The node's native-protocol address.
        #[arg(long, default_value = "127.0.0.1:7700")]
        node: SocketAddr,
    },
}

fn load_config(path: Option<&PathBuf>) -> Result<Config, String> {
    let Some(path) = path else { return Ok(Config::default()) };
    let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

fn client(node: SocketAddr) -> Result<Client, String> {
    Client::connect(node, ClientOptions { timeout: Duration::from_secs(5), ..ClientOptions::default() })
        .map_err(|e| format!("{e} (is a node running? start one with `ringkv serve`)"))
}

fn show(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_string(),
        Err(_) => format!("0x{}", to_hex(bytes)),
    }
}

fn context_arg(context: Option<&String>) -> Result<Option<Vec<u8>>, String> {
    context
        .map(|c| from_hex(c).ok_or_else(|| "--context must be the hex string `ringkv get` printed".to_string()))
        .transpose()
}

fn override_with<T>(setting: &mut T, flag: Option<T>) {
    if let Some(value) = flag {
        *setting = value;
    }
}

/// `ringkv verify`: prints the report; the exit status says what it found.
fn verify(data_dir: &std::path::Path, config_path: Option<&PathBuf>) -> Result<ExitCode, String> {
    let mut config = load_config(config_path)?;
    if config_path.is_none() {
        // `none` creates no commit-log files of its own (recovery replays
        // whatever logs there are in every mode): verifying a directory
        // leaves no file the node would not have made itself.
        config.storage.sync_mode = SyncMode::None;
    }
    Ok(match ringkv::verify::verify_data_dir(data_dir, config.storage, config.node.io_memory_bytes) {
        Ok(findings) => {
            print!("{}", findings.report());
            if findings.is_clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("ringkv: verify: {e}");
            ExitCode::from(2)
        }
    })
}

fn run(cli: Cli) -> Result<ExitCode, String> {
    match cli.command {
        Command::Verify { data_dir, config } => verify(&data_dir, config.as_ref()),
        Command::Serve { config, data_dir, shards, listen, client_port, redis_port, partitions, sync, cache_mib } => {
            let mut config = load_config(config.as_ref())?;
            // Flags override the file, which overrides the defaults.
            override_with(&mut config.node.data_dir, data_dir);
            override_with(&mut config.node.shards, shards);
            override_with(&mut config.node.listen_address, listen);
            override_with(&mut config.node.client_port, client_port);
            override_with(&mut config.node.redis_port, redis_port);
            override_with(&mut config.node.partition_count, partitions);
            let sync_mode = sync.map(|v| match v {
                Sync::Group => SyncMode::Group,
                Sync::Interval => SyncMode::Interval,
                Sync::None => SyncMode::None,
            });
            override_with(&mut config.storage.sync_mode, sync_mode);
            override_with(&mut config.storage.read_cache_bytes, cache_mib.map(|mib| mib << 20));
            ringkv::node::serve(config).map(|()| ExitCode::SUCCESS).map_err(|e| e.to_string())
        }
        Command::Get { key, node } => {
            let client = client(node)?;
            let got = futures::executor::block_on(client.get(key.as_bytes())).map_err(|e| e.to_string())?;
            match got {
                None => {
                    let context =
                        futures::executor::block_on(client.context(key.as_bytes())).map_err(|e| e.to_string())?;
                    println!("not found");
                    println!("context: {}", to_hex(&context));
                }
                Some(v) => {
                    println!("siblings: {}", v.siblings.len());
                    for (i, s) in v.siblings.iter().enumerate() {
                        println!("  [{}] {}", i + 1, show(s));
                    }
                    println!("context: {}", to_hex(&v.context));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Put { key, value, context, node } => {
            let context = context_arg(context.as_ref())?;
            let client = client(node)?;
            let new = futures::executor::block_on(client.put(key.as_bytes(), value.as_bytes(), context.as_deref()))
                .map_err(|e| e.to_string())?;
            println!("ok");
            println!("context: {}", to_hex(&new));
            Ok(ExitCode::SUCCESS)
        }
        Command::Del { key, context, node } => {
            let client = client(node)?;
            let context = match context_arg(context.as_ref())? {
                Some(c) => c,
                None => futures::executor::block_on(client.context(key.as_bytes())).map_err(|e| e.to_string())?,
            };
            let new =
                futures::executor::block_on(client.delete(key.as_bytes(), &context)).map_err(|e| e.to_string())?;
            println!("deleted");
            println!("context: {}", to_hex(&new));
            Ok(ExitCode::SUCCESS)
        }
        Command::Admin { command: AdminCommand::Status { node } } => {
            let client = client(node)?;
            for shard in 0..client.node().shard_count {
                // Ask each shard on its own port for its part of the report.
                let port = client.node().client_port + 1 + shard as u16;
                let per_shard = Client::connect(SocketAddr::new(node.ip(), port), ClientOptions::default())
                    .and_then(|c| futures::executor::block_on(c.status()))
                    .map_err(|e| format!("shard {shard}: {e}"))?;
                if shard == 0 {
                    print!("{}", per_shard.report);
                } else {
                    for line in per_shard.report.lines().filter(|l| l.starts_with("shard ")) {
                        println!("{line}");
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn main() -> ExitCode {
    let (writer, _guard) = tracing_appender::non_blocking(std::io::stderr());
    tracing_subscriber::fmt()
        .with_writer(writer)
        // Colour codes only for a terminal: logs sent to a file or a
        // journal stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve { .. }) {
        // The server keeps SIGPIPE ignored: its sockets report EPIPE as an
        // error to handle.
        ringkv::runtime::end_on_closed_stdout();
    }
    match run(cli) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("ringkv: error: {message}");
            ExitCode::FAILURE
        }
    }
}
