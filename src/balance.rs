//! Connection balancing: which shard serves a Redis-protocol connection,
//! decided by how long each shard waits for its CPU.
//!
//! Why: a shard is pinned to its core, and when another busy thread shares
//! that core (a load generator on the same box, say) the shard waits for
//! it, and with it every request for its partitions. Key ownership is
//! fixed, but the work of a connection (reading, parsing, routing,
//! replying: about half of a pipelined SET's cost) can run on any shard.
//! So a shard that waits for its CPU a good share of the time hands its
//! idle Redis connections to a shard that waits far less, and shards that
//! hardly wait even their counts back out. Only pipelined connections
//! move (see `connection_balance_operations_min`). Measured on 2 vCPUs
//! next to redis-benchmark: the shard sharing its vCPU waited 35-40% of
//! the time and the other 5-7%; balancing against none, same-run A/B:
//! -P 16 SET 1.18x, GET 1.23x; -P 1 unchanged.
//!
//! The signal is the kernel's per-thread run-queue wait
//! (`/proc/thread-self/schedstat`), sampled by each shard every
//! `connection_balance_interval_ms` and published on a board all shards
//! read. A shard with nothing sharing its core waits ~0, so on a dedicated
//! machine only the evening-out moves anything.

use std::cell::Cell;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Per shard, shared by all shards: the latest run-queue wait (per mille
/// of wall time, smoothed) and the Redis connections it serves.
#[derive(Debug)]
pub struct Board {
    wait_permille: Box<[AtomicU32]>,
    connections: Box<[AtomicU32]>,
}

impl Board {
    pub fn new(shard_count: u32) -> Arc<Self> {
        let zeros = || (0..shard_count).map(|_| AtomicU32::new(0)).collect();
        Arc::new(Self { wait_permille: zeros(), connections: zeros() })
    }
}

/// What every shard last measured, as one shard sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loads {
    /// Per shard: run-queue wait, per mille of the time (smoothed).
    pub waits: Vec<u32>,
    /// Per shard: Redis connections it serves.
    pub connections: Vec<u32>,
}

/// Where a shard moves idle connections, and how many at most, until its
/// next sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Move {
    pub target: u32,
    pub count: u32,
}

/// The balancing decision, pure: where shard `me` should move its idle
/// connections to, if anywhere, and how many.
///
/// - Away from contention: a shard waiting at least `threshold_permille`
///   of the time, and more than twice as long as the least-waiting shard,
///   moves all of them there.
/// - Back to even: a shard that waits little (under half the threshold)
///   moves half the difference to the uncontended shard with the fewest
///   connections, if it has more than 1 + 1/8 more than that shard, so
///   that connections moved away from a core that was shared once spread
///   out again when it no longer is. A contended shard never receives
///   them this way.
///
/// No target with `connections_max` connections or more is chosen.
pub fn decide(me: u32, loads: &Loads, threshold_permille: u32, connections_max: u32) -> Option<Move> {
    let me = me as usize;
    let mine = loads.waits[me];
    let others = || (0..loads.waits.len()).filter(move |&s| s != me && loads.connections[s] < connections_max);
    let have = loads.connections[me];
    if have == 0 {
        return None;
    }
    if mine >= threshold_permille {
        let target = others().min_by_key(|&s| (loads.waits[s], s))?;
        return (loads.waits[target].saturating_mul(2) < mine).then_some(Move { target: target as u32, count: have });
    }
    let calm = threshold_permille / 2;
    if mine >= calm {
        return None;
    }
    let target = others().filter(|&s| loads.waits[s] < calm).min_by_key(|&s| (loads.connections[s], s))?;
    let theirs = loads.connections[target];
    (have > theirs + 1 + theirs / 8).then(|| Move { target: target as u32, count: (have - theirs) / 2 })
}

