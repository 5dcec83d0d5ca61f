#!/usr/bin/env bash
# ringkv-bench figures on the native protocol: YCSB A and C with 100-byte
# values, closed loop, then open loop at half the closed-loop peak.
# Starts and stops its own node (by PID).
# Usage: tools/ycsb-bench.sh [SYNC_MODE]   (default: group)
#   env: SHARDS (2), RECORDS (1000000), SECONDS_PER_RUN (15), CONNECTIONS (32), PIPELINE (8)
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-group}
cargo build --release -q --workspace
work=$(mktemp -d -p target bench-ycsb.XXXXXX)
pid=""
cleanup() { [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
./target/release/ringkv serve --data-dir "$work/data" --listen 127.0.0.1 --client-port 17730 --redis-port 0 \
  --shards "${SHARDS:-2}" --sync "$mode" --cache-mib 1024 2> "$work/node.log" &
pid=$!
for _ in $(seq 200); do grep -q "ringkv node serving" "$work/node.log" && break; sleep 0.05; done
bench=(./target/release/ringkv-bench --address 127.0.0.1:17730 --records "${RECORDS:-1000000}" --value-bytes 100
       --connections "${CONNECTIONS:-32}" --pipeline "${PIPELINE:-8}" --duration-secs "${SECONDS_PER_RUN:-15}")
"${bench[@]}" --workload c --load-only 2>/dev/null | grep -E "^(==|insert|total)"
for workload in a c; do
  "${bench[@]}" --workload $workload --json "$work/$workload.json" 2>/dev/null | grep -vE "^$"
  peak=$(python3 -c "import json; print(int(json.load(open('$work/$workload.json'))['run']['ops_per_s']))")
  half=$((peak / 2))
  "${bench[@]}" --workload $workload --rate $half 2>/dev/null | grep -vE "^$"
done
