//! Crash loop: a real node (sync `group`) under concurrent write load is
//! killed with SIGKILL at random moments and restarted. After every restart
//! every acknowledged write is readable with its exact value, a write that
//! was in flight at the kill is either there or not, nothing that was never
//! written appears, and every value decodes (no corrupt bytes are served).
//!
//! Cycles: `RINGKV_CRASH_CYCLES` (default 25); the kill moments come from a
//! seeded RNG (`RINGKV_CRASH_SEED`), so a failing run can be replayed.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use support::{block_on, scratch, Node};

/// What a key may hold after a crash.
#[derive(Clone, Debug, Default)]
struct Allowed {
    /// The last acknowledged value (None: never acknowledged, or deleted).
    acked: Option<Vec<u8>>,
    /// Values whose write was in flight at the kill.
    maybe: Vec<Vec<u8>>,
}

type Model = Arc<Mutex<BTreeMap<Vec<u8>, Allowed>>>;

const COUNTERS: usize = 8;
const WRITERS: usize = 4;

fn verify(node: &Node, model: &Model, cycle: usize) {
    let keys: Vec<Vec<u8>> = model.lock().unwrap().keys().cloned().collect();
    let chunks: Vec<Vec<Vec<u8>>> = keys.chunks(keys.len().div_ceil(4).max(1)).map(|c| c.to_vec()).collect();
    std::thread::scope(|scope| {
        for chunk in chunks {
            let client = node.client();
            let model = model.clone();
            scope.spawn(move || {
                for key in chunk {
                    let got = block_on(client.get(&key)).unwrap_or_else(|e| panic!("cycle {cycle}: get: {e}"));
                    let siblings = got.map(|v| v.siblings).unwrap_or_default();
                    assert!(
                        siblings.len() <= 1,
                        "cycle {cycle}: {:?} has siblings {siblings:?}",
                        String::from_utf8_lossy(&key)
                    );
                    let value = siblings.into_iter().next();
                    let mut m = model.lock().unwrap();
                    let allowed = m.get_mut(&key).expect("model key");
                    let ok = value == allowed.acked || allowed.maybe.iter().any(|m| Some(m) == value.as_ref());
                    assert!(
                        ok,
                        "cycle {cycle}: key {:?} holds {:?}; acknowledged {:?}, in flight {:?}",
                        String::from_utf8_lossy(&key),
                        value.as_ref().map(|v| String::from_utf8_lossy(v).into_owned()),
                        allowed.acked.as_ref().map(|v| String::from_utf8_lossy(v).into_owned()),
                        allowed.maybe.iter().map(|v| String::from_utf8_lossy(v).into_owned()).collect::<Vec<_>>(),
                    );
                    // What is there now is the truth from here on.
                    *allowed = Allowed { acked: value, maybe: Vec::new() };
                }
            });
        }
    });
    // Nothing that was never written: the node holds exactly the keys the
    // model says are present (a phantom key under any name would show up
    // in the per-shard key counts).
    let present = model.lock().unwrap().values().filter(|a| a.acked.is_some()).count() as u64;
    let client = node.client();
    let mut stored = 0;
    for shard in 0..client.node().shard_count {
        let port = client.node().client_port + 1 + shard as u16;
        let shard_client =
            ringkv::client::Client::connect(std::net::SocketAddr::new(node.ip, port), Default::default()).unwrap();
        let report = block_on(shard_client.status()).unwrap().report;
        let line = report.lines().find(|l| l.starts_with("shard ")).expect("shard line");
        stored += line.split_whitespace().skip_while(|w| *w != "keys").nth(1).unwrap().parse::<u64>().unwrap();
    }
    assert_eq!(stored, present, "cycle {cycle}: the node holds {stored} keys, {present} were written");
}

#[test]
fn acknowledged_writes_survive_sigkill_at_random_moments() {
    let cycles: usize = std::env::var("RINGKV_CRASH_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(25);
    let seed: u64 = std::env::var("RINGKV_CRASH_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(2026);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let dir = scratch("crash-loop-");
    let data = dir.path().join("data");
    let model: Model = Arc::default();
    for c in 0..COUNTERS {
        model.lock().unwrap().insert(format!("counter-{c}").into_bytes(), Allowed::default());
    }
    let mut total_acked = 0u64;
    for cycle in 0..=cycles {
        let mut node = Node::start(&data, "127.0.0.31", &["--shards", "2"]);
        verify(&node, &model, cycle);
        if cycle == cycles {
            break;
        }
        let kill_after: u64 = rng.gen_range(20..1500);
        let acked = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let reached = Arc::new((Mutex::new(false), Condvar::new()));
        let mut writers = Vec::new();
        for w in 0..WRITERS {
            let client = node.client();
            let (model, acked, stop, reached) = (model.clone(), acked.clone(), stop.clone(), reached.clone());
            writers.push(std::thread::spawn(move || {
                for i in 0u64.. {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    // Writer 0 does read-modify-write on counters with their
                    // contexts; the others write fresh keys.
                    let (key, value, context) = if w == 0 {
                        let key = format!("counter-{}", i as usize % COUNTERS).into_bytes();
                        let read = match block_on(client.get(&key)) {
                            Ok(r) => r,
                            Err(_) => return, // the node is gone
                        };
                        let n: u64 =
                            read.as_ref().map_or(0, |r| String::from_utf8_lossy(&r.siblings[0]).parse().unwrap());
                        (key, (n + 1).to_string().into_bytes(), read.map(|r| r.context))
                    } else {
                        (format!("c{cycle}-w{w}-{i}").into_bytes(), format!("value-{cycle}-{w}-{i}").into_bytes(), None)
                    };
                    model.lock().unwrap().entry(key.clone()).or_default().maybe.push(value.clone());
                    match block_on(client.put(&key, &value, context.as_deref())) {
                        Ok(_) => {
                            let mut m = model.lock().unwrap();
                            let allowed = m.get_mut(&key).expect("entry");
                            allowed.maybe.retain(|v| *v != value);
                            allowed.acked = Some(value);
                            drop(m);
                            if acked.fetch_add(1, Ordering::Relaxed) + 1 >= kill_after {
                                let (lock, cv) = &*reached;
                                *lock.lock().unwrap() = true;
                                cv.notify_all();
                            }
                        }
                        // Connection lost or no reply: the outcome is unknown;
                        // the value stays "in flight".
                        Err(_) => return,
                    }
                }
            }));
        }
        {
            let (lock, cv) = &*reached;
            let (guard, timeout) =
                cv.wait_timeout_while(lock.lock().unwrap(), Duration::from_secs(60), |reached| !*reached).unwrap();
            assert!(
                !timeout.timed_out() || *guard,
                "cycle {cycle}: writers never reached {kill_after} acks\n{}",
                node.log()
            );
        }
        node.kill();
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.join().unwrap();
        }
        total_acked += acked.load(Ordering::Relaxed);
    }
    let counters: u64 = {
        let m = model.lock().unwrap();
        (0..COUNTERS)
            .map(|c| {
                m[format!("counter-{c}").as_bytes()]
                    .acked
                    .as_ref()
                    .map_or(0, |v| String::from_utf8_lossy(v).parse().unwrap())
            })
            .sum()
    };
    assert!(total_acked > cycles as u64 * 20, "too few writes to mean anything: {total_acked}");
    assert!(counters > 0, "the read-modify-write counters never advanced");
    eprintln!("{cycles} SIGKILL cycles, {total_acked} acknowledged writes, counters at {counters}");
}
