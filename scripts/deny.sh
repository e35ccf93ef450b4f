#!/usr/bin/env bash
# License/ban/source policy check (config: deny.toml). Advisories are not checked (no RustSec access).
# Installs cargo-deny into the default cargo bin dir if missing (~4 min compile on 2 cores).
set -euo pipefail
CARGO_DENY_VERSION=0.20.2 # needs rustc >= 1.88
cd "$(dirname "$0")/.."

if ! cargo deny --version >/dev/null 2>&1; then
    echo "installing cargo-deny $CARGO_DENY_VERSION"
    cargo install cargo-deny --version "$CARGO_DENY_VERSION" --locked
fi
cargo deny --version

# --all-features includes the `cuda` crates; cargo deny only reads metadata, no CUDA toolkit needed.
exec cargo deny --all-features --locked check licenses bans sources
