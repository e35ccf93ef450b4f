#!/usr/bin/env bash
# Every check CI runs: formatting, lints, all tests (the model tests compare against the
# committed reference fixtures; no torch is needed), then the end-to-end run of the official
# OpenAI SDK and a real Prometheus against the server, the deployment files' validation,
# cargo deny (licenses, bans, sources), and a short run of every fuzz target.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
bash scripts/deny.sh
bash scripts/e2e.sh
bash scripts/validate-deploy.sh
bash scripts/fuzz.sh --ci
