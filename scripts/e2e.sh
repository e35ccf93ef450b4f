#!/usr/bin/env bash
# End-to-end test: the official OpenAI Python and Node SDKs and a real Prometheus against
# `internvl serve`.
#
# 1. Installs what it needs when missing: a venv under target/e2e-venv (git-ignored) with the
#    pinned packages of tests/e2e/requirements.txt; the Node SDK pinned by
#    tests/e2e/node/package-lock.json (`npm ci` into tests/e2e/node/node_modules, git-ignored,
#    again only when the lock file changed); and (by scripts/install-deps.sh, which
#    scripts/test.sh runs first) Debian's `prometheus` package for the `prometheus` and
#    `promtool` binaries; the package's own service is kept from starting. Node and npm must
#    already be installed (Node 20 or later); without them the Node tests count as failed.
# 2. Starts the debug server (building it if absent) on a free loopback port, with an API key,
#    and our own Prometheus on another free loopback port with tests/e2e/prometheus.yml (1s
#    scrapes) and a temporary storage directory; waits for /health and for a first scrape.
# 3. Runs pytest on tests/e2e (the SDK tests, structured outputs and tool calls, then
#    Prometheus queries over what it scraped), then Node's built-in test runner on
#    tests/e2e/node (the Node SDK: an image chat, a stream, a JSON schema, a tool call, errors),
#    and `promtool check metrics` on the /metrics body before and after.
# 4. Prints `e2e: N passed, M failed` (pytest's and Node's tests and the scripted checks; a
#    skipped test, a crash, a timeout or a failed install each counts as a failure) and exits
#    non-zero on any failure. Both processes are
#    stopped on exit, whatever happens. Every wait and network call is bounded in time, and
#    only 127.0.0.1 is contacted (besides the package registries when installing).
#
# Environment: INTERNVL_BIN (default target/debug/internvl), E2E_KEEP_TMP=1 keeps the logs.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
started=$(date +%s)

export no_proxy="127.0.0.1,localhost${no_proxy:+,$no_proxy}"
export NO_PROXY="$no_proxy"
export PYTHONDONTWRITEBYTECODE=1

log() { printf 'e2e: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    echo "e2e: 0 passed, 1 failed"
    exit 1
}

if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
# Another apt-get (another job on the machine) may hold the dpkg lock: wait for it, bounded.
APT=(apt-get -o DPkg::Lock::Timeout=300 -o Acquire::Retries=3)

# --- Python: the pinned OpenAI SDK and pytest in a venv -----------------------------------------
VENV="$ROOT/target/e2e-venv"
REQS="$ROOT/tests/e2e/requirements.txt"
stamp="$(sha256sum "$REQS" | cut -d' ' -f1)"
if [ "$(cat "$VENV/.requirements-sha256" 2>/dev/null)" != "$stamp" ]; then
    log "installing the Python packages of tests/e2e/requirements.txt into target/e2e-venv"
    rm -rf "$VENV"
    mkdir -p "$ROOT/target"
    if ! python3 -m venv "$VENV" 2>/dev/null; then
        # Debian's python3 needs python3-venv for ensurepip.
        rm -rf "$VENV"
        timeout 600 $sudo "${APT[@]}" update -qq
        timeout 900 $sudo env DEBIAN_FRONTEND=noninteractive "${APT[@]}" install -y -qq python3-venv
        python3 -m venv "$VENV"
    fi
    timeout 900 "$VENV/bin/python" -m pip install --disable-pip-version-check -q \
        --default-timeout 60 -r "$REQS" || die "pip install failed"
    echo "$stamp" >"$VENV/.requirements-sha256"
fi
PY="$VENV/bin/python"
"$PY" -c 'import openai, pytest; print("e2e: openai", openai.__version__, "pytest", pytest.__version__)'

# --- Prometheus: Debian's package, without its service (scripts/install-deps.sh) -----------------
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
    log "installing Debian's prometheus package (scripts/install-deps.sh)"
    bash "$ROOT/scripts/install-deps.sh" >&2 || die "scripts/install-deps.sh failed"
fi
prometheus --version 2>&1 | head -1 | sed 's/^/e2e: /'

# --- The server binary ----------------------------------------------------------------------------
BIN="${INTERNVL_BIN:-$ROOT/target/debug/internvl}"
if [ ! -x "$BIN" ]; then
    log "building the debug server"
    timeout 3000 cargo build -p internvl-server --locked
fi
[ -x "$BIN" ] || die "no server binary at $BIN"

