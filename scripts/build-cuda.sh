#!/usr/bin/env bash
# Build the CUDA binary of internvl-server on a machine WITHOUT a GPU or a CUDA install
# (route recorded in shared/docs/cuda-build.md): CUDA 13.0 toolkit from PyPI wheels, a
# link-time-only libcuda stub, then `cargo build --release --features cuda`.
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

cap="${1:-${CUDA_COMPUTE_CAP:-90}}"
if ! [[ "$cap" =~ ^[0-9]+[a-z]?$ ]]; then
    echo "error: compute capability '$cap' is not like 80, 90 or 90a" >&2
    exit 2
fi

toolkit="${CUDA_TOOLKIT_DIR:-$root/target/cuda-toolkit}"
mkdir -p "$toolkit"
toolkit="$(cd "$toolkit" && pwd)"
wheels="$toolkit/wheels"
venv="$toolkit/venv"
cuda_home="$toolkit/cuda"
target_dir="$root/target/cuda"

# CUDA 13.0 pins: the GPU hosts run driver 580 (CUDA 13.0); a newer nvcc emits PTX it refuses.
pins=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-crt==13.0.88
    nvidia-cuda-cccl==13.0.85
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-nvrtc==13.0.88
    nvidia-cublas==13.1.0.3
    nvidia-curand==10.4.0.35
)

log() { printf '\n== %s (%ds)\n' "$*" "$((SECONDS - start))"; }

for tool in python3 gcc xz readelf strip cargo; do
    command -v "$tool" >/dev/null 2>&1 || { echo "error: '$tool' not found" >&2; exit 1; }
done

# ---------------------------------------------------------------- 1. wheels
log "CUDA 13.0 wheels -> $wheels"
mkdir -p "$wheels"
wheel_of() { # pin -> path of its downloaded wheel, or nothing
    local name="${1%%==*}" ver="${1##*==}"
    compgen -G "$wheels/${name//-/_}-${ver}-*.whl" | head -n 1 || true
}
missing=()
for pin in "${pins[@]}"; do
    [ -n "$(wheel_of "$pin")" ] || missing+=("$pin")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "downloading: ${missing[*]}"
    python3 -m pip download --no-deps --only-binary=:all: --dest "$wheels" "${missing[@]}"
else
    echo "all ${#pins[@]} wheels already downloaded"
fi
wheel_files=()
for pin in "${pins[@]}"; do
    w="$(wheel_of "$pin")"
    [ -n "$w" ] || { echo "error: no wheel for $pin after download" >&2; exit 1; }
    wheel_files+=("$w")
done

# ---------------------------------------------------------------- 2. venv
log "venv -> $venv"
stamp="$venv/.cuda-wheels"
want_stamp="$(printf '%s\n' "${wheel_files[@]##*/}")"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want_stamp" ] && [ -x "$venv/bin/python" ]; then
    echo "already installed"
else
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --no-deps --no-index "${wheel_files[@]}"
    printf '%s\n' "$want_stamp" >"$stamp"
fi
cu13="$("$venv/bin/python" - <<'EOF'
import os, sysconfig
for key in ("platlib", "purelib"):
    d = os.path.join(sysconfig.get_paths()[key], "nvidia", "cu13")
    if os.path.isdir(d):
        print(d)
        break
EOF
)"
[ -n "$cu13" ] && [ -x "$cu13/bin/nvcc" ] || { echo "error: no nvidia/cu13/bin/nvcc in $venv" >&2; exit 1; }
echo "toolkit tree: $cu13"

# ---------------------------------------------------------------- 3. CUDA_HOME
log "CUDA_HOME -> $cuda_home"
mkdir -p "$cuda_home/lib64/stubs"
for d in bin nvvm include; do
    [ -d "$cu13/$d" ] || { echo "error: $cu13/$d missing" >&2; exit 1; }
    ln -sfn "$cu13/$d" "$cuda_home/$d"
done
# Every library file of the wheels, under its own name, then unversioned dev links
# (libX.so -> libX.so.MAJOR), which the wheels do not ship.
find "$cuda_home/lib64" -maxdepth 1 -type l -delete
for f in "$cu13"/lib/*; do
    [ -f "$f" ] && ln -sfn "$f" "$cuda_home/lib64/${f##*/}"
