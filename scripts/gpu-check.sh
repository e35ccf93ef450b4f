#!/usr/bin/env bash
# The GPU check, for a GPU host with no network and no Rust (CUDA driver, nvidia-smi, python3
# with PyPI torch + transformers): run it from the repository root with the CUDA binary built
# by scripts/build-cuda.sh carried along (target/cuda/internvl-cuda-sm90.xz fits the 64 MiB
# carry limit). Designed to finish in under 10 minutes; every step runs under `timeout`, a
# failed step is reported and the next one runs, and a summary comes last:
#   1. machine: the binary's version, the GPU, the driver, the libraries the binary links;
#   2. correctness: greedy answers of the demo checkpoint (models/demo-internvl) on the device,
#      f32 and bf16, against the independent reference's (transformers, f32) recorded in
#      tests/fixtures/reference/model_cases.json: f32 must equal it, bf16 is reported (its
#      rounding may move a greedy step); the first step's top-20 logprobs must match the
#      reference's logits within the dtype's tolerance (scripts/reference/compare_logprobs.py:
#      f32 1e-3, bf16 3 % of the largest |logit|); then `internvl check-kernels` (the CUDA kernels against
#      CPU references, with their tolerances) where the binary has it; if it fails, the
#      benchmarks below run with INTERNVL_ATTENTION=matmul (candle's attention, kernels off);
#   3. internvl bench on the full-size model with random weights (--random-weights CONFIG):
#      decode tok/s at 1, 8, 32, 64 concurrent chats, time to first token of one image + 64
#      text tokens, ViT ms per image at batch 1 and 8, peak GPU memory;
#   4. the same with transformers' InternVL (scripts/bench/transformers_gpu_bench.py: random
#      init, same config, bf16, SDPA) in the same call;
#   5. structured outputs: internvl bench again at GPU_CHECK_STRUCTURED_LEVEL chats (default
#      64) with every chat held to scripts/bench/ocr_layout.schema.json (a page layout that
#      cannot complete within the generated tokens, so both runs do the same work), against
#      the free run of step 3 at that level: the throughput ratio (target: within 5 %) and
#      the grammar masks' time per token (p50, p99);
#   6. quantized weights: for q8_0 and q4k (LLM) with q8_0 vision, internvl bench on the same
#      full-size model at the same levels (decode tok/s, TTFT, peak GPU memory), and the
#      first-step top-5 logprob error against the dense run on the demo checkpoint's
#      one-image case (`generate --logprobs-out`, both in the bench dtype);
#   7. the table: each row ours vs transformers, the speed-up, and the issue's targets, then
#      the structured-outputs rows and the quantized rows beside the dense ones.
# Steps 5 and 6 come last: where the deadline leaves no time they are skipped and say so
# (GPU_CHECK_STEPS="info quantized" runs step 6 alone).
#
# Decode rows: each chat is one 448x448 image (256 visual tokens) + GPU_CHECK_DECODE_TEXT text
# tokens (default 200; 256 + 200 = 456 prompt tokens) and GPU_CHECK_DECODE_TOKENS generated
# tokens (default 256, EOS ignored): contexts run from 456 to 712, ~590 on average while all
# chats decode. (64 text tokens + 512 generated tokens would give the same mean but need 42 GiB
# of KV cache at 64 chats besides 36 GiB of weights: more than an 80 GB H100 holds, for either
# engine, and twice the decode time.)
#
# Environment (all optional):
#   GPU_CHECK_DEVICE    cuda (default) or cpu: cpu runs every step on the CPU in f32, to try the
#                       script on a machine without GPU (with a small GPU_CHECK_CONFIG)
#   GPU_CHECK_CONFIG    model config for the benchmarks (default
#                       config/models/internvl-chat-chinese-v1.1.json)
#   GPU_CHECK_TOKENIZER tokenizer directory (default models/demo-internvl)
#   GPU_CHECK_OUT       where the JSON results and logs go (default /tmp/gpu-check; $OUT on
#                       the device machine brings them back)
#   GPU_CHECK_LEVELS (1,8,32,64)  GPU_CHECK_DECODE_TEXT (200)  GPU_CHECK_DECODE_TOKENS (256)
#   GPU_CHECK_TTFT_TEXT (64)  GPU_CHECK_TTFT_RUNS (5)  GPU_CHECK_VIT_BATCH (1,8)
#   GPU_CHECK_VIT_RUNS (5)  GPU_CHECK_BENCH_ARGS (extra `internvl bench` flags)
#   GPU_CHECK_STRUCTURED_LEVEL (64)
#   GPU_CHECK_STEPS     steps to run (default "info correctness kernels ours transformers
#                       structured quantized")
#   GPU_CHECK_DEADLINE  seconds the whole script may take (default 570); each step's timeout is
#                       cut to what is left
#   INTERNVL_BIN        the binary (default target/cuda/internvl-cuda-sm${CUDA_COMPUTE_CAP:-90},
#                       or its .xz)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
root=$PWD
cap="${CUDA_COMPUTE_CAP:-90}"
device="${GPU_CHECK_DEVICE:-cuda}"
bin="${INTERNVL_BIN:-target/cuda/internvl-cuda-sm$cap}"
config="${GPU_CHECK_CONFIG:-config/models/internvl-chat-chinese-v1.1.json}"
tokenizer="${GPU_CHECK_TOKENIZER:-models/demo-internvl}"
out="${GPU_CHECK_OUT:-/tmp/gpu-check}"
levels="${GPU_CHECK_LEVELS:-1,8,32,64}"
decode_text="${GPU_CHECK_DECODE_TEXT:-200}"
decode_tokens="${GPU_CHECK_DECODE_TOKENS:-256}"
ttft_text="${GPU_CHECK_TTFT_TEXT:-64}"
ttft_runs="${GPU_CHECK_TTFT_RUNS:-5}"
vit_batch="${GPU_CHECK_VIT_BATCH:-1,8}"
vit_runs="${GPU_CHECK_VIT_RUNS:-5}"
structured_level="${GPU_CHECK_STRUCTURED_LEVEL:-64}"
steps=" ${GPU_CHECK_STEPS:-info correctness kernels ours transformers structured quantized} "
deadline="${GPU_CHECK_DEADLINE:-570}"
read -r -a bench_extra <<<"${GPU_CHECK_BENCH_ARGS:-}"
if [ "$device" = cpu ]; then
    dtypes="f32" bench_dtype=f32 torch_dtype=float32
