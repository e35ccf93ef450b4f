#!/usr/bin/env bash
# Every check CI runs: the system packages the tests need (scripts/install-deps.sh: cmake, nasm,
# g++, promtool), formatting, lints, the lints again with `--features cuda` (the GPU code,
# compiled with the pinned CUDA toolchain from PyPI; no GPU needed: scripts/clippy-cuda.sh),
# all tests (the model tests compare against the committed reference fixtures; no torch is
# needed), then cargo deny (licenses, bans, sources), the end-to-end run of the official OpenAI
# SDK and a real Prometheus against the server, the deployment files' validation, and a short
# run of every fuzz target.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
bash scripts/clippy-cuda.sh
cargo test --workspace --locked
bash scripts/deny.sh
bash scripts/e2e.sh
bash scripts/validate-deploy.sh
bash scripts/fuzz.sh --ci