done
for f in "$cuda_home"/lib64/lib*.so.*; do
    name="${f##*/}"
    [[ "$name" =~ ^(lib[^.]+)\.so\.[0-9]+$ ]] || continue
    base="${BASH_REMATCH[1]}.so"
    [ -e "$cuda_home/lib64/$base" ] || ln -sfn "$name" "$cuda_home/lib64/$base"
done
for lib in libcudart libcublas libcublasLt libnvrtc libcurand; do
    [ -e "$cuda_home/lib64/$lib.so" ] || { echo "error: $cuda_home/lib64/$lib.so missing" >&2; exit 1; }
done
ls -l "$cuda_home/lib64" | sed 's/^/  /'

# ---------------------------------------------------------------- 4. libcuda stub
log "libcuda.so stub (link time only) -> $cuda_home/lib64/stubs"
cargo fetch --quiet
cudarc_dir="$(cargo metadata --format-version 1 --features internvl-server/cuda 2>/dev/null |
    python3 -c '
import json, os, sys
d = json.load(sys.stdin)
ids = {n["id"] for n in d["resolve"]["nodes"]}
dirs = sorted({os.path.dirname(p["manifest_path"]) for p in d["packages"]
               if p["name"] == "cudarc" and p["id"] in ids})
print("\n".join(dirs))')"
if [ -z "$cudarc_dir" ]; then # fall back to Cargo.lock + the registry source folder
    ver="$(awk '/^name = "cudarc"$/ { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock)"
    cudarc_dir="$(compgen -G "${CARGO_HOME:-$HOME/.cargo}/registry/src/*/cudarc-$ver" | head -n 1 || true)"
fi
[ "$(printf '%s\n' "$cudarc_dir" | wc -l)" -eq 1 ] && [ -d "$cudarc_dir" ] ||
    { echo "error: could not locate exactly one cudarc source folder: '$cudarc_dir'" >&2; exit 1; }
sys_rs="$cudarc_dir/src/driver/sys/mod.rs"
[ -f "$sys_rs" ] || { echo "error: $sys_rs missing" >&2; exit 1; }
stub_c="$cuda_home/lib64/stubs/libcuda-stub.c"
stub_so="$cuda_home/lib64/stubs/libcuda.so"
# 999 = CUDA_ERROR_UNKNOWN: if this stub were ever loaded, every call fails loudly.
new_c="$({
    echo "/* Link-time stub of the CUDA driver: generated from $sys_rs. Never ship. */"
    grep -oE '\bfn cu[A-Za-z0-9_]+' "$sys_rs" | awk '{print $2}' | sort -u |
        awk '{printf "int %s(void) { return 999; }\n", $1}'
})"
nsym="$(printf '%s\n' "$new_c" | grep -c '^int ')"
[ "$nsym" -gt 100 ] || { echo "error: only $nsym cu* symbols found in $sys_rs" >&2; exit 1; }
if [ -f "$stub_so" ] && [ -f "$stub_c" ] && [ "$(cat "$stub_c")" = "$new_c" ]; then
    echo "up to date ($nsym symbols from ${cudarc_dir##*/})"
else
    printf '%s\n' "$new_c" >"$stub_c"
    gcc -shared -fPIC -O0 -Wl,-soname,libcuda.so.1 -o "$stub_so" "$stub_c"
    echo "built with $nsym symbols from ${cudarc_dir##*/}"
fi

# ---------------------------------------------------------------- 5. cargo build
export CUDA_HOME="$cuda_home"
export CUDA_PATH="$cuda_home"
export PATH="$cuda_home/bin:$PATH"
export CUDA_COMPUTE_CAP="$cap"
export CUDARC_CUDA_VERSION=13000
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-2}"
unset NVCC # cudaforge prefers $NVCC over CUDA_HOME: make sure the pinned nvcc is used
log "nvcc: $(nvcc --version | grep -o 'release [0-9.]*')"
log "cargo build (CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP, target dir $target_dir)"
cargo build --release -p internvl-server --features cuda --target-dir "$target_dir"

# ---------------------------------------------------------------- 6. result
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
