#!/usr/bin/env bash
# The GPU check, for a GPU host with no network and no Rust: run it from the repository root
# with the CUDA binary built here by scripts/build-cuda.sh carried along
# (target/cuda/internvl-cuda-sm90.xz, under the 64 MiB carry limit). It prints:
#   1. the GPU, the driver and whether every library the binary needs resolves;
#   2. correctness: greedy answers of the demo checkpoint on CUDA (f32 and bf16) against the
#      same binary on the CPU, which the tests hold equal to the independent reference;
#   3. the engine benchmark on CUDA (concurrent image chats on the demo checkpoint).
# GPU_CHECK_DEVICE=cpu runs every step on the CPU (to try the script on a machine without GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
cap="${CUDA_COMPUTE_CAP:-90}"
device="${GPU_CHECK_DEVICE:-cuda}"
bin="${INTERNVL_BIN:-target/cuda/internvl-cuda-sm$cap}"
failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }

if [ ! -x "$bin" ] && [ -f "$bin.xz" ]; then
    xz -dkc "$bin.xz" > /tmp/internvl-gpu-check && chmod +x /tmp/internvl-gpu-check
    bin=/tmp/internvl-gpu-check
fi
[ -x "$bin" ] || { echo "no binary at $bin (run scripts/build-cuda.sh first)"; exit 2; }

# The CUDA 13 runtime libraries of the host's PyTorch wheels (cuBLAS, cuRAND, cudart).
nvidia_dir=$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__file__) if nvidia.__file__ else list(nvidia.__path__)[0])' 2>/dev/null || true)
for lib in "$nvidia_dir"/cu13/lib "$nvidia_dir"/*/lib; do
    [ -d "$lib" ] && LD_LIBRARY_PATH="$lib:${LD_LIBRARY_PATH:-}"
done
export LD_LIBRARY_PATH

echo "== 1. machine"
"$bin" --version
if [ "$device" = cuda ]; then
    nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv || fail "nvidia-smi"
    if ldd "$bin" | grep "not found"; then fail "libraries missing"; fi
fi

echo "== 2. correctness (demo checkpoint, greedy, 32 tokens)"
answer() {
    "$bin" generate --image tests/fixtures/images/model-a.png --prompt "请描述这张图片" \
        --max-tokens 32 --ignore-eos "$@" 2>/tmp/gpu-check-timings.txt
    local rc=$?
    cat /tmp/gpu-check-timings.txt >&2
    return $rc
}
reference=$(answer --device cpu --dtype f32) || fail "CPU run"
dtypes="f32 bf16"
[ "$device" = cpu ] && dtypes=f32   # candle's CPU matmul has no bf16
for dtype in $dtypes; do
    got=$(answer --device "$device" --dtype "$dtype") || { fail "$device $dtype run"; continue; }
    if [ "$got" = "$reference" ]; then
        echo "PASS: $device $dtype greedy answer equals the CPU f32 one"
    elif [ "$dtype" = bf16 ]; then
        echo "NOTE: $device bf16 greedy answer differs from CPU f32 (bf16 rounding): $got"
    else
        fail "$device f32 answer differs: expected [$reference], got [$got]"
    fi
done

echo "== 3. engine benchmark on $device (demo checkpoint)"
"$bin" bench --device "$device" --concurrency 1,16,64 --max-tokens 128 || fail "bench"

echo "gpu-check: $failures failed"
[ "$failures" -eq 0 ]
