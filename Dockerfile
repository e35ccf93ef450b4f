# syntax=docker/dockerfile:1
#
# internvl: the OpenAI-compatible InternVL-Chat V1.1 server as a container image.
#
# GPU image (the default target; CUDA 13.0, needs NVIDIA driver >= 580 on the host):
#   docker build -t internvl:cuda --build-arg GIT_COMMIT="$(git rev-parse --short HEAD)" .
#   docker build -t internvl:cuda-sm80 --build-arg CUDA_COMPUTE_CAP=80 .     # A100
#   docker run --gpus all -p 8000:8000 \
#     -v /data/InternVL-Chat-Chinese-V1-1:/models/InternVL-Chat-Chinese-V1-1:ro internvl:cuda
#
# CPU image (no CUDA; serves the bundled demo checkpoint unless INTERNVL_MODEL / --model says
# otherwise; the real model on CPU needs ~76 GB of RAM and is slow):
#   docker build --target cpu -t internvl:cpu .
#   docker run -p 8000:8000 internvl:cpu
#
# Both images: ENTRYPOINT is the `internvl` binary and CMD is `serve`, so
#   docker run IMAGE serve --max-num-seqs 64 ...     adds flags,
#   docker run IMAGE generate --prompt ...           runs another subcommand.
# Settings come from flags > INTERNVL_* environment > --config FILE > defaults. The images set
# INTERNVL_HOST=0.0.0.0 (and the GPU image INTERNVL_DEVICE and INTERNVL_MODEL): being
# environment variables they beat a --config file; override them with flags or -e.
# A GPU image runs only on the compute capability it was built for (90 builds sm_90a code,
# which runs on H100/H200 only).

ARG CUDA_VERSION=13.0.1
ARG UBUNTU_VERSION=24.04
ARG RUST_VERSION=1.95.0

# ------------------------------------------------------------------ CPU: build
FROM rust:${RUST_VERSION}-bookworm AS cpu-builder
ARG GIT_COMMIT=
# cmake and nasm build the vendored libjpeg-turbo.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake nasm pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The cache mounts keep the crate registry and the target directory between builds (BuildKit);
# the binary is copied out because the target directory is not part of the image, without its
# line tables (the release profile keeps them for profiling; ~100 MB of the CUDA binary).
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,id=internvl-target-cpu,sharing=locked \
    INTERNVL_GIT_COMMIT="${GIT_COMMIT}" cargo build --release --locked -p internvl-server \
 && install -D -m 0755 target/release/internvl /out/internvl \
 && strip --strip-debug /out/internvl

# ------------------------------------------------------------------ CPU: runtime
FROM debian:bookworm-slim AS cpu
# ca-certificates: http(s) image URLs are fetched with rustls over the system CA roots.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 internvl \
 && useradd --system --uid 10001 --gid internvl --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin internvl
COPY --from=cpu-builder /out/internvl /usr/local/bin/internvl
COPY models/demo-internvl /opt/internvl/models/demo-internvl
# Two malloc arenas: with glibc's default (8 per core) the short-lived blocking-pool threads
# leave RSS creeping upward; with two it stays flat (docs/reliability.md, the soak).
ENV INTERNVL_HOST=0.0.0.0 \
    INTERNVL_PORT=8000 \
    INTERNVL_DEMO_MODEL=/opt/internvl/models/demo-internvl \
    MALLOC_ARENA_MAX=2
# Mount a real checkpoint here and pass --model /models/NAME (or INTERNVL_MODEL).
VOLUME ["/models"]
USER 10001:10001
EXPOSE 8000
# /health: 200 once the model is loaded, 503 while loading or draining. No curl in the image:
# bash's /dev/tcp speaks the one HTTP/1.0 request.
HEALTHCHECK --interval=15s --timeout=5s --start-period=2m --retries=3 \
    CMD ["bash", "-c", "exec 3<>\"/dev/tcp/127.0.0.1/${INTERNVL_PORT:-8000}\" && printf 'GET /health HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && read -r _ code _ <&3 && [ \"$code\" = 200 ]"]
ENTRYPOINT ["internvl"]
CMD ["serve"]

