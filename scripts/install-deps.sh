#!/usr/bin/env bash
# System packages the build needs: cmake and nasm build the vendored libjpeg-turbo (the JPEG
# decoder Pillow uses, needed for pixel-exact preprocessing); g++ (C++20) builds the CPU
# simulator the tests run the CUDA kernels on.
set -euo pipefail
missing=()
for tool in cmake nasm; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
command -v c++ >/dev/null 2>&1 || missing+=(g++)
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi
for component in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$component" \
        || rustup component add "$component"
done
