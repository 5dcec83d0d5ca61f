//! The model suite on the real disk: glommio DMA files under target/ (not
//! tmpfs, where O_DIRECT is silently off). Each cycle runs in its own
//! executor; a cycle ends with `close`, or by dropping the executor with
//! the store open (the process dies: buffers are lost, nothing is synced),
//! and the next cycle reopens and checks every key against the model.

mod common;

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use common::{assert_verified, check_for, run_workload, tiny_config, verify_and_rebase, Model, Workload};
use glommio::{LocalExecutorBuilder, Placement};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use ringkv::config::{StorageConfig, SyncMode};
use ringkv::runtime::{spawn_detached, DmaDisk};
use ringkv::storage::data_dir::DataDir;
use ringkv::storage::{ShardLayout, ShardStore};

const LAYOUT: ShardLayout = ShardLayout { shard: 0, shard_count: 1, partition_count: 4 };

fn scratch_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("real-disk-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("tempdir under target/")
}

/// Runs `f` on a fresh glommio executor thread and returns its result.
fn on_executor<T: Send + 'static>(
    f: impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>> + Send + 'static,
) -> T {
    LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(1 << 20)
        .spawn(f)
        .expect("executor starts")
        .join()
        .expect("executor thread")
}

/// Model state crossing executor threads (each cycle runs on its own).
struct Carried {
    model: Model,
    closed_cleanly: bool,
}

fn run_real_sequence(seed: u64, mode: SyncMode, config: StorageConfig, cycles: usize) {
    let dir = scratch_dir();
    let root: PathBuf = dir.path().to_owned();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let carried =
        std::sync::Arc::new(std::sync::Mutex::new(Some(Carried { model: Model::default(), closed_cleanly: true })));
    for cycle in 0..=cycles {
        let last = cycle == cycles;
        let close_at_end = last || rng.gen_bool(0.5);
        let workload = Workload {
            writers: rng.gen_range(1..=6),
            ops_per_writer: if last { 0 } else { rng.gen_range(20..=120) },
            keys_per_writer: rng.gen_range(1..=20),
            partitions: LAYOUT.partition_count,
            value_bytes_max: if rng.gen_bool(0.3) { config.value_bytes_max } else { 64 },
        };
        let workload_seed: u64 = rng.gen();
        let context = format!("real disk seed {seed} {mode:?} cycle {cycle}");
        let data_dir = DataDir::open(&root, LAYOUT.shard_count, LAYOUT.partition_count).expect("data dir");
        let marker = data_dir.marker_path();
        let carried_in = carried.clone();
        let root_in = root.clone();
        let config_in = config.clone();
        on_executor(move || {
            Box::pin(async move {
                let Carried { model, closed_cleanly } = carried_in.lock().unwrap().take().expect("model");
                let model = Rc::new(RefCell::new(model));
                DmaDisk::prime(&marker).await.expect("prime");
                let (store, background) = ShardStore::open(DmaDisk::default(), &root_in, config_in, LAYOUT)
                    .await
                    .unwrap_or_else(|e| panic!("{context}: open: {e}"));
                spawn_detached(background);
                verify_and_rebase(&model, &store, check_for(mode, closed_cleanly), &context).await;
                assert_verified(&store, &context).await;
                run_workload(&store, &model, workload, workload_seed, || false).await;
                if close_at_end {
                    store.close().await.unwrap_or_else(|e| panic!("{context}: close: {e}"));
                }
                // Without close, returning drops the executor and with it
                // every buffer and task: a process crash.
                let model = Rc::try_unwrap(model).ok().expect("model uniquely owned").into_inner();
                *carried_in.lock().unwrap() = Some(Carried { model, closed_cleanly: close_at_end });
            })
        });
        // The lock's descriptor is the directory's own; it goes first.
        drop(data_dir);
        if !close_at_end {
            close_descriptors_of_a_crash(&root);
        }
    }
}

/// After a simulated crash: closes the files the dropped store left open.
/// glommio closes a dropped file on a later I/O cycle, which an ended
/// executor never runs, so each crash leaked ~60 descriptors and long bug
/// hunts ran out of them after ~340 sequences; a real crash ends the
/// process and the kernel closes them. Nothing owns these descriptors any
/// more (their executor thread has ended), so closing them is safe.
/// (glommio 0.9 also leaves each ended executor's eventfd open, and after
/// some crashes its three rings: ~10 descriptors per sequence, which are
/// not ours to close while other tests' executors run in this process.)
fn close_descriptors_of_a_crash(root: &Path) {
    for (fd, _) in descriptors_under(root) {
        // SAFETY: `fd` is open on a file under this sequence's own
        // directory, and its owner (the crashed executor) is gone.
        unsafe { libc::close(fd) };
    }
    assert!(descriptors_open_under(root).is_empty(), "descriptors still open under {}", root.display());
}

