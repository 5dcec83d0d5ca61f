//! Smoke tests of the storage engine on the simulated disk: the basic
//! operations in every sync mode, reopen, and seal/compaction paths.

use std::path::Path;

use ringkv::config::{StorageConfig, SyncMode};
use ringkv::storage::sim_disk::{SimDisk, SimExecutor};
use ringkv::storage::{ShardLayout, ShardStore};

fn small_config(sync_mode: SyncMode) -> StorageConfig {
    StorageConfig {
        sync_mode,
        segment_bytes: 16 << 10,
        segment_write_bytes: 8 << 10,
        commit_log_file_bytes: 64 << 10,
        commit_batch_bytes_max: 16 << 10,
        key_bytes_max: 64,
        value_bytes_max: 1024,
        write_buffer_bytes_max: 64 << 10,
        read_cache_bytes: 4 << 10,
        ..StorageConfig::default()
    }
}

const LAYOUT: ShardLayout = ShardLayout { shard: 0, shard_count: 1, partition_count: 8 };

fn root() -> &'static Path {
    Path::new("/data")
}

#[test]
fn put_get_remove_reopen_in_every_mode() {
    for mode in [SyncMode::Group, SyncMode::Interval, SyncMode::None] {
        let disk = SimDisk::new();
        let exec = SimExecutor::new(disk.clone());
        let config = small_config(mode);
        let spawner = exec.spawner();
        exec.block_on(async {
            let (store, bg) = ShardStore::open(disk.clone(), root(), config.clone(), LAYOUT).await.unwrap();
            spawner.spawn(bg);
            for i in 0..2000u32 {
                let key = format!("key-{i}");
                let value = format!("value-{i}-").repeat((i % 20) as usize + 1);
                store.put(i % 8, key.as_bytes(), value.as_bytes()).await.unwrap();
            }
            for i in (0..2000u32).step_by(3) {
                store.remove(i % 8, format!("key-{i}").as_bytes()).await.unwrap();
            }
            for i in 0..2000u32 {
                let got = store.get(i % 8, format!("key-{i}").as_bytes()).await.unwrap();
                let want = (i % 3 != 0).then(|| format!("value-{i}-").repeat((i % 20) as usize + 1));
                assert_eq!(got.as_deref(), want.as_deref().map(str::as_bytes), "{mode:?} key {i}");
            }
            store.close().await.unwrap();
            assert!(store.stats().segments_sealed > 0, "{mode:?}: {:?}", store.stats());
        });
        // Clean reopen.
        let disk2 = disk.crash_image(1);
        let exec = SimExecutor::new(disk2.clone());
        let spawner = exec.spawner();
        exec.block_on(async {
            let (store, bg) = ShardStore::open(disk2.clone(), root(), config.clone(), LAYOUT).await.unwrap();
            spawner.spawn(bg);
            for i in 0..2000u32 {
                let got = store.get(i % 8, format!("key-{i}").as_bytes()).await.unwrap();
                let want = (i % 3 != 0).then(|| format!("value-{i}-").repeat((i % 20) as usize + 1));
                assert_eq!(got.as_deref(), want.as_deref().map(str::as_bytes), "{mode:?} after reopen key {i}");
            }
            store.close().await.unwrap();
        });
    }
}

/// Many partitions each holding a partial write unit can together fill the
/// buffer budget; writers must not wait forever for a flush nobody starts.
#[test]
fn partial_tails_filling_the_budget_do_not_deadlock_writers() {
    let layout = ShardLayout { shard: 0, shard_count: 1, partition_count: 64 };
    let config = StorageConfig {
        segment_write_bytes: 64 << 10,
        write_buffer_bytes_max: 160 << 10,
        ..small_config(SyncMode::Group)
    };
    config.validate().unwrap();
    let disk = SimDisk::new();
    let exec = SimExecutor::new(disk.clone());
    let spawner = exec.spawner();
    exec.block_on(async {
        let (store, bg) = ShardStore::open(disk.clone(), root(), config, layout).await.unwrap();
        spawner.spawn(bg);
        let writers = (0..16u32).map(|w| {
            let store = store.clone();
            async move {
                for i in 0..300u32 {
                    let p = (w * 7 + i) % 64;
                    store.put(p, format!("w{w}-{i}").as_bytes(), &[b'x'; 100]).await.unwrap();
                }
            }
        });
        futures::future::join_all(writers).await;
        assert_eq!(store.stats().keys, 16 * 300);
        store.close().await.unwrap();
    });
}

/// A read that goes to the disk must not cache what it read if the key was
/// written while the read was in flight: the cache may only hold the
/// value the index points at.
#[test]
fn a_read_racing_a_write_never_leaves_the_old_value_cached() {
    let config = small_config(SyncMode::None);
    let disk = SimDisk::new();
    let exec = SimExecutor::new(disk.clone());
    exec.block_on(async {
        let (store, bg) = ShardStore::open(disk.clone(), root(), config.clone(), LAYOUT).await.unwrap();
        exec.spawner().spawn(bg);
        store.put(1, b"k", b"old").await.unwrap();
        store.close().await.unwrap();
    });
    // Reopened: the cache is empty, so the read below goes to the disk.
    let disk = disk.clean_image();
    let exec = SimExecutor::new(disk.clone());
    exec.block_on(async {
        let (store, bg) = ShardStore::open(disk.clone(), root(), config.clone(), LAYOUT).await.unwrap();
        exec.spawner().spawn(bg);
        disk.set_read_yields(3);
        let reads_before = disk.stats().reads;
        let read = async { store.get(1, b"k").await.unwrap().map(|v| v.to_vec()) };
        let write = async {
            ringkv::storage::sync::yield_now().await;
            store.put(1, b"k", b"new").await.unwrap();
        };
        let (seen, ()) = futures::join!(read, write);
        // The interleaving happened: the read began before the write.
        assert_eq!(seen.as_deref(), Some(&b"old"[..]));
        assert!(disk.stats().reads > reads_before, "the read went to the disk");
        let now = store.get(1, b"k").await.unwrap();
        assert_eq!(now.as_deref(), Some(&b"new"[..]), "a stale value was cached over the write");
        store.close().await.unwrap();
    });
}
