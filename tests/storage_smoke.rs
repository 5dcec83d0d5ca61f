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

/// The hints `close` writes for growing segments, each scanning only what
/// was written since the segment's previous hint, are byte for byte the
/// hints one scan of each whole segment writes; and a close with nothing
/// written since opening reads nothing.
#[test]
fn hints_written_in_steps_equal_hints_from_whole_scans() {
    use ringkv::storage::Disk;
    let config = StorageConfig { segment_bytes: 1 << 20, ..small_config(SyncMode::Group) };
    let hints = |disk: &SimDisk| -> Vec<(std::path::PathBuf, Vec<u8>)> {
        let paths = disk.files().into_iter().filter(|p| p.extension().is_some_and(|e| e == "hint"));
        paths.map(|p| (p.clone(), disk.contents(&p).expect("listed"))).collect()
    };
    // `round`: the writes to make (None: none); `reads_at_close`: whether
    // the close may read (it must not when the hints on disk cover all).
    let run = |disk: SimDisk, round: Option<u32>, reads_at_close: bool| -> (SimDisk, u64) {
        let exec = SimExecutor::new(disk.clone());
        let spawner = exec.spawner();
        let close_read_bytes = exec.block_on(async {
            let (store, bg) = ShardStore::open(disk.clone(), root(), config.clone(), LAYOUT).await.unwrap();
            spawner.spawn(bg);
            if let Some(round) = round {
                for i in round * 300..(round + 1) * 300 {
                    let key = format!("key-{}", i % 500);
                    let value = format!("value-{i}-").repeat((i % 7) as usize + 1);
                    store.put(i % 8, key.as_bytes(), value.as_bytes()).await.unwrap();
                    if i % 5 == 0 {
                        store.remove((i + 3) % 8, format!("key-{}", (i + 3) % 500).as_bytes()).await.unwrap();
                    }
                }
            }
            let (reads_before, read_bytes_before) = (disk.stats().reads, disk.stats().read_bytes);
            store.close().await.unwrap();
            if !reads_at_close {
                assert_eq!(disk.stats().reads, reads_before, "a close with nothing new read segment data");
            }
            disk.stats().read_bytes - read_bytes_before
        });
        (disk.clean_image(), close_read_bytes)
    };
    let mut disk = SimDisk::new();
    let mut last_step_read_bytes = 0;
    for round in 0..4 {
        (disk, last_step_read_bytes) = run(disk, Some(round), true);
    }
    let in_steps = hints(&disk);
    assert_eq!(in_steps.len(), 8, "one active segment per partition, each with a hint");
    disk = run(disk, None, false).0;
    assert_eq!(hints(&disk), in_steps, "a close with nothing new left the hints as they were");
    let exec = SimExecutor::new(disk.clone());
    exec.block_on(async {
        for (path, _) in &in_steps {
            disk.remove(path).await.unwrap();
        }
    });
    let (disk, whole_scan_read_bytes) = run(disk.clean_image(), None, true);
    assert_eq!(hints(&disk), in_steps, "hints from whole scans differ from hints written in steps");
    // The fourth close scanned about a quarter of the data, and read the
    // previous hints.
    assert!(
        last_step_read_bytes * 2 < whole_scan_read_bytes,
        "the last close read {last_step_read_bytes} bytes, one whole scan {whole_scan_read_bytes}"
    );
}