# --- Temporary state and cleanup ------------------------------------------------------------------
TMP="$(mktemp -d "${TMPDIR:-/tmp}/internvl-e2e.XXXXXX")"
SERVER_PID=""
PROM_PID=""
stop_pid() { # pid, name: SIGTERM, up to 10s, then SIGKILL
    local pid=$1 _
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "$2 ignored SIGTERM; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_pid "$PROM_PID" prometheus
    stop_pid "$SERVER_PID" server
    if [ "$rc" -ne 0 ]; then
        for f in server.log prometheus.log; do
            [ -s "$TMP/$f" ] || continue
            log "last lines of $f:"
            tail -n 30 "$TMP/$f" | sed 's/^/    /' >&2
        done
    fi
    if [ "${E2E_KEEP_TMP:-0}" = 1 ]; then log "kept $TMP"; else rm -rf "$TMP"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() {
    "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
http_code() { # url [curl args...]: the status code, 000 when unreachable
    local url=$1
    shift
    curl -s -o /dev/null -w '%{http_code}' --noproxy '*' --connect-timeout 2 -m 5 "$@" "$url" || true
}
wait_until() { # seconds, description, command...: polls every 0.25s
    local limit=$1 what=$2 deadline
    shift 2
    deadline=$(($(date +%s) + limit))
    until "$@"; do
        [ "$(date +%s)" -lt "$deadline" ] || {
            log "timed out after ${limit}s waiting for $what"
            return 1
        }
        sleep 0.25
    done
}

# --- Start the server -----------------------------------------------------------------------------
API_KEY="e2e-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
PORT=$(free_port)
BASE="http://127.0.0.1:$PORT"
log "starting the server on $BASE"
"$BIN" serve --host 127.0.0.1 --port "$PORT" --kv-cache-memory 64MiB --api-key "$API_KEY" \
    --shutdown-timeout 5 >"$TMP/server.log" 2>&1 &
SERVER_PID=$!
server_up() {
    kill -0 "$SERVER_PID" 2>/dev/null || die "the server exited (see its log below)"
    [ "$(http_code "$BASE/health")" = 200 ]
}
wait_until 120 "the server's /health" server_up || die "the server did not become healthy"
log "server healthy ($(($(date +%s) - started))s since the start)"

# --- Start Prometheus -----------------------------------------------------------------------------
PROM_PORT=$(free_port)
PROM="http://127.0.0.1:$PROM_PORT"
# Our copy of the config, pointed at this run's port.
sed "s/127\.0\.0\.1:8000/127.0.0.1:$PORT/" tests/e2e/prometheus.yml >"$TMP/prometheus.yml"
grep -q "127.0.0.1:$PORT" "$TMP/prometheus.yml" || die "could not point the config at the server"

passed=0
failed=0
check() { # name, command...: a scripted check, counted in the summary
    local name=$1
    shift
    if "$@"; then
        passed=$((passed + 1))
        log "PASS $name"
    else
        failed=$((failed + 1))
        log "FAIL $name"
    fi
}

check "promtool check config" promtool check config "$TMP/prometheus.yml" >/dev/null

log "starting Prometheus on $PROM"
prometheus --config.file "$TMP/prometheus.yml" --storage.tsdb.path "$TMP/prometheus-data" \
    --web.listen-address "127.0.0.1:$PROM_PORT" --storage.tsdb.retention.time 1h \
    >"$TMP/prometheus.log" 2>&1 &
PROM_PID=$!
prom_ready() {
    kill -0 "$PROM_PID" 2>/dev/null || die "Prometheus exited (see its log below)"
    [ "$(http_code "$PROM/-/ready")" = 200 ]
}
wait_until 60 "Prometheus to be ready" prom_ready || die "Prometheus did not become ready"
scraped() { # up{job="internvl"} is 1: a scrape of our /metrics succeeded
    curl -s --noproxy '*' -m 5 -G "$PROM/api/v1/query" --data-urlencode 'query=up{job="internvl"}' |
        grep -q '"value":\[[0-9.]*,"1"\]'
}
wait_until 30 "a first successful scrape" scraped || die "Prometheus never scraped the server"
log "Prometheus scraped the server"

# --- promtool on the metrics text -----------------------------------------------------------------
# `promtool check metrics` exits 1 on a parse error and 3 on lint problems. Our names use the
# `internvl:` prefix (like vLLM's `vllm:`), which its linter always flags ("metric names should
# not contain ':'") although the format and Prometheus accept them; every other problem fails.
promtool_metrics() { # label
    local body="$TMP/metrics-$1.txt" out="$TMP/promtool-$1.txt" rc=0
    curl -sf --noproxy '*' -m 10 "$BASE/metrics" -o "$body" || return 1
    promtool check metrics <"$body" >"$out" 2>&1 || rc=$?
    if [ "$rc" -eq 0 ]; then return 0; fi
    if [ "$rc" -eq 3 ] && ! grep -v "metric names should not contain ':'" "$out" | grep -q .; then
        log "promtool ($1): only the expected ':' lint, on $(wc -l <"$out") metric families"
        return 0
    fi
    log "promtool check metrics ($1) exited $rc:"
    sed 's/^/    /' "$out" >&2
    return 1
}
check "promtool check metrics (fresh server)" promtool_metrics fresh

# --- pytest: the SDK and the Prometheus queries ---------------------------------------------------
log "running pytest on tests/e2e"
rc=0
E2E_BASE_URL="$BASE/v1" E2E_API_KEY="$API_KEY" E2E_MODEL=demo-internvl \
    E2E_PROMETHEUS_URL="$PROM" timeout 900 "$PY" -m pytest tests/e2e -v -p no:cacheprovider \
    --junitxml "$TMP/junit.xml" || rc=$?
counts=$("$PY" - "$TMP/junit.xml" <<'EOF' || echo "0 0 0"
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
t = sum(int(s.get("tests", 0)) for s in suites)
f = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
s = sum(int(s.get("skipped", 0)) for s in suites)
print(t - f - s, f, s)
EOF
)
read -r py_passed py_failed py_skipped <<<"$counts"
passed=$((passed + py_passed))
failed=$((failed + py_failed + py_skipped))
if [ "$rc" -ne 0 ] && [ "$py_failed" -eq 0 ]; then failed=$((failed + 1)); fi # crash / timeout
if [ "$py_passed" -eq 0 ]; then failed=$((failed + 1)); fi
[ "$py_skipped" -eq 0 ] || log "$py_skipped pytest tests were skipped (counted as failed)"

# --- Node: the official OpenAI Node SDK under Node's built-in test runner -----------------------
NODE_DIR="$ROOT/tests/e2e/node"
node_install() { # npm ci from the lock file, skipped when node_modules was installed from this one
    local stamp
    stamp="$(cat "$NODE_DIR/package.json" "$NODE_DIR/package-lock.json" | sha256sum | cut -d' ' -f1)"
    if [ "$(cat "$NODE_DIR/node_modules/.e2e-lock-sha256" 2>/dev/null)" = "$stamp" ]; then
        return 0
    fi
    log "installing the Node packages of tests/e2e/node/package-lock.json (npm ci)"
    (cd "$NODE_DIR" && timeout 600 npm ci --no-audit --no-fund --loglevel=error) >&2 || return 1
    echo "$stamp" >"$NODE_DIR/node_modules/.e2e-lock-sha256"
}
tap_count() { # file, name: the count of TAP's closing `# name N` line, empty when absent
    [ -f "$1" ] || return 0
    sed -n "s/^# $2 \([0-9][0-9]*\)\$/\1/p" "$1" | tail -n 1 || true
}
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    log "FAIL the Node SDK tests: node and npm are not both installed"
    failed=$((failed + 1))
elif ! node_install; then
    log "FAIL the Node SDK tests: npm ci failed in tests/e2e/node"
    failed=$((failed + 1))
else
    log "running node --test in tests/e2e/node (node $(node --version)," \
        "openai $(node -p 'require("./tests/e2e/node/node_modules/openai/package.json").version' 2>/dev/null || echo '?'))"
    rc=0
    (cd "$NODE_DIR" && E2E_BASE_URL="$BASE/v1" E2E_API_KEY="$API_KEY" E2E_MODEL=demo-internvl \
        timeout 600 node --test --test-timeout=300000 \
        --test-reporter=spec --test-reporter-destination=stdout \
        --test-reporter=tap --test-reporter-destination="$TMP/node.tap" \
        openai_sdk.test.mjs) || rc=$?
    node_passed=$(tap_count "$TMP/node.tap" pass)
    node_failed=0
    for kind in fail cancelled skipped todo; do
        n=$(tap_count "$TMP/node.tap" "$kind")
        node_failed=$((node_failed + ${n:-0}))
    done
    if [ -z "$node_passed" ]; then # no summary: it crashed or timed out
        log "node --test exited $rc without a summary (counted as failed)"
        node_passed=0
        node_failed=$((node_failed + 1))
    elif [ "$rc" -ne 0 ] && [ "$node_failed" -eq 0 ]; then
        log "node --test exited $rc with no failed test (counted as failed)"
        node_failed=1
    fi
    if [ "$node_passed" -eq 0 ]; then node_failed=$((node_failed + 1)); fi
    log "node: $node_passed passed, $node_failed failed"
    passed=$((passed + node_passed))
    failed=$((failed + node_failed))
fi

check "promtool check metrics (after the tests)" promtool_metrics after
server_alive() { kill -0 "$SERVER_PID" 2>/dev/null && [ "$(http_code "$BASE/health")" = 200 ]; }
check "server still healthy after the tests" server_alive

log "finished in $(($(date +%s) - started))s"
echo "e2e: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
