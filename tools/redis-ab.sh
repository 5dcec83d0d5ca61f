#!/usr/bin/env bash
# A/B of two ringkv binaries through their Redis ports, same run: both nodes
# run at once (each on its own ports and data directory under target/), are
# filled with the same SET run, then redis-benchmark alternates between them
# round by round. Prints each round and the median ratio B/A per test.
# Usage: tools/redis-ab.sh BINARY_A BINARY_B
#   env: SHARDS (1), SYNC (none), CACHE_MIB (1024), ROUNDS (3), REQUESTS (1000000), PIPELINE (16), KEYSPACE (1000000),
#        ARGS_A, ARGS_B (extra `serve` flags per side, e.g. ARGS_B="--config tuned.toml" with one binary twice)
#   To get a binary of the previous commit:
#     git worktree add /tmp/base HEAD~1 && (cd /tmp/base && cargo build --release)
set -euo pipefail
cd "$(dirname "$0")/.."
a=${1:?usage: redis-ab.sh BINARY_A BINARY_B}; b=${2:?usage: redis-ab.sh BINARY_A BINARY_B}
rounds=${ROUNDS:-3}; n=${REQUESTS:-1000000}; pipe=${PIPELINE:-16}
command -v redis-benchmark >/dev/null || apt-get install -y -q redis-tools >/dev/null 2>&1
mkdir -p target
work=$(mktemp -d -p target redis-ab.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null && wait "$p" 2>/dev/null; done; rm -rf "$work"; }
trap cleanup EXIT
start() { # name binary client_port redis_port extra_args
  # shellcheck disable=SC2086
  "$2" serve $5 --data-dir "$work/$1" --listen 127.0.0.1 --client-port "$3" --redis-port "$4" \
    --shards "${SHARDS:-1}" --sync "${SYNC:-none}" --cache-mib "${CACHE_MIB:-1024}" 2> "$work/$1.log" &
  pids+=($!)
  for _ in $(seq 200); do grep -q "ringkv node serving" "$work/$1.log" && return; sleep 0.05; done
  cat "$work/$1.log"; exit 1
}
start a "$a" 17760 16410 "${ARGS_A:-}"
start b "$b" 17780 16411 "${ARGS_B:-}"
bench() { redis-benchmark -p "$1" -t "$2" -n "$n" -r "${KEYSPACE:-1000000}" -d 100 -c 50 -P "$pipe" --csv 2>/dev/null | tail -n +2; }
bench 16410 set >/dev/null; bench 16411 set >/dev/null
: > "$work/results"
for i in $(seq "$rounds"); do
  for test in set get; do
    bench 16410 "$test" | sed "s/^/$i,A,/" >> "$work/results"
    bench 16411 "$test" | sed "s/^/$i,B,/" >> "$work/results"
  done
done
python3 - "$work/results" <<'PY'
import csv, sys, statistics
rows = [r for r in csv.reader(open(sys.argv[1]))]
by = {}
for rnd, who, test, rps, *_ in rows:
    by.setdefault(test, {}).setdefault(rnd, {})[who] = float(rps)
for test, rounds in by.items():
    ratios = []
    for rnd in sorted(rounds):
        r = rounds[rnd]
        ratios.append(r["B"] / r["A"])
        print("%s round %s: A %9.0f  B %9.0f  B/A %.2f" % (test, rnd, r["A"], r["B"], ratios[-1]))
    print("%s median B/A: %.2f" % (test, statistics.median(ratios)))
PY
