//! The storage model checker shared by the simulated-disk and real-disk
//! suites: concurrent writers on disjoint keys, a chaos task (compaction,
//! checkpoints, reads), and a model of what every key may hold.
//!
//! Per key the model keeps its history since the last verified state: every
//! value ever attempted, and how many of those attempts were acknowledged.
//! After a reopen a key must hold the last acknowledged value or the one
//! that was in flight when the crash hit (`strict`, group mode), or any value
//! of its history (`prefix`, the modes that acknowledge before fdatasync).
//! A value that was never written, or wrong bytes, fail either way.

#![allow(dead_code)]

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use ringkv::config::{StorageConfig, SyncMode};
use ringkv::storage::{Disk, ShardStore, StorageError};

/// Logs to the test output when RUST_LOG is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off")),
        )
        .with_test_writer()
        .try_init();
}

/// A tiny configuration so that a few hundred operations seal segments,
/// recycle commit-log files and trigger compaction.
pub fn tiny_config(sync_mode: SyncMode) -> StorageConfig {
    StorageConfig {
        sync_mode,
        segment_bytes: 16 << 10,
        segment_write_bytes: 4 << 10,
        commit_log_file_bytes: 32 << 10,
        commit_log_files_max: 3,
        commit_batch_bytes_max: 12 << 10,
        key_bytes_max: 32,
        value_bytes_max: 512,
        write_buffer_bytes_max: 32 << 10,
        read_cache_bytes: 2 << 10,
        compaction_dead_ratio: 0.4,
        flush_interval_ms: 5,
        sync_interval_ms: 5,
        ..StorageConfig::default()
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Workload {
    pub writers: usize,
    pub ops_per_writer: usize,
    pub keys_per_writer: usize,
    pub partitions: u32,
    pub value_bytes_max: usize,
}

#[derive(Debug, Default)]
struct KeyHistory {
    /// values[0] is the verified state; each later entry an attempted write.
    values: Vec<Option<Vec<u8>>>,
    /// Index of the last acknowledged state.
    acked: usize,
}

#[derive(Default)]
pub struct Model {
    keys: BTreeMap<(u32, Vec<u8>), KeyHistory>,
    /// The disk stopped answering: later errors are expected.
    pub crashed: bool,
    pub acked_writes: u64,
}

/// Whether a recovered key may hold any value of its history or only the
/// last acknowledged one (or the one in flight).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    Strict,
    Prefix,
}

pub fn check_for(mode: SyncMode, closed_cleanly: bool) -> Check {
    if mode == SyncMode::Group || closed_cleanly {
        Check::Strict
    } else {
        Check::Prefix
    }
}

/// Checks every key against what the store holds now, then makes that the
/// verified state.
pub async fn verify_and_rebase<D: Disk>(model: &RefCell<Model>, store: &ShardStore<D>, check: Check, context: &str) {
    let keys: Vec<(u32, Vec<u8>)> = model.borrow().keys.keys().cloned().collect();
    for (partition, key) in keys {
        let got = store.get(partition, &key).await.unwrap_or_else(|e| panic!("{context}: get after recovery: {e}"));
        let got = got.map(|v| v.to_vec());
        let mut m = model.borrow_mut();
        let history = m.keys.get_mut(&(partition, key.clone())).expect("key");
        let allowed = match check {
            Check::Strict => &history.values[history.acked..],
            Check::Prefix => &history.values[..],
        };
        assert!(
            allowed.contains(&got),
            "{context}: partition {partition} key {:?} holds {:?}; allowed {:?} (acked index {} of {}; history since the last check, first the state then verified: {:?})",
            String::from_utf8_lossy(&key),
            got.as_ref().map(|v| String::from_utf8_lossy(v).into_owned()),
            allowed.iter().map(|v| v.as_ref().map(|v| String::from_utf8_lossy(v).into_owned())).collect::<Vec<_>>(),
            history.acked,
            history.values.len() - 1,
            history.values.iter().map(|v| v.as_ref().map(|v| String::from_utf8_lossy(v).into_owned())).collect::<Vec<_>>(),
        );
        history.values = vec![got];
        history.acked = 0;
    }
    // Nothing that was never written may appear.
    let m = model.borrow();
    for partition in store.partitions() {
        for key in store.keys(partition) {
            assert!(
                m.keys.contains_key(&(partition, key.clone())),
                "{context}: key {:?} in partition {partition} was never written",
                String::from_utf8_lossy(&key)
            );
        }
    }
}

fn value_for(key: &[u8], version: u64, len: usize, rng: &mut ChaCha8Rng) -> Vec<u8> {
    let mut v = format!("{}@{version}:", String::from_utf8_lossy(key)).into_bytes();
    while v.len() < len {
        v.push(rng.gen_range(b'a'..=b'z'));
    }
    v.truncate(len.max(8));
    v
}

/// Runs one round of the workload. Returns when every writer has finished
/// its operations or stopped at the first error after a crash.
pub async fn run_workload<D: Disk>(
    store: &ShardStore<D>,
    model: &Rc<RefCell<Model>>,
    workload: Workload,
    seed: u64,
    crashed: impl Fn() -> bool + Clone,
) {
    let mut tasks: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>> = Vec::new();
    for writer in 0..workload.writers {
        let store = store.clone();
        let model = model.clone();
        let crashed = crashed.clone();
        tasks.push(Box::pin(async move {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (writer as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            for op in 0..workload.ops_per_writer {
                let k = rng.gen_range(0..workload.keys_per_writer);
                let key = format!("w{writer}-k{k}").into_bytes();
                let partition = (k as u32 + writer as u32) % workload.partitions;
                let choice = rng.gen_range(0..100);
                if choice < 15 {
                    // Read-your-writes on our own key.
                    let got = store.get(partition, &key).await;
                    match got {
                        Ok(got) => {
                            let m = model.borrow();
                            if let Some(h) = m.keys.get(&(partition, key.clone())) {
                                assert_eq!(
                                    got.map(|v| v.to_vec()),
                                    h.values[h.acked],
                                    "read of own acknowledged write"
                                );
                            } else {
                                assert!(got.is_none());
                            }
                        }
                        Err(e) => {
                            assert!(crashed(), "read failed without a crash: {e}");
                            return;
                        }
                    }
                    continue;
                }
                let value = if choice < 30 {
                    None
                } else {
                    let len = rng.gen_range(8..=workload.value_bytes_max);
                    Some(value_for(&key, (seed << 16) + op as u64, len, &mut rng))
                };
                {
                    let mut m = model.borrow_mut();
                    let h = m
                        .keys
                        .entry((partition, key.clone()))
                        .or_insert_with(|| KeyHistory { values: vec![None], acked: 0 });
                    // Only one write per key is in flight (one writer per key).
                    assert_eq!(h.acked + 1, h.values.len());
                    h.values.push(value.clone());
                }
                let result = match &value {
                    Some(v) => store.put(partition, &key, v).await,
                    None => store.remove(partition, &key).await,
                };
                match result {
                    Ok(()) => {
                        let mut m = model.borrow_mut();
                        m.acked_writes += 1;
                        m.keys.get_mut(&(partition, key)).expect("entry").acked += 1;
                    }
                    Err(e) => {
                        assert!(crashed(), "write failed without a crash: {e}");
                        model.borrow_mut().crashed = true;
                        return;
                    }
                }
            }
        }));
    }
    // Chaos: compactions, checkpoints and reads of other writers' keys.
    let store_c = store.clone();
    let model_c = model.clone();
    let crashed_c = crashed.clone();
    tasks.push(Box::pin(async move {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xc4a0_5eed);
        for _ in 0..workload.ops_per_writer / 4 {
            let partition = rng.gen_range(0..workload.partitions);
            let result = match rng.gen_range(0..10) {
                0..=2 => store_c.compact(partition).await.map(|_| ()),
                3 => store_c.sync().await,
                _ => {
                    let keys: Vec<_> = model_c.borrow().keys.keys().cloned().collect();
                    if keys.is_empty() {
                        Ok(())
                    } else {
                        let (p, key) = keys[rng.gen_range(0..keys.len())].clone();
                        // Writes acknowledged while the read is in flight may
                        // or may not be seen: any value from the state
                        // acknowledged when the read began onwards is right.
                        let acked_at_start = model_c.borrow().keys[&(p, key.clone())].acked;
                        match store_c.get(p, &key).await {
                            Ok(got) => {
                                let got = got.map(|v| v.to_vec());
                                let m = model_c.borrow();
                                let h = &m.keys[&(p, key)];
                                assert!(
                                    h.values[acked_at_start..].contains(&got),
                                    "concurrent read saw a value never written, or one overwritten before it began"
                                );
                                Ok(())
                            }
                            Err(e) => Err(e),
                        }
                    }
                }
            };
            if let Err(e) = result {
                assert!(
                    crashed_c() || matches!(e, StorageError::StorageFull { .. }),
                    "chaos operation failed without a crash: {e}"
                );
                return;
            }
            super_yield().await;
        }
    }));
    futures::future::join_all(tasks).await;
}

/// A cooperative yield usable from test code on either executor.
pub fn super_yield() -> impl std::future::Future<Output = ()> {
    let mut yielded = false;
    std::future::poll_fn(move |cx| {
        if yielded {
            std::task::Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    })
}

/// Every partition scrubs clean.
pub async fn assert_verified<D: Disk>(store: &ShardStore<D>, context: &str) {
    for partition in store.partitions() {
        let report = store.verify(partition).await.unwrap_or_else(|e| panic!("{context}: verify: {e}"));
        assert!(report.errors.is_empty(), "{context}: partition {partition}: {:?}", report.errors);
        assert!(report.hint_mismatches.is_empty(), "{context}: partition {partition}: {:?}", report.hint_mismatches);
    }
}
