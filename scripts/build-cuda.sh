#!/usr/bin/env bash
# Build the CUDA binary of internvl-server on a machine WITHOUT a GPU or a CUDA install
# (route recorded in shared/docs/cuda-build.md): CUDA 13.0 toolkit from PyPI wheels, a
# link-time-only libcuda stub (both set up by scripts/cuda-toolchain.sh, which the CI lint
# scripts/clippy-cuda.sh shares), then `cargo build --release --features cuda`.
#
# Usage:  scripts/build-cuda.sh [COMPUTE_CAP]
#   COMPUTE_CAP  argument, else $CUDA_COMPUTE_CAP, else 90 (H100/H200, builds sm_90a code).
#                Use 80 for A100. Accepts what cudaforge accepts: "80", "90", "90a", ...
# Environment (all optional):
#   CUDA_TOOLKIT_DIR   where wheels, venv, CUDA_HOME and stub live (default target/cuda-toolkit)
#   CUDAFORGE_THREADS  parallel nvcc jobs (default 2)
# Output: target/cuda/internvl-cuda-sm${CAP} (+ .xz). A clean run takes ~15 min on 2 cores and
# downloads ~680 MB once; re-runs reuse everything. Needs python3 (venv, pip), gcc, xz, cargo;
# needs no GPU. The build uses its own target dir (target/cuda), so the CPU build is untouched.
# Running the binary needs the real driver (libcuda.so.1) and the CUDA 13 runtime libraries on
# LD_LIBRARY_PATH (see the end of the output). The stub in lib64/stubs must never be shipped.
set -euo pipefail

start=$SECONDS
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

cap="${1:-${CUDA_COMPUTE_CAP:-90}}" # checked by cuda-toolchain.sh
target_dir="$root/target/cuda"
log() { printf '\n== %s (%ds)\n' "$*" "$((SECONDS - start))"; }

log "CUDA 13.0 toolchain (scripts/cuda-toolchain.sh)"
for tool in xz readelf strip; do
    command -v "$tool" >/dev/null 2>&1 || { echo "error: '$tool' not found" >&2; exit 1; }
done
# shellcheck source=scripts/cuda-toolchain.sh
source "$root/scripts/cuda-toolchain.sh" "$cap"
cuda_home="$CUDA_HOME"
# shellcheck disable=SC2012 # a listing for the log, of names the script made
ls -l "$cuda_home/lib64" | sed 's/^/  /'

# ---------------------------------------------------------------- 2. cargo build
log "cargo build (CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP, target dir $target_dir)"
cargo build --release -p internvl-server --features cuda --target-dir "$target_dir"

# ---------------------------------------------------------------- 3. result
bin_src="$target_dir/release/internvl"
out="$target_dir/internvl-cuda-sm$cap"
cp -f "$bin_src" "$out"
# The release profile keeps line tables for profiling; the carried binary does without them.
strip --strip-debug "$out"
log "compressing with xz -9e"
xz -9e -T1 -c "$out" >"$out.xz"
human() { numfmt --to=iec-i --suffix=B "$1" 2>/dev/null || echo "$1 B"; }
size="$(stat -c %s "$out")"
xz_size="$(stat -c %s "$out.xz")"
echo "binary : $out  $size bytes ($(human "$size"))"
echo "xz -9e : $out.xz  $xz_size bytes ($(human "$xz_size"))"
echo "NEEDED :"
readelf -d "$out" | awk '/\(NEEDED\)/ { gsub(/[\[\]]/, "", $NF); print "  " $NF }'
echo "ldd (with \$CUDA_HOME/lib64 on LD_LIBRARY_PATH, no stub: libcuda.so.1 comes from the driver):"
LD_LIBRARY_PATH="$cuda_home/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ldd "$out" | sed 's/^/ /' || true
log "done in $((SECONDS - start)) s"
