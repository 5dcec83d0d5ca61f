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

/// A sealed segment with a damaged record and no hint file is scanned for a
/// hint, refused one (a damaged segment gets none: recovery must keep
/// scanning and reporting it), and then left alone: the maintenance task
/// must not rescan it over and over.
#[test]
fn a_damaged_segment_without_a_hint_is_not_rescanned_forever() {
    // No compaction: it would rewrite the damaged segment away.
    let config = StorageConfig { compaction_dead_ratio: 0.99, ..config() };
    let disk = SimDisk::new();
    let exec = SimExecutor::new(disk.clone());
    let spawner = exec.spawner();
    exec.block_on(async {
        let (store, bg) = ShardStore::open(disk.clone(), Path::new("/data"), config.clone(), LAYOUT).await.unwrap();
        spawner.spawn(bg);
        for i in 0..600u32 {
            store.put(0, format!("key-{i}").as_bytes(), &[b'v'; 40]).await.unwrap();
        }
        store.close().await.unwrap();
    });
    let first = PathBuf::from("/data/partitions/p-00000/seg-0000000000000001.seg");
    // Reopens without seg-1's hint, the segment damaged or not; returns the
    // reads made while 300 more keys are written, and the corrupt records
    // recovery found.
    let run = |flip: bool| {
        let image = disk.clean_image();
        assert!(image.contents(&first.with_extension("hint")).is_some(), "{:?}", image.files());
        if flip {
            image.flip_bit(&first, (4096 + 40) * 8);
        }
        let exec = SimExecutor::new(image.clone());
        exec.block_on(async { ringkv::storage::Disk::remove(&image, &first.with_extension("hint")).await.unwrap() });
        image.set_read_yields(1);
        let spawner = exec.spawner();
        let config = config.clone();
        exec.block_on(async {
            let (store, bg) = ShardStore::open(image.clone(), Path::new("/data"), config, LAYOUT).await.unwrap();
            spawner.spawn(bg);
            let corrupt = store.stats().recovery_corrupt_records;
            let reads_after_open = image.stats().reads;
            // Many turns for the maintenance task.
            for i in 0..300u32 {
                store.put(0, format!("late-{i}").as_bytes(), b"v").await.unwrap();
            }
            let reads = image.stats().reads - reads_after_open;
            store.close().await.unwrap();
            (reads, corrupt)
        })
    };
    let (clean_reads, clean_corrupt) = run(false);
    let (damaged_reads, damaged_corrupt) = run(true);
    assert_eq!((clean_corrupt, damaged_corrupt), (0, 1), "the flip was not where a record is");
    // Each hints seg-1 once (or refuses to); the damage adds no scans.
    assert!(
        damaged_reads <= clean_reads + 2,
        "{damaged_reads} reads with the damage against {clean_reads} without: the damaged segment is rescanned"
    );
}

/// A hint valid by its own checksum that leaves out a record (what a bug in
/// hint writing would leave) is reported by `verify`: recovery trusts
/// hints, so such a hint loses the record's key.
#[test]
fn verify_reports_a_hint_that_disagrees_with_its_segment() {
    use ringkv::storage::format::{HintEntries, HintHeader, FILE_HEADER_BYTES};
    let (disk, segment) = prepared_disk();
    let hint_path = segment.with_extension("hint");
    let bytes = disk.contents(&hint_path).expect("a hint");
    let mut header = HintHeader::decode(&bytes).unwrap();
    let entries = &bytes[FILE_HEADER_BYTES..FILE_HEADER_BYTES + header.entries_len as usize];
    let last_len = HintEntries::new(entries).map(|e| e.unwrap().encoded_len()).last().expect("entries");
    let kept = &entries[..entries.len() - last_len];
    header.entries_len = kept.len() as u64;
    header.entries_crc = crc32fast::hash(kept);
    header.entry_count -= 1;
    let mut forged = vec![0u8; FILE_HEADER_BYTES];
    header.encode(&mut forged);
    forged.extend_from_slice(kept);
    forged.resize(forged.len().next_multiple_of(4096), 0);
    let image = disk.clean_image();
    let exec = SimExecutor::new(image.clone());
    let spawner = exec.spawner();
    exec.block_on(async {
        use ringkv::storage::{Disk, DiskFile, OpenMode};
        Disk::remove(&image, &hint_path).await.unwrap();
        let file = image.open(&hint_path, OpenMode::CreateNew).await.unwrap();
        let mut buffer = image.alloc_buffer(forged.len());
        ringkv::storage::DiskBuffer::as_bytes_mut(&mut buffer).copy_from_slice(&forged);
        file.write_at(std::rc::Rc::new(buffer), 0).await.unwrap();
        file.fdatasync().await.unwrap();
        let (store, bg) = ShardStore::open(image.clone(), Path::new("/data"), config(), LAYOUT).await.unwrap();
        spawner.spawn(bg);
        let report = store.verify(0).await.unwrap();
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(report.hint_mismatches.len(), 1, "{report:?}");
        assert_eq!(report.hint_mismatches[0].0, hint_path);
        store.close().await.unwrap();
    });
}
