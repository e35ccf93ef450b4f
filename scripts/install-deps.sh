#!/usr/bin/env bash
# System packages the build and the tests need, installed when missing: cmake and nasm build
# the vendored libjpeg-turbo (the JPEG decoder Pillow uses, needed for pixel-exact
# preprocessing); g++ (C++20) builds the CPU simulator the tests run the CUDA kernels on;
# Debian's prometheus package (2.42, pinned below) gives `promtool`, which a unit test of the
# /metrics text runs (it fails without it), and `prometheus`, which scripts/e2e.sh runs. The
# package's own service is kept from starting. Then the rustfmt and clippy components.
set -euo pipefail
PROMETHEUS_DEB='prometheus=2.42.0+ds-5*' # Debian 12's; a newer one may lint differently

packages=()
for tool in cmake nasm; do
    command -v "$tool" >/dev/null 2>&1 || packages+=("$tool")
done
command -v c++ >/dev/null 2>&1 || packages+=(g++)
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
    packages+=("$PROMETHEUS_DEB")
fi
if [ ${#packages[@]} -gt 0 ]; then
    echo "installing: ${packages[*]}"
    if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
    # Another apt-get (another job on the machine) may hold the dpkg lock: wait for it, bounded.
    apt=(apt-get -o DPkg::Lock::Timeout=300 -o Acquire::Retries=3)
    # policy-rc.d exit 101 keeps invoke-rc.d from starting packaged services (prometheus's
    # would listen on :9090, which nothing here uses).
    policy=/usr/sbin/policy-rc.d
    made_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
        $sudo chmod 755 "$policy"
        made_policy=1
    fi
    rc=0
    timeout 600 $sudo "${apt[@]}" update -qq || rc=$?
    # Another Debian release has another prometheus: take its own rather than fail.
    for i in "${!packages[@]}"; do
        if [ "${packages[i]}" = "$PROMETHEUS_DEB" ] && [ "$rc" -eq 0 ] \
            && ! apt-cache madison prometheus 2>/dev/null | grep -q ' 2\.42\.0+ds-5'; then
            echo "note: no prometheus 2.42.0+ds-5 in this release's archive: installing its own"
            packages[i]=prometheus
        fi
    done
    if [ "$rc" -eq 0 ]; then
        timeout 900 $sudo env DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y -qq \
            --no-install-recommends "${packages[@]}" >/dev/null || rc=$?
    fi
    if [ "$made_policy" -eq 1 ]; then $sudo rm -f "$policy"; fi
    [ "$rc" -eq 0 ] || { echo "error: apt-get install ${packages[*]} failed ($rc)" >&2; exit 1; }
fi
promtool --version 2>&1 | head -n 1
for component in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$component" \
        || rustup component add "$component"
done
