//! Configuration: every knob with its unit in its name, its default, and the
//! relations between knobs checked once at startup (`validate`). The
//! documented copy of every default is `tuning/default.toml`; a unit test
//! keeps the two identical.

use serde::{Deserialize, Serialize};

use crate::storage::format::{record_len, BLOCK_BYTES, FILE_HEADER_BYTES, KEY_BYTES_LIMIT, SEGMENT_BYTES_LIMIT};

/// When a write is acknowledged relative to its fdatasync.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// Ack after the commit-log batch holding the write is fdatasync'ed; many
    /// writes share one write and one fdatasync.
    Group,
    /// Ack at once; the commit log is written every batch and fdatasync'ed every
    /// `sync_interval_ms`. A power loss loses at most that window.
    Interval,
    /// Ack at once; no commit log, no fdatasync except when a segment is
    /// sealed. Partition buffers are written at least every
    /// `flush_interval_ms`; a crash of the process or the host loses up to that.
    None,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub sync_mode: SyncMode,
    /// `interval` mode: time between commit-log fdatasyncs.
    pub sync_interval_ms: u64,
    /// `none` mode: longest time a partition's buffered records stay in memory only.
    pub flush_interval_ms: u64,
    /// A partition's active segment is sealed when it reaches this size.
    pub segment_bytes: u64,
    /// A busy partition's buffer is written in appends of this size (each
    /// partition's buffer starts small and grows to it while it fills
    /// between flushes).
    pub segment_write_bytes: usize,
    /// Segment files are grown by fallocate in steps of this size, ahead of
    /// the writes (0: no preallocation).
    pub segment_preallocate_bytes: u64,
    /// Per shard: bytes of records buffered for partition segments before
    /// writers wait for the disk.
    pub write_buffer_bytes_max: usize,
    /// Size of each preallocated, recycled commit-log file.
    pub commit_log_file_bytes: u64,
    /// Commit-log files per shard; when all are in use, the partitions holding
    /// up the oldest one are synced so it can be recycled.
    pub commit_log_files_max: usize,
    /// Largest commit-log batch (one write + one fdatasync).
    pub commit_batch_bytes_max: usize,
    /// Per shard: cache of recently read values.
    pub read_cache_bytes: usize,
    /// Also cache values as they are written (write-through), so that
    /// recently written values, and the version sets a read-modify-write
    /// reads back, come from memory.
    pub cache_writes: bool,
    pub key_bytes_max: usize,
    pub value_bytes_max: usize,
    /// A sealed segment is compacted when this fraction of its bytes is dead.
    pub compaction_dead_ratio: f64,
    /// Most segments merged by one compaction.
    pub compaction_inputs_max: usize,
    /// After ENOSPC, how often writing is retried.
    pub disk_full_retry_ms: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            sync_mode: SyncMode::Group,
            sync_interval_ms: 100,
            flush_interval_ms: 50,
            segment_bytes: 64 << 20,
            segment_write_bytes: 1 << 20,
            segment_preallocate_bytes: 8 << 20,
            write_buffer_bytes_max: 64 << 20,
            commit_log_file_bytes: 64 << 20,
            commit_log_files_max: 4,
            commit_batch_bytes_max: 32 << 20,
            read_cache_bytes: 64 << 20,
            cache_writes: true,
            key_bytes_max: 4096,
            value_bytes_max: 16 << 20,
            compaction_dead_ratio: 0.5,
            compaction_inputs_max: 16,
            disk_full_retry_ms: 100,
        }
    }
}

/// The whole configuration file (`tuning/default.toml` documents it).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub node: NodeConfig,
    pub storage: StorageConfig,
}

impl Config {
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.node.validate()?;
        self.storage.validate()?;
        let node = &self.node;
        require(node.value_bytes_max < self.storage.value_bytes_max, "node.value_bytes_max", || {
            "must be below storage.value_bytes_max (a stored object holds a value plus its version data)".into()
        })?;
        require(self.storage.key_bytes_max <= crate::storage::format::KEY_BYTES_LIMIT, "storage.key_bytes_max", || {
            "keys travel with a u16 length".into()
        })
    }

    /// Largest request frame body a client may send.
    pub fn request_body_bytes_max(&self) -> u32 {
        let limit = self.node.value_bytes_max + self.storage.key_bytes_max + self.node.context_bytes_max + 64;
        u32::try_from(limit.max(self.node.batch_bytes_max)).expect("limits are validated to be small")
    }

    /// Largest response frame body a node sends (a whole stored object).
    pub fn response_body_bytes_max(&self) -> u32 {
        u32::try_from(self.storage.value_bytes_max + (1 << 20)).expect("limits are validated to be small")
    }
}

