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
