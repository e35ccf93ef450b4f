#!/usr/bin/env bash
# Lint the GPU code without a GPU: `cargo clippy --features cuda` (-D warnings, all targets) on
# the crates that have the feature (internvl-model, internvl-server), so the kernels' host
# code, the model's CUDA paths and the build script that compiles the kernels with nvcc are
# compiled by every CI run, not only by the rare run on a GPU.
#
# The CUDA 13.0 toolchain comes from scripts/cuda-toolchain.sh (the same pinned PyPI wheels
# scripts/build-cuda.sh builds the release binary with), cached under target/cuda-toolkit, so a
# rerun downloads nothing. Clippy uses its own target dir (target/cuda, as build-cuda.sh), so
# the CPU build in target/ is not invalidated. candle-kernels' MoE/GGUF objects, which only
# final binaries link, are not compiled (see scripts/clippy-nvcc.sh): they were most of the
# time and clippy links nothing.
#
# Usage:  scripts/clippy-cuda.sh
# Environment (optional): CUDA_COMPUTE_CAP (default 90, the GPU hosts' H100/H200), and those of
# scripts/cuda-toolchain.sh (CUDA_TOOLKIT_DIR, CUDAFORGE_THREADS).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
start=$SECONDS

# shellcheck source=scripts/cuda-toolchain.sh
source "$root/scripts/cuda-toolchain.sh" "${CUDA_COMPUTE_CAP:-90}"
# nvcc as scripts/clippy-nvcc.sh, which skips the objects nothing links here. cudaforge takes
# the toolkit's include and lib64 from $NVCC/../.., so it sits in a CUDA_HOME-shaped folder.
wrapped="$(dirname "$CUDA_HOME")/clippy-nvcc"
mkdir -p "$wrapped/bin"
for d in include lib64 nvvm; do ln -sfn "$CUDA_HOME/$d" "$wrapped/$d"; done
ln -sfn "$root/scripts/clippy-nvcc.sh" "$wrapped/bin/nvcc"
export REAL_NVCC="$CUDA_HOME/bin/nvcc"
export NVCC="$wrapped/bin/nvcc"
echo "clippy-cuda: toolchain ready after $((SECONDS - start)) s"

cargo clippy -p internvl-model -p internvl-server \
    --features internvl-model/cuda,internvl-server/cuda \
    --all-targets --locked --target-dir "$root/target/cuda" -- -D warnings
echo "clippy-cuda: done in $((SECONDS - start)) s"
