#!/usr/bin/env bash
# The nvcc scripts/clippy-cuda.sh gives cargo (as $NVCC): the real nvcc ($REAL_NVCC) for every
# call but one kind: compiling to an object (`-c`) one of candle-kernels' MoE/GGUF sources
# (src/moe/, src/mmq_gguf/, src/mmvq_gguf.cu), whose objects only go into the libmoe.a that
# final binaries link. `cargo clippy` links nothing, so an empty object stands in for each,
# and the ~15 nvcc compilations that were most of the lint's time (minutes each on 2 cores)
# are skipped. Everything read by the lint is still compiled for real: candle-kernels' PTX
# (included in its code) and the project's own kernels (crates/model/build.rs, `--ptx`).
# The release build (scripts/build-cuda.sh) never uses this.
set -euo pipefail
: "${REAL_NVCC:?the real nvcc}"
compile=0 out="" src=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
        -c) compile=1 ;;
        -o) out="${args[i + 1]:-}" ;;
        *.cu) src="${args[i]}" ;;
    esac
done
if [ "$compile" -eq 1 ] && [ -n "$out" ] && [ -n "$src" ]; then
    path="$(realpath -m "$src")"
    case "$path" in
        */candle-kernels-*/src/moe/*.cu | */candle-kernels-*/src/mmq_gguf/*.cu | \
            */candle-kernels-*/src/mmvq_gguf.cu)
            exec gcc -c -x c /dev/null -o "$out"
            ;;
    esac
fi
exec "$REAL_NVCC" "$@"