else
    dtypes="f32 bf16" bench_dtype=bf16 torch_dtype=bfloat16
fi
mkdir -p "$out"
# The binary's built-in paths point into the build machine's checkout: use this one's.
export INTERNVL_DEMO_MODEL="$root/models/demo-internvl"
export NO_COLOR=1 # plain log lines in the kept logs
images=(--image tests/fixtures/images/model-a.png --image tests/fixtures/images/model-b.png)

failures=0
summary=()
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }
note() { summary+=("$(printf '%-44s %s' "$1" "$2")"); }
# timeout for a step: its cap, cut to what is left of the deadline (0: no time left)
budget() {
    local left=$((deadline - SECONDS))
    if [ "$left" -lt 15 ]; then echo 0; elif [ "$1" -lt "$left" ]; then echo "$1"; else echo "$left"; fi
}
# run LABEL CAP_SECONDS LOG CMD...: the command under timeout, output shown and kept in LOG
run() {
    local label=$1 cap=$2 log=$3
    shift 3
    local t start rc
    t=$(budget "$cap")
    if [ "$t" -eq 0 ]; then
        fail "$label: skipped, the ${deadline} s deadline is reached"
        note "$label" "SKIPPED (deadline)"
        return 1
    fi
    start=$SECONDS
    timeout --kill-after=10 "$t" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 0 ]; then
        note "$label" "ok ($((SECONDS - start)) s)"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        fail "$label: timed out after $t s"
        note "$label" "TIMEOUT after $t s"
    else
        fail "$label: exit status $rc"
        note "$label" "FAILED (exit $rc, $((SECONDS - start)) s)"
    fi
    return "$rc"
}
want() { [[ "$steps" == *" $1 "* ]]; }

