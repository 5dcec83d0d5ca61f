//! Every single-bit flip in a durable segment is detected: opening refuses
//! the file (header block), or scrubbing reports the record, and no read
//! ever returns wrong bytes (a read returns the right value or `Corrupt`).

mod common;

use std::path::{Path, PathBuf};

use ringkv::config::{StorageConfig, SyncMode};
use ringkv::storage::sim_disk::{SimDisk, SimExecutor};
use ringkv::storage::{ShardLayout, ShardStore, StorageError};

const LAYOUT: ShardLayout = ShardLayout { shard: 0, shard_count: 1, partition_count: 1 };

fn config() -> StorageConfig {
    StorageConfig { compaction_dead_ratio: 0.3, ..common::tiny_config(SyncMode::Group) }
}

fn expected() -> Vec<(Vec<u8>, Vec<u8>)> {
    (0..12u32)
        .map(|i| (format!("key-{i}").into_bytes(), format!("value-{i}-{}", "x".repeat(i as usize * 3)).into_bytes()))
        .collect()
}

/// A disk whose partition 0 holds a sealed, hinted segment with every key of
/// `expected()` live (plus dead records), followed by filler segments.
fn prepared_disk() -> (SimDisk, PathBuf) {
    let disk = SimDisk::new();
    let exec = SimExecutor::new(disk.clone());
    let spawner = exec.spawner();
    exec.block_on(async {
        let (store, bg) = ShardStore::open(disk.clone(), Path::new("/data"), config(), LAYOUT).await.unwrap();
        spawner.spawn(bg);
        for (key, value) in expected() {
            store.put(0, &key, b"an older value, dead once overwritten").await.unwrap();
            store.put(0, &key, &value).await.unwrap();
        }
        store.remove(0, b"key-gone").await.unwrap();
        // Filler until the first segment is sealed.
        for i in 0..400u32 {
            store.put(0, format!("filler-{i}").as_bytes(), &[b'f'; 40]).await.unwrap();
        }
        store.close().await.unwrap();
    });
    let image = disk.crash_image(0);
    // The sealed segment (its hint covers it all) holding the keys.
    let holds = |p: &PathBuf| image.contents(p).is_some_and(|c| c.windows(6).any(|w| w == b"key-11"));
    let sealed_hint = |p: &PathBuf| {
        image.contents(&p.with_extension("hint")).is_some_and(|h| u16::from_le_bytes([h[10], h[11]]) & 1 == 1)
    };
    let sealed = image
        .files()
        .into_iter()
        .filter(|p| ringkv::storage::recovery::is_segment_path(p))
        .filter(sealed_hint)
        .find(holds)
        .unwrap_or_else(|| panic!("no sealed segment holds the keys: {:?}", image.files()));
    assert!(image.contents(&sealed).unwrap().len() >= 8192, "segment too small to test");
    (image, sealed)
}

/// How a flip was caught.
#[derive(Debug, Default)]
struct Caught {
    refused_at_open: u64,
    skipped_at_recovery: u64,
    read_error: u64,
    scrub: u64,
}

/// Opens the damaged disk and says whether the damage was detected.
fn detected(disk: SimDisk, segment: &Path, caught: &mut Caught) -> bool {
    let exec = SimExecutor::new(disk.clone());
    let spawner = exec.spawner();
    exec.block_on(async {
        let (store, bg) = match ShardStore::open(disk.clone(), Path::new("/data"), config(), LAYOUT).await {
            Ok(opened) => opened,
            Err(StorageError::BadFile { path, .. }) => {
                assert_eq!(path, segment, "refusal names another file");
                caught.refused_at_open += 1;
                return true;
            }
            Err(e) => panic!("open failed in an unexpected way: {e}"),
        };
        spawner.spawn(bg);
        let mut found = store.stats().recovery_corrupt_records > 0;
        caught.skipped_at_recovery += u64::from(found);
        for (key, value) in expected() {
            match store.get(0, &key).await {
                Ok(Some(got)) => {
                    assert_eq!(&*got, &value[..], "wrong bytes served for {:?}", String::from_utf8_lossy(&key))
                }
                Ok(None) => found = true, // skipped as corrupt during recovery
                Err(StorageError::Corrupt { path, .. }) => {
                    assert_eq!(path, segment);
                    caught.read_error += 1;
                    found = true;
                }
                Err(e) => panic!("unexpected read error: {e}"),
            }
        }
        let report = store.verify(0).await.unwrap();
        caught.scrub += u64::from(!report.errors.is_empty());
        found || !report.errors.is_empty()
    })
}

#[test]
fn every_bit_flip_in_a_sealed_segment_is_detected() {
    let (disk, segment) = prepared_disk();
    let len = disk.contents(&segment).unwrap().len() as u64;
    let mut undetected = Vec::new();
    let mut caught = Caught::default();
    for bit in 0..len * 8 {
        let damaged = disk.clean_image();
        damaged.flip_bit(&segment, bit);
        if !detected(damaged, &segment, &mut caught) {
            undetected.push(bit);
        }
    }
    eprintln!("{} bits of {}: {caught:?}", len * 8, segment.display());
    // Each way of catching damage was exercised: the header block is
    // refused, live records fail their reads, dead bytes fail the scrub.
    assert_eq!(caught.refused_at_open, 4096 * 8);
    assert!(caught.read_error > 0 && caught.scrub >= len * 8 - 4096 * 8);
    assert!(
        undetected.is_empty(),
        "{} of {} flips undetected, first at bits {:?}",
        undetected.len(),
        len * 8,
        &undetected[..undetected.len().min(10)]
    );
}

#[test]
fn bit_flips_are_detected_without_the_hint_file_too() {
    let (disk, segment) = prepared_disk();
    let len = disk.contents(&segment).unwrap().len() as u64;
    let hint = segment.with_extension("hint");
    let mut undetected = Vec::new();
    let mut caught = Caught::default();
    // Every 13th bit: recovery scans the whole segment here.
    for bit in (0..len * 8).step_by(13) {
        let damaged = disk.clean_image();
        damaged.flip_bit(&segment, bit);
        let exec = SimExecutor::new(damaged.clone());
        exec.block_on(async { ringkv::storage::Disk::remove(&damaged, &hint).await.unwrap() });
        if !detected(damaged, &segment, &mut caught) {
            undetected.push(bit);
        }
    }
    eprintln!("without hints: {caught:?}");
    assert!(caught.skipped_at_recovery > 0);
    assert!(
        undetected.is_empty(),
        "{} flips undetected, first at bits {:?}",
        undetected.len(),
        &undetected[..undetected.len().min(10)]
    );
}