#[test]
fn model_suite_on_the_real_disk_in_every_mode() {
    for (i, mode) in [SyncMode::Group, SyncMode::Interval, SyncMode::None].into_iter().enumerate() {
        let sequences = std::env::var("RINGKV_REAL_SEQUENCES").ok().and_then(|v| v.parse().ok()).unwrap_or(3u64);
        for seed in 0..sequences {
            run_real_sequence(seed + 100 * i as u64, mode, tiny_config(mode), 5);
        }
    }
}

#[test]
fn model_suite_on_the_real_disk_with_default_sizes() {
    let config = StorageConfig { key_bytes_max: 32, value_bytes_max: 4096, ..StorageConfig::default() };
    run_real_sequence(7, SyncMode::Group, config, 4);
}

#[test]
fn a_second_process_cannot_open_a_locked_data_directory() {
    let dir = scratch_dir();
    let first = DataDir::open(dir.path(), 1, 4).unwrap();
    let err = DataDir::open(dir.path(), 1, 4).unwrap_err();
    assert!(err.to_string().contains("in use by another process"), "{err}");
    drop(first);
    let _ = Path::new(dir.path());
}

/// Descriptors of this process open on files under `dir` (other tests of
/// this binary run in parallel, so only the directory's own count).
fn descriptors_open_under(dir: &Path) -> Vec<PathBuf> {
    descriptors_under(dir).into_iter().map(|(_, target)| target).collect()
}

/// This process's descriptors open on files under `dir`, with their targets.
fn descriptors_under(dir: &Path) -> Vec<(i32, PathBuf)> {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let target = std::fs::read_link(entry.path()).ok()?;
            let fd = entry.file_name().to_str()?.parse().ok()?;
            target.starts_with(dir).then_some((fd, target))
        })
        .collect()
}

/// A store closed with `close` leaves no descriptor open, even though its
/// executor ends right after (files dropped instead would wait for an I/O
/// cycle that never comes). Each mode writes enough to seal segments, write
/// hints, recycle log files and compact.
#[test]
fn a_closed_store_leaves_no_file_open() {
    for mode in [SyncMode::Group, SyncMode::Interval, SyncMode::None] {
        let dir = scratch_dir();
        let root: PathBuf = dir.path().to_owned();
        let model = std::sync::Arc::new(std::sync::Mutex::new(Some(Model::default())));
        for cycle in 0..3u64 {
            let data_dir = DataDir::open(&root, LAYOUT.shard_count, LAYOUT.partition_count).expect("data dir");
            let marker = data_dir.marker_path();
            let (root_in, model_in) = (root.clone(), model.clone());
            let context = format!("{mode:?} cycle {cycle}");
            on_executor(move || {
                Box::pin(async move {
                    let model = Rc::new(RefCell::new(model_in.lock().unwrap().take().expect("model")));
                    DmaDisk::prime(&marker).await.expect("prime");
                    let (store, background) = ShardStore::open(DmaDisk::default(), &root_in, tiny_config(mode), LAYOUT)
                        .await
                        .unwrap_or_else(|e| panic!("{context}: open: {e}"));
                    spawn_detached(background);
                    verify_and_rebase(&model, &store, check_for(mode, true), &context).await;
                    let workload = Workload {
                        writers: 4,
                        ops_per_writer: 150,
                        keys_per_writer: 10,
                        partitions: LAYOUT.partition_count,
                        value_bytes_max: 256,
                    };
                    run_workload(&store, &model, workload, cycle, || false).await;
                    store.close().await.unwrap_or_else(|e| panic!("{context}: close: {e}"));
                    let model = Rc::try_unwrap(model).ok().expect("model uniquely owned").into_inner();
                    *model_in.lock().unwrap() = Some(model);
                })
            });
            drop(data_dir);
            let open = descriptors_open_under(&root);
            assert!(open.is_empty(), "{mode:?} cycle {cycle}: files left open after close: {open:#?}");
        }
    }
}
