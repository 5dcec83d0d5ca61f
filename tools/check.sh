#!/usr/bin/env bash
# The checks every commit must pass: formatting and clippy with warnings denied.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
