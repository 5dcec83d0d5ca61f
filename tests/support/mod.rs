//! Running real `ringkv` nodes in tests: each test uses its own 127.0.0.x
//! address (so default ports never collide), a data directory under
//! target/, waits for readiness by the node's own "serving" log line (with a
//! deadline, never a sleep), and stops nodes by PID.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringkv::client::{Client, ClientOptions};

pub const BIN: &str = env!("CARGO_BIN_EXE_ringkv");

pub fn scratch(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(prefix).tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir under target/")
}

pub struct Node {
    pub child: Option<Child>,
    pub ip: IpAddr,
    pub client_port: u16,
    pub redis_port: u16,
    pub data_dir: PathBuf,
    pub config_path: Option<PathBuf>,
    log: Arc<Mutex<Vec<String>>>,
    lines: Receiver<String>,
}

/// Writes a config file for a node and returns its path.
pub fn config_file(dir: &Path, toml: &str) -> PathBuf {
    let path = dir.join("node.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

impl Node {
    /// Starts `ringkv serve` and waits until it serves (or panics with its log).
    pub fn start(data_dir: &Path, ip: &str, extra: &[&str]) -> Self {
        let mut node = Self::spawn(data_dir, ip, extra);
        node.wait_serving(Duration::from_secs(60));
        node
    }

    /// Starts `ringkv serve` without waiting.
    pub fn spawn(data_dir: &Path, ip: &str, extra: &[&str]) -> Self {
        Self::spawn_with_env(data_dir, ip, extra, &[])
    }

    /// Starts `ringkv serve` with extra environment variables, without waiting.
    pub fn spawn_with_env(data_dir: &Path, ip: &str, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let ip: IpAddr = ip.parse().unwrap();
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--listen".into(),
            ip.to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let client_port = flag(extra, "--client-port").unwrap_or(7700);
        let redis_port = flag(extra, "--redis-port").unwrap_or(6380);
        let mut child = Command::new(BIN)
            .args(&args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ringkv");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, lines) = mpsc::channel();
        let log_in = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                log_in.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        Self {
            child: Some(child),
            ip,
            client_port,
            redis_port,
            data_dir: data_dir.to_owned(),
            config_path: None,
            log,
            lines,
        }
    }

    pub fn wait_serving(&mut self, deadline: Duration) {
        self.wait_for_line("ringkv node serving", deadline)
            .unwrap_or_else(|| panic!("node did not start:\n{}", self.log()));
    }

    /// Waits for a log line containing `needle`; None at the deadline or exit.
    pub fn wait_for_line(&mut self, needle: &str, deadline: Duration) -> Option<String> {
        let end = Instant::now() + deadline;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return Some(line),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    pub fn client_address(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.client_port)
    }

    pub fn client(&self) -> Client {
        Client::connect(
            self.client_address(),
            ClientOptions { timeout: Duration::from_secs(10), ..ClientOptions::default() },
        )
        .expect("connect to node")
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child by PID.
            unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
            let _ = child.wait();
        }
    }

    /// SIGTERM, and wait for the exit status (with a deadline).
    pub fn terminate(&mut self, deadline: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: signalling our own child by PID.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        wait_with_deadline(&mut child, deadline).unwrap_or_else(|| {
            let _ = child.kill();
            panic!("node did not stop within {deadline:?} after SIGTERM:\n{}", self.log())
        })
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        wait_with_deadline(&mut child, deadline).unwrap_or_else(|| {
            let _ = child.kill();
            panic!("node did not exit within {deadline:?}:\n{}", self.log())
        })
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn wait_with_deadline(child: &mut Child, deadline: Duration) -> Option<ExitStatus> {
    let end = Instant::now() + deadline;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= end {
            return None;
        }
        // Polling a child's exit: there is no std API to block with a deadline.
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn flag(args: &[&str], name: &str) -> Option<u16> {
    args.iter().position(|a| *a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok())
}

/// Runs the CLI and returns (success, stdout, stderr).
pub fn cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN).args(args).output().expect("run ringkv CLI");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs redis-cli; the suite needs it (apt-get install redis-tools).
pub fn redis_cli(address: SocketAddr, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .arg("-h")
        .arg(address.ip().to_string())
        .arg("-p")
        .arg(address.port().to_string())
        .args(args)
        .output()
        .expect("redis-cli is required by this test: apt-get install redis-tools");
    assert!(out.status.success(), "redis-cli {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    futures::executor::block_on(f)
}
