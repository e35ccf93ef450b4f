# shellcheck shell=bash
# The CUDA 13.0 toolchain the `cuda` feature builds with, on a machine WITHOUT a GPU or a CUDA
# install (route recorded in shared/docs/cuda-build.md): pinned PyPI wheels in a venv, a
# CUDA_HOME-shaped folder of links into them, and a link-time-only libcuda stub. The one
# definition of that toolchain for scripts/build-cuda.sh (release binary) and
# scripts/clippy-cuda.sh (CI lint); sourced, not run.
#
# Usage:  source scripts/cuda-toolchain.sh COMPUTE_CAP
#   COMPUTE_CAP  "80", "90", "90a", ... (what cudaforge accepts; 90 builds sm_90a code)
# Environment (optional):
#   CUDA_TOOLKIT_DIR   where wheels, venv, CUDA_HOME and stub live (default target/cuda-toolkit)
#   CUDAFORGE_THREADS  parallel nvcc jobs (default 2)
# Afterwards CUDA_HOME, CUDA_PATH, PATH, CUDA_COMPUTE_CAP, CUDARC_CUDA_VERSION and
# CUDAFORGE_THREADS are exported (NVCC is unset) and `cargo ... --features cuda` builds.
# Downloads ~680 MB once; re-runs find everything in place and take seconds. Needs python3
# (venv, pip), gcc and cargo; needs no GPU. The stub in lib64/stubs must never be shipped.