# ------------------------------------------------------------------ CUDA: build
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu${UBUNTU_VERSION} AS cuda-builder
ARG RUST_VERSION
ARG GIT_COMMIT=
# 90 = H100/H200 (builds sm_90a), 80 = A100, 89 = L4/L40S; what cudaforge accepts.
ARG CUDA_COMPUTE_CAP=90
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl build-essential cmake nasm \
        pkg-config \
 && rm -rf /var/lib/apt/lists/*
ENV RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:${PATH}
RUN curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
    | sh -s -- -y --no-modify-path --profile minimal --default-toolchain "${RUST_VERSION}" \
 && rustc --version
# The devel image has nvcc and lib64/stubs/libcuda.so (link time only; the driver's libcuda.so.1
# is injected at run time by the NVIDIA container toolkit). No GPU is needed to build.
ENV CUDA_HOME=/usr/local/cuda \
    CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP} \
    CUDARC_CUDA_VERSION=13000
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,id=internvl-target-cuda,sharing=locked \
    INTERNVL_GIT_COMMIT="${GIT_COMMIT}" \
    cargo build --release --locked -p internvl-server --features cuda \
 && install -D -m 0755 target/release/internvl /out/internvl \
 && strip --strip-debug /out/internvl
# Collect exactly the CUDA libraries the binary links (cudart, cublas, cublasLt, curand, nvrtc),
# found by ldd, plus nvrtc's builtins library that nvrtc loads by itself. libcuda.so.1 stays
# unresolved here: it is the driver's.
RUN mkdir -p /out/lib \
 && ldd /out/internvl | tee /out/ldd.txt \
 && awk '$2 == "=>" && $3 ~ /\/cuda/ { print $3 }' /out/ldd.txt | xargs -r cp -L -t /out/lib/ \
 && if ls /out/lib/libnvrtc.so.* >/dev/null 2>&1; then \
        cp -L "${CUDA_HOME}"/lib64/libnvrtc-builtins.so.* /out/lib/; \
    fi \
 && missing="$(awk '/not found/ && $1 != "libcuda.so.1" { print $1 }' /out/ldd.txt)" \
 && if [ -n "${missing}" ]; then echo "unresolved libraries: ${missing}" >&2; exit 1; fi \
 && ls -l /out/lib

# ------------------------------------------------------------------ CUDA: runtime (default)
# The `base` flavour (cudart and the container-toolkit settings only) plus the libraries copied
# above: the `runtime` flavour would add ~2.5 GB of CUDA libraries this binary never loads
# (cuFFT, cuSPARSE, cuSOLVER, NPP, nvJPEG, NCCL).
FROM nvidia/cuda:${CUDA_VERSION}-base-ubuntu${UBUNTU_VERSION} AS cuda
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 internvl \
 && useradd --system --uid 10001 --gid internvl --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin internvl
COPY --from=cuda-builder /out/lib/ /usr/local/lib/internvl/
COPY --from=cuda-builder /out/internvl /usr/local/bin/internvl
# Every library but the driver's must resolve in the final image.
RUN echo /usr/local/lib/internvl > /etc/ld.so.conf.d/internvl.conf \
 && ldconfig \
 && missing="$(ldd /usr/local/bin/internvl | awk '/not found/ && $1 != "libcuda.so.1" { print $1 }')" \
 && if [ -n "${missing}" ]; then echo "unresolved libraries: ${missing}" >&2; exit 1; fi
# Two malloc arenas, as in the CPU image.
ENV INTERNVL_HOST=0.0.0.0 \
    INTERNVL_PORT=8000 \
    INTERNVL_DEVICE=cuda \
    INTERNVL_MODEL=/models/InternVL-Chat-Chinese-V1-1 \
    MALLOC_ARENA_MAX=2
# The checkpoint, as published (38 GB in bf16), mounted read-only.
VOLUME ["/models"]
USER 10001:10001
EXPOSE 8000
# Loading 38 GB takes minutes: failures during the start period do not count.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30m --retries=3 \
    CMD ["bash", "-c", "exec 3<>\"/dev/tcp/127.0.0.1/${INTERNVL_PORT:-8000}\" && printf 'GET /health HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && read -r _ code _ <&3 && [ \"$code\" = 200 ]"]
ENTRYPOINT ["internvl"]
CMD ["serve"]
