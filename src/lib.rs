//! ringkv: a Dynamo-style, highly available key-value store built as a
//! thread-per-core engine on glommio and io_uring.
//!
//! # Codemap
//!
//! - `storage/`: the only code that knows disk layouts. One `ShardStore` per
//!   core owns that core's partition replicas: per-shard commit log with
//!   group commit, per-partition segment files, in-memory index, recovery,
//!   compaction. All I/O goes through the `storage::Disk` seam.
//! - `runtime/`: the only code that calls glommio (spawn, timers, DMA disk).
//! - `config`: every knob, with units in names and relations validated.
//! - `verify`: `ringkv verify`, the offline check of a stopped node's data
//!   directory (every record of every segment read back and checked).
//!
//! # Invariants
//!
//! 1. A partition's bytes and index are touched only by the shard that owns
//!    it (`p % shard_count == shard`); no locks, no shared mutable state.
//! 2. Every buffer and queue is bounded (`write_buffer_bytes_max`,
//!    `commit_batch_bytes_max`, `read_cache_bytes`, ...).
//! 3. An acknowledged write is durable per the sync mode before the ack;
//!    in `group` mode it is invisible until durable.
//! 4. No block that holds acknowledged data is ever rewritten.
//! 5. Among records for one key, the highest lsn wins; lsns are never reused
//!    (each recovery starts a new epoch).
//! 6. Wall-clock time never orders data.

pub mod balance;
pub mod client;
pub mod config;
pub mod logic;
pub mod node;
pub mod outbox;
pub mod protocol;
pub mod redis;
pub mod runtime;
pub mod server;
pub mod shard;
pub mod storage;
pub mod verify;
