#!/usr/bin/env bash
# Every check CI runs: formatting, lints, and all tests (the model tests compare against the
# committed reference fixtures; no Python is needed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