/// One shard's balancer: samples its thread's run-queue wait, publishes
/// it, and decides where its idle connections go.
pub struct Balancer {
    index: u32,
    board: Arc<Board>,
    threshold_permille: u32,
    connections_max: u32,
    /// Where idle connections go until the next sample, and how many
    /// more may.
    moving: Cell<Option<Move>>,
    /// The previous sample: when, time on the CPU and waiting for it (ns).
    last: Cell<Option<(Instant, Schedstat)>>,
    /// Time on the CPU, per mille of wall time (smoothed; for `admin
    /// status` only, so not on the board).
    busy_permille: Cell<u32>,
}

impl Balancer {
    pub fn new(index: u32, board: Arc<Board>, threshold_permille: u32, connections_max: usize) -> Self {
        Self {
            index,
            board,
            threshold_permille,
            connections_max: u32::try_from(connections_max).unwrap_or(u32::MAX),
            moving: Cell::new(None),
            last: Cell::new(None),
            busy_permille: Cell::new(0),
        }
    }

    /// Counts a Redis connection this shard serves until the guard drops
    /// (only those can move, so only those are balanced).
    pub fn serving(&self) -> ServingGuard<'_> {
        self.board.connections[self.index as usize].fetch_add(1, Ordering::Relaxed);
        ServingGuard(self)
    }

    /// Samples the calling thread's run-queue wait since the last sample,
    /// publishes it and decides where idle connections go until the next
    /// one. Must run on the shard's own thread.
    pub fn sample(&self) {
        let Some(now_stat) = thread_schedstat() else { return };
        let now = Instant::now();
        let Some((at, before)) = self.last.replace(Some((now, now_stat))) else { return };
        let wall_ns = now.duration_since(at).as_nanos().max(1) as u64;
        let share = |later: u64, earlier: u64| (later.saturating_sub(earlier).saturating_mul(1000) / wall_ns) as u32;
        // A shard that hardly ran learns nothing about its core: its last
        // measurement stands rather than decaying as an idle shard's wait
        // would (which would draw connections back to a shared core
        // between two bursts of load), and so does its decision.
        let busy = share(now_stat.run_ns, before.run_ns).min(1000);
        if busy < 100 {
            return;
        }
        // Smoothed over ~4 samples: a short burst of some other thread
        // (a kernel worker, say) must not move every connection.
        let smooth = |earlier: u32, permille: u32| (3 * earlier + permille) / 4;
        let wait = &self.board.wait_permille[self.index as usize];
        wait.store(
            smooth(wait.load(Ordering::Relaxed), share(now_stat.wait_ns, before.wait_ns).min(1000)),
            Ordering::Relaxed,
        );
        self.busy_permille.set(smooth(self.busy_permille.get(), busy));
        let load = |v: &[AtomicU32]| v.iter().map(|x| x.load(Ordering::Relaxed)).collect();
        let loads = Loads { waits: load(&self.board.wait_permille), connections: load(&self.board.connections) };
        let decided = decide(self.index, &loads, self.threshold_permille, self.connections_max);
        if decided.map(|m| m.target) != self.moving.replace(decided).map(|m| m.target) {
            tracing::debug!(shard = self.index, ?decided, ?loads, "connection balancing changed");
        }
    }

    /// The shard an idle connection should move to now, if any (counted
    /// as moved).
    pub fn take_move(&self) -> Option<u32> {
        let Move { target, count } = self.moving.get()?;
        self.moving.set((count > 1).then_some(Move { target, count: count - 1 }));
        Some(target)
    }

    /// This shard's latest run-queue wait, per mille of wall time.
    pub fn wait_permille(&self) -> u32 {
        self.board.wait_permille[self.index as usize].load(Ordering::Relaxed)
    }

    /// This shard's latest time on its CPU, per mille of wall time.
    pub fn busy_permille(&self) -> u32 {
        self.busy_permille.get()
    }
}

/// See `Balancer::serving`.
pub struct ServingGuard<'a>(&'a Balancer);

impl Drop for ServingGuard<'_> {
    fn drop(&mut self) {
        self.0.board.connections[self.0.index as usize].fetch_sub(1, Ordering::Relaxed);
    }
}