/// The node: where it listens, how many shards, client-facing limits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    pub data_dir: std::path::PathBuf,
    pub listen_address: std::net::IpAddr,
    /// Any shard accepts here; shard s also listens on client_port + 1 + s.
    pub client_port: u16,
    /// Redis-protocol port; 0 turns it off.
    pub redis_port: u16,
    /// Executors (one per core); 0 = one per available CPU.
    pub shards: u32,
    /// Q: fixed, equal partitions of the ring, chosen when the data
    /// directory is created (a power of two).
    pub partition_count: u32,
    /// Client write path: largest value.
    pub value_bytes_max: usize,
    /// Client write path: a write that would leave more siblings is refused.
    pub siblings_max: usize,
    pub context_bytes_max: usize,
    /// Largest BATCH request body.
    pub batch_bytes_max: usize,
    pub connections_max_per_shard: usize,
    /// A connection that stops mid-frame for this long is closed.
    pub read_timeout_ms: u64,
    /// On SIGTERM/SIGINT: how long in-flight requests get to finish.
    pub drain_timeout_ms: u64,
    /// Per shard: memory glommio registers with io_uring (counts against
    /// `ulimit -l`; allocations beyond it come from the heap).
    pub io_memory_bytes: usize,
    /// Busy-poll this long before an idle shard sleeps, yielding the CPU to
    /// other runnable threads on each turn (no sleep and wake-up for work
    /// that comes within it; costs up to this much CPU per sleep).
    pub spin_before_park_us: u64,
    /// Bounded queue of request batches into each shard from the others.
    pub peer_queue_batches: usize,
    /// Replies of different connections that leave together (see
    /// `outbox`): a finished reply waits until this many are ready or the
    /// shard has nothing else to run. 1 sends each reply at once.
    pub reply_burst_max: usize,
    /// How often each shard measures how long it waits for its CPU (see
    /// `balance`); 0 turns connection balancing off.
    pub connection_balance_interval_ms: u64,
    /// A shard waiting for its CPU at least this share of the time (per
    /// mille), and more than twice as long as another shard, hands idle
    /// Redis connections to that shard.
    pub connection_balance_wait_permille: u32,
    /// Only a connection whose last turn ran at least this many key
    /// operations (pipelined or multi-key commands) moves.
    pub connection_balance_operations_min: usize,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            data_dir: "ringkv-data".into(),
            listen_address: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            client_port: 7700,
            redis_port: 6380,
            shards: 0,
            partition_count: 256,
            value_bytes_max: 1 << 20,
            siblings_max: 16,
            context_bytes_max: 64 << 10,
            batch_bytes_max: 4 << 20,
            connections_max_per_shard: 1024,
            read_timeout_ms: 10_000,
            drain_timeout_ms: 5_000,
            io_memory_bytes: 1 << 20,
            spin_before_park_us: 30,
            peer_queue_batches: 256,
            reply_burst_max: 8,
            connection_balance_interval_ms: 100,
            connection_balance_wait_permille: 100,
            connection_balance_operations_min: 8,
        }
    }
}

impl NodeConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        require(
            self.partition_count.is_power_of_two() && self.partition_count <= 1 << 16,
            "node.partition_count",
            || "must be a power of two, at most 65536".into(),
        )?;
        require(self.shards <= 256, "node.shards", || "at most 256".into())?;
        require(self.client_port != 0, "node.client_port", || "must be set".into())?;
        require(self.siblings_max >= 1, "node.siblings_max", || "must be at least 1".into())?;
        require(self.connections_max_per_shard >= 1, "node.connections_max_per_shard", || "must be at least 1".into())?;
        require(self.peer_queue_batches >= 1, "node.peer_queue_batches", || "must be at least 1".into())?;
        require(self.reply_burst_max >= 1, "node.reply_burst_max", || "must be at least 1".into())?;
        require(self.read_timeout_ms >= 1, "node.read_timeout_ms", || "must be at least 1".into())?;
        require(self.connection_balance_wait_permille <= 1000, "node.connection_balance_wait_permille", || {
            "a share of the time: at most 1000".into()
        })?;
        require(self.value_bytes_max >= 1 && self.value_bytes_max <= 64 << 20, "node.value_bytes_max", || {
            "must be 1..=64 MiB".into()
        })
    }
}

/// A configuration that cannot work, with the knob and the reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {knob}: {reason}")]
pub struct ConfigError {
    pub knob: &'static str,
    pub reason: String,
}

