#!/usr/bin/env bash
# ringkv's Redis port against redis-server, same tool, same run:
# redis-benchmark -t set,get -d 100 -c 50 -r 1000000, pipelines 1 and 16,
# for each sync mode given. Starts and stops its own node (by PID).
# Usage: tools/redis-bench.sh [SYNC_MODES...]   (default: none group)
#   env: SHARDS (2), CACHE_MIB (1024), ROUNDS (2), REQUESTS (1000000)
set -euo pipefail
cd "$(dirname "$0")/.."
modes=("${@:-none group}")
[ $# -eq 0 ] && modes=(none group)
cargo build --release -q
work=$(mktemp -d -p target bench-redis.XXXXXX)
pid=""
cleanup() { [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
for mode in "${modes[@]}"; do
  rm -rf "$work/data"
  ./target/release/ringkv serve --data-dir "$work/data" --listen 127.0.0.1 --client-port 17720 --redis-port 16399 \
    --shards "${SHARDS:-2}" --sync "$mode" --cache-mib "${CACHE_MIB:-1024}" ${EXTRA_ARGS:-} 2> "$work/node.log" &
  pid=$!
  for _ in $(seq 200); do grep -q "ringkv node serving" "$work/node.log" && break; sleep 0.05; done
  grep -q "ringkv node serving" "$work/node.log" || { cat "$work/node.log"; exit 1; }
  for pipe in 1 16; do
    echo "### ringkv sync=$mode shards=${SHARDS:-2}, redis-benchmark -P $pipe"
    REQUESTS=${REQUESTS:-1000000} bash tools/redis-compare.sh 16399 "$pipe" "${ROUNDS:-2}" | tail -7
  done
  kill -TERM "$pid"; wait "$pid" || true; pid=""
done
