//! Faults and bad input on the simulated disk: disk full, failed fsync,
//! foreign and future-version files, limits.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use ringkv::config::SyncMode;
use ringkv::storage::sim_disk::{SimDisk, SimExecutor, SimOp};
use ringkv::storage::{Disk, Health, ShardLayout, ShardStore, StorageError};

const LAYOUT: ShardLayout = ShardLayout { shard: 0, shard_count: 1, partition_count: 2 };

fn root() -> &'static Path {
    Path::new("/data")
}

fn key(i: u32) -> Vec<u8> {
    format!("key-{i}").into_bytes()
}

fn value(i: u32, round: u32) -> Vec<u8> {
    format!("value-{i}-{round}-{}", "v".repeat(40)).into_bytes()
}

/// Reopens after a crash and checks that each (key, value) is present.
fn assert_present_after_crash(disk: &SimDisk, seed: u64, expected: &[(Vec<u8>, Vec<u8>)]) {
    let image = disk.crash_image(seed);
    let exec = SimExecutor::new(image.clone());
    let spawner = exec.spawner();
    exec.block_on(async {
        let (store, bg) =
            ShardStore::open(image.clone(), root(), common::tiny_config(SyncMode::Group), LAYOUT).await.unwrap();
        spawner.spawn(bg);
        for (k, v) in expected {
            let got = store.get(0, k).await.unwrap();
            assert_eq!(got.as_deref(), Some(&v[..]), "acknowledged {:?} lost", String::from_utf8_lossy(k));
        }
    });
}

#[test]
fn disk_full_fails_writes_keeps_reads_and_recovers_without_restart() {
    let disk = SimDisk::new();
    let exec = SimExecutor::new(disk.clone());
    let spawner = exec.spawner();
    let acked = exec.block_on(async {
        let (store, bg) =
            ShardStore::open(disk.clone(), root(), common::tiny_config(SyncMode::Group), LAYOUT).await.unwrap();
        spawner.spawn(bg);
        let mut acked = Vec::new();
        for i in 0..50 {
            store.put(0, &key(i), &value(i, 0)).await.unwrap();
            acked.push((key(i), value(i, 0)));
        }
        // No more room for anything that grows a file.
        disk.set_capacity(Some(disk.used_bytes()));
        let mut full_errors = 0;
        for i in 50..400 {
            match store.put(0, &key(i), &value(i, 0)).await {
                Ok(()) => acked.push((key(i), value(i, 0))),
                Err(StorageError::StorageFull { .. }) => full_errors += 1,
                Err(e) => panic!("unexpected error while full: {e}"),
            }
        }
        assert!(full_errors > 0, "the disk never filled");
        assert!(matches!(store.health(), Health::Full { .. }), "{:?}", store.health());
        // Every acknowledged write is still readable, from memory or disk.
        for (k, v) in &acked {
            assert_eq!(store.get(0, k).await.unwrap().as_deref(), Some(&v[..]));
        }
        // Space comes back: writes resume by themselves (within the retry
        // interval of virtual time), no restart.
        disk.set_capacity(None);
        let mut resumed = false;
        for _ in 0..100 {
            match store.put(1, b"after", b"space is back").await {
                Ok(()) => {
                    resumed = true;
                    break;
                }
                Err(StorageError::StorageFull { .. }) => disk.sleep(Duration::from_millis(20)).await,
                Err(e) => panic!("unexpected error after space came back: {e}"),
            }
        }
        assert!(resumed, "writes did not resume after space came back");
        acked.push((b"after".to_vec(), b"space is back".to_vec()));
        assert!(matches!(store.health(), Health::Healthy));
        store.sync().await.unwrap();
        acked
    });
    // Acknowledged data survives a crash (partition 1's key too).
    let in_partition_0: Vec<_> = acked.iter().filter(|(k, _)| k != b"after").cloned().collect();
    assert_present_after_crash(&disk, 7, &in_partition_0);
}

#[test]
fn a_failed_fsync_makes_the_shard_refuse_writes_and_never_acknowledges_on_retry() {
    for target in ["commitlog", "partitions"] {
        let disk = SimDisk::new();
        let exec = SimExecutor::new(disk.clone());
        let spawner = exec.spawner();
        let acked = exec.block_on(async {
            let (store, bg) =
                ShardStore::open(disk.clone(), root(), common::tiny_config(SyncMode::Group), LAYOUT).await.unwrap();
            spawner.spawn(bg);
            let mut acked = Vec::new();
            for i in 0..20 {
                store.put(0, &key(i), &value(i, 0)).await.unwrap();
                acked.push((key(i), value(i, 0)));
            }
            disk.fail(SimOp::Fsync, Some(target), libc::EIO, 1);
            // Keep writing until the failed fsync surfaces.
            let mut failed_at = None;
            for i in 20..2000 {
                match store.put(0, &key(i), &value(i, 0)).await {
                    Ok(()) => acked.push((key(i), value(i, 0))),
                    Err(StorageError::Unhealthy { .. }) => {
                        failed_at = Some(i);
                        break;
                    }
                    Err(e) => panic!("{target}: unexpected error: {e}"),
                }
                if i % 50 == 0 {
                    // Checkpoints make segment fsyncs happen.
                    let _ = store.sync().await;
                }
            }
            let failed_at = failed_at.unwrap_or_else(|| panic!("{target}: the failed fsync never surfaced"));
            assert!(matches!(store.health(), Health::Unhealthy(_)), "{target}");
            // The next fsync would succeed, but the shard must not retry and
            // then acknowledge: writes stay refused.
            for i in 0..10 {
                let r = store.put(1, &key(10_000 + i), b"after the failure").await;
                assert!(matches!(r, Err(StorageError::Unhealthy { .. })), "{target}: {r:?}");
            }
            // Reads keep working.
            for (k, v) in &acked {
                assert_eq!(store.get(0, k).await.unwrap().as_deref(), Some(&v[..]), "{target}");
            }
            let _ = failed_at;
            acked
        });
        assert_present_after_crash(&disk, 3, &acked);
    }
}