fn require(ok: bool, knob: &'static str, reason: impl FnOnce() -> String) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError { knob, reason: reason() })
    }
}

impl StorageConfig {
    /// Bytes of the largest record the limits allow.
    pub fn record_bytes_max(&self) -> usize {
        record_len(self.key_bytes_max, self.value_bytes_max)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let block = BLOCK_BYTES as u64;
        require(self.key_bytes_max >= 1 && self.key_bytes_max <= KEY_BYTES_LIMIT, "key_bytes_max", || {
            format!("must be 1..={KEY_BYTES_LIMIT} (keys are stored with a u16 length)")
        })?;
        require(self.value_bytes_max <= 256 << 20, "value_bytes_max", || "must be at most 256 MiB".into())?;
        let record_max = self.record_bytes_max() as u64;
        require(
            self.segment_write_bytes.is_multiple_of(BLOCK_BYTES) && self.segment_write_bytes >= BLOCK_BYTES,
            "segment_write_bytes",
            || format!("must be a non-zero multiple of {BLOCK_BYTES}"),
        )?;
        require(
            self.segment_bytes <= SEGMENT_BYTES_LIMIT
                && self.segment_bytes >= FILE_HEADER_BYTES as u64 + record_max + 2 * block,
            "segment_bytes",
            || format!("must hold the largest record ({record_max} bytes) and be at most {SEGMENT_BYTES_LIMIT}"),
        )?;
        require(
            self.commit_batch_bytes_max as u64 >= record_max + 2 * block
                && self.commit_batch_bytes_max.is_multiple_of(BLOCK_BYTES),
            "commit_batch_bytes_max",
            || {
                format!("must be a multiple of {BLOCK_BYTES} holding the largest record ({record_max} bytes) plus two blocks")
            },
        )?;
        require(
            self.commit_log_file_bytes.is_multiple_of(block)
                && self.commit_log_file_bytes >= FILE_HEADER_BYTES as u64 + self.commit_batch_bytes_max as u64,
            "commit_log_file_bytes",
            || "must be a multiple of 4096 holding the header and one full batch".into(),
        )?;
        require(self.segment_preallocate_bytes.is_multiple_of(block), "segment_preallocate_bytes", || {
            format!("must be a multiple of {BLOCK_BYTES}")
        })?;
        require(self.commit_log_files_max >= 2, "commit_log_files_max", || {
            "must be at least 2 (one written, one being checkpointed)".into()
        })?;
        require(
            self.write_buffer_bytes_max as u64 >= record_max + self.segment_write_bytes as u64,
            "write_buffer_bytes_max",
            || "must hold one partition write unit and the largest record".into(),
        )?;
        require(
            self.compaction_dead_ratio > 0.0 && self.compaction_dead_ratio <= 1.0,
            "compaction_dead_ratio",
            || "must be in (0, 1]".into(),
        )?;
        require(
            (1..=crate::storage::format::SUPERSEDES_MAX).contains(&self.compaction_inputs_max),
            "compaction_inputs_max",
            || format!("must be 1..={}", crate::storage::format::SUPERSEDES_MAX),
        )?;
        require(self.sync_interval_ms >= 1, "sync_interval_ms", || "must be at least 1".into())?;
        require(self.flush_interval_ms >= 1, "flush_interval_ms", || "must be at least 1".into())?;
        require(self.disk_full_retry_ms >= 1, "disk_full_retry_ms", || "must be at least 1".into())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tuning_default_toml_is_exactly_the_built_in_defaults() {
        let documented: Config = toml::from_str(include_str!("../tuning/default.toml")).unwrap();
        assert_eq!(documented, Config::default());
    }

    #[test]
    fn unknown_knobs_are_refused() {
        let err = toml::from_str::<Config>("[storage]\nsync_mode = \"group\"\nflush_ms = 3\n").unwrap_err();
        assert!(err.to_string().contains("flush_ms"), "{err}");
    }

    #[test]
    fn defaults_are_valid() {
        StorageConfig::default().validate().unwrap();
    }

    #[test]
    fn impossible_relations_are_refused_with_the_knob_named() {
        let config = StorageConfig { commit_batch_bytes_max: 64 << 10, ..StorageConfig::default() };
        assert_eq!(config.validate().unwrap_err().knob, "commit_batch_bytes_max");
        let config = StorageConfig { segment_bytes: 8 << 30, ..StorageConfig::default() };
        assert_eq!(config.validate().unwrap_err().knob, "segment_bytes");
    }
}