/// A thread's scheduler times (`/proc/thread-self/schedstat`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedstat {
    /// On a CPU.
    pub run_ns: u64,
    /// Runnable but waiting for a CPU.
    pub wait_ns: u64,
}

/// The calling thread's scheduler times; `None` where the kernel does not
/// keep them (then the balancer does nothing).
pub fn thread_schedstat() -> Option<Schedstat> {
    parse_schedstat(&std::fs::read_to_string("/proc/thread-self/schedstat").ok()?)
}

fn parse_schedstat(text: &str) -> Option<Schedstat> {
    let mut fields = text.split_ascii_whitespace().map(str::parse::<u64>);
    Some(Schedstat { run_ns: fields.next()?.ok()?, wait_ns: fields.next()?.ok()? })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `decide` with a threshold of 100 per mille and room for 1024.
    fn decided(me: u32, waits: &[u32], connections: &[u32]) -> Option<Move> {
        decide(me, &Loads { waits: waits.to_vec(), connections: connections.to_vec() }, 100, 1024)
    }

    fn to(target: u32, count: u32) -> Option<Move> {
        Some(Move { target, count })
    }

    #[test]
    fn a_shard_waiting_for_its_cpu_hands_its_connections_to_the_least_waiting_shard() {
        // Shard 0 waits 38% of the time, shard 1 6%.
        assert_eq!(decided(0, &[380, 60], &[26, 27]), to(1, 26));
        assert_eq!(decided(0, &[380, 200, 50], &[3, 3, 3]), to(2, 3));
        // ... even when that shard has every other connection already.
        assert_eq!(decided(0, &[380, 60], &[1, 52]), to(1, 1));
        // Both wait alike (an overloaded machine): moving would not help.
        assert_eq!(decided(0, &[380, 200], &[26, 27]), None);
        // Nothing to hand over, or no room at the target.
        assert_eq!(decided(0, &[380, 60], &[0, 27]), None);
        assert_eq!(decided(0, &[380, 60], &[26, 1024]), None);
        // One shard alone never sheds.
        assert_eq!(decided(0, &[900], &[26]), None);
    }

    #[test]
    fn connections_spread_back_only_between_shards_that_wait_little() {
        // Nobody waits: the shard with far more connections gives up half
        // the difference (no more, or they would bounce back).
        assert_eq!(decided(1, &[0, 10], &[1, 52]), to(0, 25));
        assert_eq!(decided(1, &[0, 10, 5], &[20, 52, 9]), to(2, 21));
        assert_eq!(decided(1, &[0, 10], &[23, 27]), to(0, 2));
        // Near even (within 1 + 1/8): nothing moves, so nothing bounces.
        assert_eq!(decided(1, &[0, 10], &[25, 27]), None);
        assert_eq!(decided(0, &[0, 10], &[25, 27]), None);
        // The shard with few connections still waits for its core: the
        // connections stay away from it.
        assert_eq!(decided(1, &[380, 10], &[1, 52]), None);
        // Between calm and contended: no move either way.
        assert_eq!(decided(1, &[0, 70], &[1, 52]), None);
    }

    #[test]
    fn a_move_ends_after_its_count() {
        let balancer = Balancer::new(0, Board::new(2), 100, 1024);
        balancer.moving.set(Some(Move { target: 1, count: 2 }));
        assert_eq!(balancer.take_move(), Some(1));
        assert_eq!(balancer.take_move(), Some(1));
        assert_eq!(balancer.take_move(), None);
    }

    #[test]
    fn schedstat_gives_run_and_wait_times_and_this_threads_is_readable() {
        assert_eq!(parse_schedstat("123456 789 10\n"), Some(Schedstat { run_ns: 123456, wait_ns: 789 }));
        assert_eq!(parse_schedstat("garbage"), None);
        // (A thread's times are brought up to date when it is switched
        // out, so a new thread may still read 0 on the CPU.)
        assert!(thread_schedstat().is_some());
    }
}