/// A store with data, closed cleanly; returns the disk and a segment path.
fn closed_store() -> (SimDisk, PathBuf, PathBuf) {
    let disk = SimDisk::new();
    let exec = SimExecutor::new(disk.clone());
    let spawner = exec.spawner();
    exec.block_on(async {
        let (store, bg) =
            ShardStore::open(disk.clone(), root(), common::tiny_config(SyncMode::Group), LAYOUT).await.unwrap();
        spawner.spawn(bg);
        for i in 0..100 {
            store.put(0, &key(i), &value(i, 0)).await.unwrap();
        }
        store.close().await.unwrap();
    });
    let image = disk.crash_image(0);
    let files = image.files();
    let segment = files.iter().find(|p| p.extension().is_some_and(|e| e == "seg")).unwrap().clone();
    let log = files.iter().find(|p| p.extension().is_some_and(|e| e == "log")).unwrap().clone();
    (image, segment, log)
}

fn open_error(disk: &SimDisk) -> StorageError {
    let exec = SimExecutor::new(disk.clone());
    exec.block_on(async {
        match ShardStore::open(disk.clone(), root(), common::tiny_config(SyncMode::Group), LAYOUT).await {
            Ok(_) => panic!("a damaged file was accepted"),
            Err(e) => e,
        }
    })
}

/// Overwrites a file's header block with `f` applied to it, then re-seals
/// its CRC so only the intended field is wrong.
fn rewrite_header(disk: &SimDisk, path: &Path, f: impl Fn(&mut [u8])) {
    let mut bytes = disk.contents(path).unwrap();
    f(&mut bytes[..4096]);
    let crc = crc32fast::hash(&bytes[..4092]);
    bytes[4092..4096].copy_from_slice(&crc.to_le_bytes());
    for (i, (old, new)) in disk.contents(path).unwrap().iter().zip(&bytes).enumerate() {
        for bit in 0..8 {
            if (old ^ new) & (1 << bit) != 0 {
                disk.flip_bit(path, (i * 8 + bit) as u64);
            }
        }
    }
}

#[test]
fn files_of_another_format_are_refused_naming_the_file() {
    for (what, edit) in [
        ("bad magic", Box::new(|h: &mut [u8]| h[..8].copy_from_slice(b"NOTRINGK")) as Box<dyn Fn(&mut [u8])>),
        ("format version 2", Box::new(|h: &mut [u8]| h[8..10].copy_from_slice(&2u16.to_le_bytes()))),
    ] {
        let (disk, segment, log) = closed_store();
        for path in [&segment, &log] {
            let damaged = disk.clean_image();
            rewrite_header(&damaged, path, &edit);
            let error = open_error(&damaged);
            assert!(matches!(error, StorageError::BadFile { .. }), "{what}: {error}");
            let message = error.to_string();
            assert!(message.contains(&*path.to_string_lossy()), "{what}: message does not name the file: {message}");
            assert!(message.contains(what), "{what}: message does not say why: {message}");
        }
    }
}

#[test]
fn oversize_keys_and_values_are_rejected_before_anything_is_written() {
    let disk = SimDisk::new();
    let exec = SimExecutor::new(disk.clone());
    let spawner = exec.spawner();
    exec.block_on(async {
        let config = common::tiny_config(SyncMode::Group);
        let (store, bg) = ShardStore::open(disk.clone(), root(), config.clone(), LAYOUT).await.unwrap();
        spawner.spawn(bg);
        store.put(0, b"k", b"v").await.unwrap();
        let before = (disk.stats(), store.stats());
        let long_key = vec![b'k'; config.key_bytes_max + 1];
        let long_value = vec![b'v'; config.value_bytes_max + 1];
        assert!(matches!(
            store.put(0, &long_key, b"v").await,
            Err(StorageError::KeyTooLarge { len, limit }) if len == config.key_bytes_max + 1 && limit == config.key_bytes_max
        ));
        assert!(matches!(
            store.put(0, b"k", &long_value).await,
            Err(StorageError::ValueTooLarge { len, limit }) if len == config.value_bytes_max + 1 && limit == config.value_bytes_max
        ));
        assert!(matches!(store.put(0, b"", b"v").await, Err(StorageError::EmptyKey)));
        assert!(matches!(store.put(9, b"k", b"v").await, Err(StorageError::PartitionOutOfRange { .. })));
        assert_eq!((disk.stats(), store.stats()), before, "a rejected write touched the disk or the store");
        // Limits at exactly the maximum are accepted.
        let max_key = vec![b'k'; config.key_bytes_max];
        let max_value = vec![b'v'; config.value_bytes_max];
        store.put(0, &max_key, &max_value).await.unwrap();
        assert_eq!(store.get(0, &max_key).await.unwrap().as_deref(), Some(&max_value[..]));
        assert_eq!(store.get(0, b"k").await.unwrap().as_deref(), Some(&b"v"[..]));
    });
}