if [ ! -x "$bin" ] && [ -f "$bin.xz" ]; then
    xz -dkc "$bin.xz" >/tmp/internvl-gpu-check && chmod +x /tmp/internvl-gpu-check
    bin=/tmp/internvl-gpu-check
fi
[ -x "$bin" ] || { echo "no binary at $bin (run scripts/build-cuda.sh first)"; exit 2; }

# The CUDA 13 runtime libraries of the host's PyTorch wheels (cuBLAS, cuRAND, cudart).
nvidia_dir=$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__file__) if nvidia.__file__ else list(nvidia.__path__)[0])' 2>/dev/null || true)
for lib in "$nvidia_dir"/cu13/lib "$nvidia_dir"/*/lib; do
    [ -d "$lib" ] && LD_LIBRARY_PATH="$lib:${LD_LIBRARY_PATH:-}"
done
export LD_LIBRARY_PATH

if want info; then
    echo "== 1. machine ($SECONDS s)"
    "$bin" --version
    python3 -c 'import torch, transformers; print("torch", torch.__version__, "| transformers", transformers.__version__)' ||
        echo "python3 has no torch/transformers: the transformers step will fail"
    if [ "$device" = cuda ]; then
        nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,memory.used --format=csv ||
            fail "nvidia-smi"
        if ldd "$bin" | grep "not found"; then fail "libraries missing"; fi
    fi
fi

if want correctness; then
    echo "== 2. correctness: demo checkpoint on $device vs the reference's greedy answers ($SECONDS s)"
    # case name, images, question: the single-message cases of the reference fixtures
    cases=(
        "text||Hello! 请用中文介绍一下你自己，并告诉我今天的天气怎么样？"
        "one_image|model-a.png|请描述这张图片的内容。Describe the picture in detail."
        "two_images|model-a.png model-b.png|What is different between these two pictures? 这两张图片有什么不同？"
    )
    for dtype in $dtypes; do
        for case in "${cases[@]}"; do
            IFS='|' read -r name files question <<<"$case"
            args=()
            for f in $files; do args+=(--image "tests/fixtures/images/$f"); done
            expected=$(python3 -c 'import json, sys
cases = json.load(open("tests/fixtures/reference/model_cases.json"))["cases"]
print(next(c["greedy_text"] for c in cases if c["name"] == sys.argv[1]))' "$name")
            log="$out/answer-$dtype-$name.txt"
            t=$(budget 60)
            [ "$t" -eq 0 ] && { fail "answer $dtype $name: deadline"; continue; }
            got=$(timeout --kill-after=5 "$t" "$bin" generate --model models/demo-internvl "${args[@]}" \
                --prompt "$question" --max-tokens 32 --ignore-eos --device "$device" --dtype "$dtype" \
                --logprobs-out "$out/logprobs-$dtype-$name.jsonl" 2>"$log")
            rc=$?
            sed 's/^/    /' "$log"
            # The first step's logprobs against the reference's logits, within the dtype's
            # tolerance (f32 1e-3; bf16 3 % of the largest |logit|).
            if [ "$rc" -eq 0 ]; then
                if python3 scripts/reference/compare_logprobs.py "$name" \
                    "$out/logprobs-$dtype-$name.jsonl" "$dtype"; then
                    note "logprobs $dtype $name" "PASS"
                else
                    fail "$device $dtype $name: first-step logprobs outside the tolerance"
                    note "logprobs $dtype $name" "FAIL"
                fi
            fi
            if [ "$rc" -ne 0 ]; then
                fail "$device $dtype $name: exit status $rc"
                note "answer $dtype $name" "FAILED (exit $rc)"
            elif [ "$got" = "$expected" ]; then
                echo "PASS: $device $dtype $name: greedy answer equals the reference"
                note "answer $dtype $name" "PASS"
            else
                same=$(python3 -c 'import sys
a, b = sys.argv[1], sys.argv[2]
print(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))))' "$got" "$expected")
                if [ "$dtype" = f32 ]; then
                    fail "$device f32 $name: answer differs from the reference after $same characters"
                    note "answer $dtype $name" "FAIL (same for $same characters)"
                else
                    echo "NOTE: $device $dtype $name: same as the reference for $same of ${#expected} characters"
                    note "answer $dtype $name" "NOTE: same for $same/${#expected} characters"
                fi
                echo "    expected: $expected"
                echo "    got:      $got"
            fi
        done
    done
fi

if want kernels; then
    echo "== 2b. CUDA kernel self-test ($SECONDS s)"
    if [ "$device" != cuda ]; then
        echo "skipped on $device"
    elif "$bin" check-kernels --help >/dev/null 2>&1; then
        if ! run "check-kernels" 120 "$out/check-kernels.log" "$bin" check-kernels; then
            # Still measure the rest, on candle's matmul attention instead of the kernels.
            export INTERNVL_ATTENTION=matmul
            note "internvl bench attention" "matmul (INTERNVL_ATTENTION): a kernel check failed"
        fi
    else
        echo "this binary has no check-kernels subcommand"
        note "check-kernels" "not in this binary"
    fi
fi

# The model the benchmarks run: the config with random weights where the binary can.
model_args=()
if want ours || want structured || want quantized; then
    if "$bin" bench --help 2>/dev/null | grep -q -- --random-weights; then
        model_args=(--random-weights "$config" --model "$tokenizer")
    else
        echo "this binary has no --random-weights: benchmarking the checkpoint in $(dirname "$config")"
        model_args=(--model "$(dirname "$config")")
    fi
fi

if want ours; then
    echo "== 3. internvl bench, $config with random weights, $device $bench_dtype ($SECONDS s)"
    rm -f "$out/internvl.json"
    run "internvl bench" 240 "$out/internvl-bench.log" "$bin" bench "${model_args[@]}" \
        --device "$device" --dtype "$bench_dtype" "${images[@]}" \
        --concurrency "$levels" --prompt-tokens "$decode_text" --max-tokens "$decode_tokens" \
        --ttft-runs "$ttft_runs" --ttft-prompt-tokens "$ttft_text" \
        --vit-batch "$vit_batch" --vit-runs "$vit_runs" --json "$out/internvl.json" "${bench_extra[@]}"
fi

if want transformers; then
    echo "== 4. transformers InternVL, same config, $device $torch_dtype, sdpa ($SECONDS s)"
    rm -f "$out/transformers.json"
    run "transformers bench" 240 "$out/transformers-bench.log" python3 scripts/bench/transformers_gpu_bench.py \
        --config "$config" --tokenizer-dir "$tokenizer" --device "$device" --dtype "$torch_dtype" \
        --concurrency "$levels" --prompt-tokens "$decode_text" --max-new-tokens "$decode_tokens" \
        --ttft-runs "$ttft_runs" --ttft-prompt-tokens "$ttft_text" \
        --vit-batch "$vit_batch" --vit-runs "$vit_runs" --json "$out/transformers.json"
fi

if want structured; then
    echo "== 5. internvl bench, $structured_level chats under a JSON schema ($SECONDS s)"
    rm -f "$out/internvl-structured.json"
    run "internvl bench --json-schema" 150 "$out/internvl-structured-bench.log" "$bin" bench \
        "${model_args[@]}" \
        --device "$device" --dtype "$bench_dtype" "${images[@]}" \
        --concurrency "$structured_level" --prompt-tokens "$decode_text" \
        --max-tokens "$decode_tokens" --json-schema scripts/bench/ocr_layout.schema.json \
        --json "$out/internvl-structured.json" "${bench_extra[@]}"
fi

if want quantized; then
    echo "== 6. quantized weights: q8_0 and q4k, vision q8_0 ($SECONDS s)"
    one_image=(--image tests/fixtures/images/model-a.png --prompt "请描述这张图片的内容。Describe the picture in detail."
        --max-tokens 1 --device "$device" --dtype "$bench_dtype" --model models/demo-internvl)
    run "logprobs dense" 60 "$out/quant-dense.log" "$bin" generate "${one_image[@]}" \
        --logprobs-out "$out/logprobs-dense.jsonl" >/dev/null
    for q in q8_0 q4k; do
        run "logprobs $q" 60 "$out/quant-$q.log" "$bin" generate "${one_image[@]}" \
            --quantize "$q" --quantize-vision q8_0 --logprobs-out "$out/logprobs-$q.jsonl" >/dev/null
        rm -f "$out/internvl-$q.json"
        run "internvl bench --quantize $q" 240 "$out/internvl-$q-bench.log" "$bin" bench \
            "${model_args[@]}" --device "$device" --dtype "$bench_dtype" "${images[@]}" \
            --quantize "$q" --quantize-vision q8_0 \
            --concurrency "$levels" --prompt-tokens "$decode_text" --max-tokens "$decode_tokens" \
            --ttft-runs "$ttft_runs" --ttft-prompt-tokens "$ttft_text" \
            --json "$out/internvl-$q.json" "${bench_extra[@]}"
    done
fi

echo "== 7. summary ($SECONDS s)"
printf '%s\n' "${summary[@]}"
python3 - "$out/internvl.json" "$out/transformers.json" "$device" "$out/internvl-structured.json" \
    "$out" <<'EOF' | tee "$out/summary.md"
import json, sys

def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        print(f"(no results in {path}: {e})")
        return {}

ours, theirs, device = load(sys.argv[1]), load(sys.argv[2]), sys.argv[3]

def level(report, c):
    return next((l for l in report.get("levels") or [] if l.get("concurrency") == c), {})

def vit(report, b):
    return next((v for v in report.get("vit") or [] if v.get("batch") == b), {})

rows = []  # (label, ours, theirs, higher_is_better, target text, target test)
for c in sorted({l["concurrency"] for r in (ours, theirs) for l in r.get("levels") or []}):
    target = {1: (">= 98", lambda v: v >= 98), 64: (">= 2000", lambda v: v >= 2000)}.get(c, ("", None))
    a, b = level(ours, c), level(theirs, c)
    rows.append((f"decode tok/s, concurrency {c} (mean context {a.get('decode_window_mean_context') or '?'})",
                 a.get("decode_tok_s"), b.get("decode_tok_s"), True, *target))
for c in sorted({l["concurrency"] for r in (ours, theirs) for l in r.get("levels") or []}):
    a, b = level(ours, c), level(theirs, c)
    rows.append((f"aggregate tok/s, concurrency {c}", a.get("aggregate_tok_s"), b.get("aggregate_tok_s"), True, "", None))
t_ours, t_theirs = ours.get("ttft") or {}, theirs.get("ttft") or {}
rows.append((f"TTFT ms, 1 image + {t_ours.get('text_tokens', t_theirs.get('text_tokens', '?'))} text tokens",
             t_ours.get("p50_ms"), t_theirs.get("p50_ms"), False, "< 80", lambda v: v < 80))
for bsz in sorted({v["batch"] for r in (ours, theirs) for v in r.get("vit") or []}):
    rows.append((f"ViT ms per image, batch {bsz}", vit(ours, bsz).get("ms_per_image"),
                 vit(theirs, bsz).get("ms_per_image"), False, "", None))
mem = lambda r: (r.get("gpu_memory") or {}).get("peak_used_mib")
rows.append(("peak GPU memory MiB (device used)", mem(ours), mem(theirs), None, "", None))

def fmt(v):
    return "-" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))

print(f"\n{ours.get('engine', 'internvl')} vs transformers {theirs.get('transformers', '?')} "
      f"(torch {theirs.get('torch', '?')}), {theirs.get('device_name') or device}, "
      f"{ours.get('dtype', '?')} / {theirs.get('dtype', '?')}")
print("| measurement | internvl | transformers | speed-up | >= 2x | target | met |")
print("| --- | ---: | ---: | ---: | :---: | ---: | :---: |")
for label, a, b, higher, target, test in rows:
    speedup = None
    if a and b and higher is not None:
        speedup = a / b if higher else b / a
    two = "-" if speedup is None else ("yes" if speedup >= 2 else "NO")
    met = "-" if test is None or a is None else ("yes" if test(a) else "NO")
    if device != "cuda" and test is not None:
        met = f"({met}: not a GPU)"
    print(f"| {label} | {fmt(a)} | {fmt(b)} | {'-' if speedup is None else f'{speedup:.2f}x'} | {two} "
          f"| {target or '-'} | {met} |")
print("speed-up: internvl / transformers for tok/s, transformers / internvl for times; "
      "memory: no target (both include the CUDA context)")
for r, name in ((ours, "internvl"), (theirs, "transformers")):
    errors = [x for x in (r.get("levels") or []) + (r.get("vit") or []) + [r.get("ttft") or {}] if x.get("error")]
    for x in errors:
        print(f"{name} error: {x['error'][:300]}")

structured = load(sys.argv[4])
for s in structured.get("levels") or []:
    c = s.get("concurrency")
    free = level(ours, c)
    print(f"\nstructured outputs, {c} chats, every chat under {structured.get('json_schema')}:")
    print("| measurement | free | constrained | constrained / free | within 5 % |")
    print("| --- | ---: | ---: | ---: | :---: |")
    for key, label in (("decode_tok_s", "decode tok/s"), ("aggregate_tok_s", "aggregate tok/s")):
        a, b = free.get(key), s.get(key)
        ratio = b / a if a and b else None
        ok = "-" if ratio is None else ("yes" if ratio >= 0.95 else "NO")
        print(f"| {label} | {fmt(a)} | {fmt(b)} | {'-' if ratio is None else f'{ratio:.3f}'} | {ok} |")
    print(f"output tokens: free {free.get('output_tokens')}, constrained {s.get('output_tokens')}; "
          f"mask p50 / p99 / mean: {fmt(s.get('grammar_mask_p50_us'))} / "
          f"{fmt(s.get('grammar_mask_p99_us'))} / {fmt(s.get('grammar_mask_mean_us'))} us "
          f"over {s.get('grammar_masks')} masks")
    if s.get("error"):
        print(f"structured error: {s['error'][:300]}")

def first_step(path):
    try:
        with open(path) as f:
            line = json.loads(f.readline())
        return {t: lp for t, lp in line["top"]}
    except (OSError, ValueError, KeyError) as e:
        return None

out = sys.argv[5]
dense_lp = first_step(f"{out}/logprobs-dense.jsonl")
quant = {q: load(f"{out}/internvl-{q}.json") for q in ("q8_0", "q4k")}
if any(quant.values()) or dense_lp:
    print("\nquantized weights (LLM type, vision q8_0) beside dense:")
    print("| measurement | dense | q8_0 | q4k |")
    print("| --- | ---: | ---: | ---: |")
    levels_q = sorted({l["concurrency"] for r in [ours, *quant.values()] for l in r.get("levels") or []})
    for c in levels_q:
        print(f"| decode tok/s, concurrency {c} | {fmt(level(ours, c).get('decode_tok_s'))} | "
              + " | ".join(fmt(level(quant[q], c).get("decode_tok_s")) for q in quant) + " |")
    ttft = lambda r: (r.get("ttft") or {}).get("p50_ms")
    print(f"| TTFT ms | {fmt(ttft(ours))} | " + " | ".join(fmt(ttft(quant[q])) for q in quant) + " |")
    print(f"| peak GPU memory MiB | {fmt(mem(ours))} | " + " | ".join(fmt(mem(quant[q])) for q in quant) + " |")
    errors = []
    for q in quant:
        lp = first_step(f"{out}/logprobs-{q}.jsonl")
        if dense_lp is None or lp is None:
            errors.append("-")
            continue
        top5 = sorted(dense_lp, key=dense_lp.get, reverse=True)[:5]
        diffs = [abs(lp[t] - dense_lp[t]) for t in top5 if t in lp]
        errors.append(f"{max(diffs):.3f} ({len(diffs)}/5 in its top 20)" if diffs else "none shared")
    print("| first-step top-5 logprob error vs dense (demo, one image) | 0 | " + " | ".join(errors) + " |")
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || fail "summary table"
echo "results: $out/internvl.json, $out/transformers.json, $out/summary.md, logs in $out"
echo "gpu-check: $failures failed, $SECONDS s"
[ "$failures" -eq 0 ]