cuda_toolchain() { # cap
    local cap="$1"
    if ! [[ "$cap" =~ ^[0-9]+[a-z]?$ ]]; then
        echo "error: compute capability '$cap' is not like 80, 90 or 90a" >&2
        return 2
    fi
    local root toolkit wheels venv cuda_home
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    toolkit="${CUDA_TOOLKIT_DIR:-$root/target/cuda-toolkit}"
    mkdir -p "$toolkit"
    toolkit="$(cd "$toolkit" && pwd)"
    wheels="$toolkit/wheels"
    venv="$toolkit/venv"
    cuda_home="$toolkit/cuda"

    # CUDA 13.0 pins: the GPU hosts run driver 580 (CUDA 13.0); a newer nvcc emits PTX it refuses.
    local pins=(
        nvidia-cuda-nvcc==13.0.88
        nvidia-nvvm==13.0.88
        nvidia-cuda-crt==13.0.88
        nvidia-cuda-cccl==13.0.85
        nvidia-cuda-runtime==13.0.96
        nvidia-cuda-nvrtc==13.0.88
        nvidia-cublas==13.1.0.3
        nvidia-curand==10.4.0.35
    )

    local tool
    for tool in python3 gcc cargo; do
        command -v "$tool" >/dev/null 2>&1 || { echo "error: '$tool' not found" >&2; return 1; }
    done

    # ------------------------------------------------------------ 1. wheels
    echo "cuda toolchain: CUDA 13.0 wheels -> $wheels"
    mkdir -p "$wheels"
    local missing=() pin w wheel_files=()
    for pin in "${pins[@]}"; do
        [ -n "$(_cuda_wheel_of "$wheels" "$pin")" ] || missing+=("$pin")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "downloading: ${missing[*]}"
        # A python3 without pip (Debian's, without python3-pip) downloads through a venv's.
        local pip=(python3 -m pip)
        if ! python3 -m pip --version >/dev/null 2>&1; then
            python3 -m venv "$wheels/.pip-venv"
            pip=("$wheels/.pip-venv/bin/python" -m pip)
        fi
        "${pip[@]}" download --disable-pip-version-check --no-deps --only-binary=:all: \
            --dest "$wheels" "${missing[@]}"
    else
        echo "all ${#pins[@]} wheels already downloaded"
    fi
    for pin in "${pins[@]}"; do
        w="$(_cuda_wheel_of "$wheels" "$pin")"
        [ -n "$w" ] || { echo "error: no wheel for $pin after download" >&2; return 1; }
        wheel_files+=("$w")
    done

    # ------------------------------------------------------------ 2. venv
    echo "cuda toolchain: venv -> $venv"
    local stamp="$venv/.cuda-wheels" want_stamp
    want_stamp="$(printf '%s\n' "${wheel_files[@]##*/}")"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want_stamp" ] && [ -x "$venv/bin/python" ]; then
        echo "already installed"
    else
        rm -rf "$venv"
        python3 -m venv "$venv"
        "$venv/bin/python" -m pip install --disable-pip-version-check --quiet --no-deps \
            --no-index "${wheel_files[@]}"
        printf '%s\n' "$want_stamp" >"$stamp"
    fi
    local cu13
    cu13="$("$venv/bin/python" - <<'EOF'
import os, sysconfig
for key in ("platlib", "purelib"):
    d = os.path.join(sysconfig.get_paths()[key], "nvidia", "cu13")
    if os.path.isdir(d):
        print(d)
        break
EOF
)"
    if [ -z "$cu13" ] || [ ! -x "$cu13/bin/nvcc" ]; then
        echo "error: no nvidia/cu13/bin/nvcc in $venv" >&2
        return 1
    fi
    echo "toolkit tree: $cu13"

    # ------------------------------------------------------------ 3. CUDA_HOME
    echo "cuda toolchain: CUDA_HOME -> $cuda_home"
    mkdir -p "$cuda_home/lib64/stubs"
    local d f name base lib
    for d in bin nvvm include; do
        [ -d "$cu13/$d" ] || { echo "error: $cu13/$d missing" >&2; return 1; }
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
        [ -e "$cuda_home/lib64/$lib.so" ] ||
            { echo "error: $cuda_home/lib64/$lib.so missing" >&2; return 1; }
    done

    # ------------------------------------------------------------ 4. libcuda stub
    echo "cuda toolchain: libcuda.so stub (link time only) -> $cuda_home/lib64/stubs"
    (cd "$root" && cargo fetch --quiet --locked)
    local cudarc_dir ver
    cudarc_dir="$(cd "$root" && cargo metadata --locked --format-version 1 \
        --features internvl-server/cuda 2>/dev/null |
        python3 -c '
import json, os, sys
d = json.load(sys.stdin)
ids = {n["id"] for n in d["resolve"]["nodes"]}
dirs = sorted({os.path.dirname(p["manifest_path"]) for p in d["packages"]
               if p["name"] == "cudarc" and p["id"] in ids})
print("\n".join(dirs))')"
    if [ -z "$cudarc_dir" ]; then # fall back to Cargo.lock + the registry source folder
        ver="$(awk '/^name = "cudarc"$/ { getline; gsub(/version = |"/, ""); print; exit }' \
            "$root/Cargo.lock")"
        cudarc_dir="$(compgen -G "${CARGO_HOME:-$HOME/.cargo}/registry/src/*/cudarc-$ver" |
            head -n 1 || true)"
    fi
    if [ "$(printf '%s\n' "$cudarc_dir" | wc -l)" -ne 1 ] || [ ! -d "$cudarc_dir" ]; then
        echo "error: could not locate exactly one cudarc source folder: '$cudarc_dir'" >&2
        return 1
    fi
    local sys_rs="$cudarc_dir/src/driver/sys/mod.rs"
    [ -f "$sys_rs" ] || { echo "error: $sys_rs missing" >&2; return 1; }
    local stub_c="$cuda_home/lib64/stubs/libcuda-stub.c"
    local stub_so="$cuda_home/lib64/stubs/libcuda.so"
    # 999 = CUDA_ERROR_UNKNOWN: if this stub were ever loaded, every call fails loudly.
    local new_c nsym
    new_c="$({
        echo "/* Link-time stub of the CUDA driver: generated from $sys_rs. Never ship. */"
        grep -oE '\bfn cu[A-Za-z0-9_]+' "$sys_rs" | awk '{print $2}' | sort -u |
            awk '{printf "int %s(void) { return 999; }\n", $1}'
    })"
    nsym="$(printf '%s\n' "$new_c" | grep -c '^int ')"
    [ "$nsym" -gt 100 ] || { echo "error: only $nsym cu* symbols found in $sys_rs" >&2; return 1; }
    if [ -f "$stub_so" ] && [ -f "$stub_c" ] && [ "$(cat "$stub_c")" = "$new_c" ]; then
        echo "up to date ($nsym symbols from ${cudarc_dir##*/})"
    else
        printf '%s\n' "$new_c" >"$stub_c"
        gcc -shared -fPIC -O0 -Wl,-soname,libcuda.so.1 -o "$stub_so" "$stub_c"
        echo "built with $nsym symbols from ${cudarc_dir##*/}"
    fi

    # ------------------------------------------------------------ 5. environment
    export CUDA_HOME="$cuda_home"
    export CUDA_PATH="$cuda_home"
    export PATH="$cuda_home/bin:$PATH"
    export CUDA_COMPUTE_CAP="$cap"
    export CUDARC_CUDA_VERSION=13000
    export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-2}"
    unset NVCC # cudaforge prefers $NVCC over CUDA_HOME: make sure the pinned nvcc is used
    echo "cuda toolchain: nvcc $(nvcc --version | grep -o 'release [0-9.]*'), CUDA_HOME=$CUDA_HOME"
}

_cuda_wheel_of() { # wheels-dir pin -> path of its downloaded wheel, or nothing
    local name="${2%%==*}" ver="${2##*==}"
    compgen -G "$1/${name//-/_}-${ver}-*.whl" | head -n 1 || true
}

cuda_toolchain "${1:?usage: source scripts/cuda-toolchain.sh COMPUTE_CAP}"
