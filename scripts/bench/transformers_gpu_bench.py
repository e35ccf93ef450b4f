#!/usr/bin/env python3
"""The transformers baseline of `internvl bench`: the same measurements, same model shape.

transformers' `InternVLForConditionalGeneration`, configured from an InternVL-Chat config.json
(upstream's InternVLChatConfig layout: `vision_config`, `llm_config`, `select_layer`,
`downsample_ratio`; e.g. config/models/internvl-chat-chinese-v1.1.json) and patched to V1.1 as
scripts/reference/generate_model.py patches it: pixel shuffle v1 (transformers always applies
v2), the features of ViT layer `select_layer`, CLS dropped. Random weights (transformers' own
initialisation, made directly on the device in the compute dtype: the 19 B model builds in
seconds), `attn_implementation` sdpa by default.

By default the ViT is cut after the layer `select_layer` picks (45 of 48 layers for V1.1) and
its last hidden state used: the same output without running, or keeping the hidden states of,
the three layers upstream never uses (transformers would otherwise keep every layer's hidden
states of every image: 20 GB for 64 images). `--full-vit` builds all layers with
`vision_feature_layer = select_layer` instead, as the reference script does.

Measurements (each prints a line on stderr; `--json PATH` gets everything, rewritten after each
phase so a run stopped part-way leaves what it had):

* warm-up: one generate() of 2 tokens and one vision-encoder pass per `--vit-batch` size;
* `--vit-batch 1,8`: `get_image_features` (ViT + pixel shuffle + projector) on B images already
  on the device, `--vit-runs` timed runs, synchronised; median batch time / B = ms per image;
* `--ttft-runs N`: generate(max_new_tokens=1) of one chat (one image + `--ttft-prompt-tokens`
  text tokens), synchronised: time to first token, median of N;
* each `--concurrency` B: one batched generate() of B identical-length chats (one image +
  `--prompt-tokens` text tokens each, no padding), greedy, `--max-new-tokens` N tokens with EOS
  suppressed (min_new_tokens = N); a streamer timestamps every step (generate() copies each
  step's tokens to the host, which synchronises): decode_tok_s = B * (N - 1) / (last step -
  first step), i.e. while all B chats decode, as `internvl bench` defines it; ttft = call to
  first step; aggregate_tok_s = B * N / wall;
* GPU memory: device memory in use (torch.cuda.mem_get_info: total - free, this process and
  others, CUDA context included) sampled every 20 ms on a thread, as `internvl bench` does,
  plus torch's own max_memory_allocated / max_memory_reserved.

Prompts are token ids, not text: BOS, filler ids, `<img>`, 256 x `<IMG_CONTEXT>`, `</img>`,
filler ids, for the requested count of text tokens (all but the 256 visual ones). The image-token
ids come from `--tokenizer-dir`'s added_tokens.json (the tokenizer `internvl bench` uses).
Pixel values are random (speed does not depend on them). A level that runs out of memory is
reported and the next one runs; the exit status is 1 if anything failed.

On the GPU host (system python3 with torch + transformers; nothing is installed):

    python3 scripts/bench/transformers_gpu_bench.py --config config/models/internvl-chat-chinese-v1.1.json \\
        --json /tmp/transformers.json
On a CPU, with a small checkpoint's config:

    python3 scripts/bench/transformers_gpu_bench.py --config target/bench-model/config.json \\
        --device cpu --dtype float32 --concurrency 1,4 --max-new-tokens 16
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import threading
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"


def fail(message: str, code: int = 3):
    print(f"transformers_gpu_bench: {message}", file=sys.stderr)
    sys.exit(code)


try:
    import torch
    import transformers
except ImportError as e:  # no network on the GPU host: nothing can be installed
    fail(f"needs torch and transformers ({e})")
try:
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, LlamaConfig
    from transformers.generation.streamers import BaseStreamer
except ImportError as e:
    fail(f"transformers {transformers.__version__} has no InternVL ({e}): it needs transformers >= 4.52")


class StepTimes(BaseStreamer):
    """Wall-clock time of every put(): the first carries the prompt, then one per step."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


class MemorySampler:
    """Device memory in use (total - free), sampled on a thread; peaks overall and per phase."""

    def __init__(self, device: torch.device):
        self.device = device
        self.total = torch.cuda.mem_get_info(device)[1]
        self.baseline = self.used()
        self.peak = self.overall = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def used(self) -> int:
        free, total = torch.cuda.mem_get_info(self.device)
        return total - free

    def _run(self):
        while not self._stop.wait(0.02):
            u = self.used()
            self.peak, self.overall = max(self.peak, u), max(self.overall, u)

    def reset(self):
        self.peak = self.used()
        torch.cuda.reset_peak_memory_stats(self.device)

    def phase_peak_mib(self) -> int:
        return max(self.peak, self.used()) >> 20

    def stop(self):
        self._stop.set()
        self._thread.join()


def pixel_shuffle_v1(self, vision_features: torch.Tensor, scale_factor: float = 0.5):
    """Upstream's pixel_shuffle with ps_version v1 (V1.1): transformers' version minus its final
    permute(0, 2, 1, 3). Same as scripts/reference/generate_model.py."""
    n, w, h, c = vision_features.size()
    x = vision_features.view(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    return x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))


def hf_config(cfg: dict, image_token_id: int, full_vit: bool) -> tuple[InternVLConfig, int, int, int]:
    """transformers' InternVLConfig for an InternVL-Chat config.json. Returns it, the ViT layers
    built, the number of visual tokens per image and the image size."""
    vc, lc = cfg["vision_config"], cfg["llm_config"]
    if cfg.get("ps_version", "v1") != "v1":
        fail(f"ps_version {cfg['ps_version']}: only v1 (V1.1) is patched in")
    if not vc.get("qk_normalization", True) or vc.get("qkv_bias", False):
        fail("the vision config must have qk_normalization and no qkv_bias (InternViT-6B)")
    layers = vc["num_hidden_layers"]
    select = cfg["select_layer"]
    used = select if select >= 0 else layers + 1 + select  # hidden_states[used]: after `used` layers
    image_size = cfg.get("force_image_size") or vc["image_size"]
    grid = image_size // vc["patch_size"]
    ratio = cfg["downsample_ratio"]
    image_tokens = int(round(grid * ratio) ** 2)
    vision = InternVLVisionConfig(
        hidden_size=vc["hidden_size"],
        num_attention_heads=vc["num_attention_heads"],
        intermediate_size=vc["intermediate_size"],
        num_hidden_layers=layers if full_vit else used,
        patch_size=vc["patch_size"],
        image_size=image_size,
        layer_norm_eps=vc.get("layer_norm_eps", 1e-6),
        attention_bias=False,
        use_qk_norm=True,
        norm_type=vc.get("norm_type", "rms_norm"),
        hidden_act=vc.get("hidden_act", "gelu"),
        layer_scale_init_value=vc.get("initializer_factor", 0.1),
        use_mean_pooling=True,  # no final norm (upstream has none)
        use_absolute_position_embeddings=True,
        use_mask_token=False,
    )
    text_kwargs = dict(
        vocab_size=lc["vocab_size"],
        hidden_size=lc["hidden_size"],
        intermediate_size=lc["intermediate_size"],
        num_hidden_layers=lc["num_hidden_layers"],
        num_attention_heads=lc["num_attention_heads"],
        num_key_value_heads=lc.get("num_key_value_heads", lc["num_attention_heads"]),
        rms_norm_eps=lc.get("rms_norm_eps", 1e-6),
        max_position_embeddings=lc.get("max_position_embeddings", 4096),
        hidden_act="silu",
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=lc.get("bos_token_id", 1),
        eos_token_id=lc.get("eos_token_id", 2),
        pad_token_id=lc.get("pad_token_id", 0),
    )
    theta = lc.get("rope_theta", 10000.0)
    if hasattr(LlamaConfig(), "rope_parameters"):  # transformers >= 5
        text = LlamaConfig(**text_kwargs, rope_parameters={"rope_type": "default", "rope_theta": theta})
    else:
        text = LlamaConfig(**text_kwargs, rope_theta=theta)
    config = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        image_seq_length=image_tokens,
        downsample_ratio=ratio,
        projector_hidden_act="gelu",
        vision_feature_layer=select if full_vit else -1,
        vision_feature_select_strategy="default",  # drop CLS
        tie_word_embeddings=False,
    )
    return config, vision.num_hidden_layers, image_tokens, image_size


def build_model(config: InternVLConfig, device: torch.device, dtype: torch.dtype, attn: str):
    """Random weights straight on `device` in `dtype` (transformers' own initialisation)."""
    with torch.device(device):
        try:
            model = InternVLForConditionalGeneration._from_config(config, attn_implementation=attn, dtype=dtype)
        except TypeError:  # transformers 4.x
            model = InternVLForConditionalGeneration._from_config(config, attn_implementation=attn, torch_dtype=dtype)
    model.eval()
    model.model.pixel_shuffle = types.MethodType(pixel_shuffle_v1, model.model)
    for p in model.parameters():
        if p.device.type != device.type or p.dtype != dtype:
            fail(f"parameter on {p.device}/{p.dtype}, expected {device}/{dtype}")
    return model


def image_token_ids(tokenizer_dir: Path, vocab_size: int) -> dict[str, int]:
    added = json.loads((tokenizer_dir / "added_tokens.json").read_text())
    ids = {t: added[t] for t in (IMG_START, IMG_END, IMG_CONTEXT)}
    if max(ids.values()) >= vocab_size:
        fail(f"image token ids {ids} of {tokenizer_dir} beyond the model's vocabulary {vocab_size}")
    return ids


def prompt_ids(text_tokens: int, image_tokens: int, special: dict[str, int], bos: int, seed: int) -> list[int]:
    """BOS + 4 filler ids + <img> + visual placeholders + </img> + the rest as filler ids:
    `text_tokens` ids besides the visual ones, like ` <human>: <img>...</img>\\n{question} <bot>:`."""
    if text_tokens < 8:
        fail(f"--prompt-tokens {text_tokens}: at least 8 (BOS, template and image delimiters)")
    g = torch.Generator().manual_seed(seed)
    filler = (torch.randint(3, 1000, (text_tokens - 3,), generator=g)).tolist()
    return [bos, *filler[:4], special[IMG_START], *[special[IMG_CONTEXT]] * image_tokens, special[IMG_END], *filler[4:]]


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(values: list[float]) -> float:
    s = sorted(values)
    return s[(len(s) - 1) // 2]  # nearest rank, as internvl bench


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "config/models/internvl-chat-chinese-v1.1.json"),
                    help="InternVL-Chat config.json (InternVLChatConfig layout)")
    ap.add_argument("--tokenizer-dir", default=str(ROOT / "models/demo-internvl"),
                    help="where added_tokens.json gives the image-token ids (internvl bench's --model)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    ap.add_argument("--attn", choices=("sdpa", "eager", "flash_attention_2"), default="sdpa")
    ap.add_argument("--concurrency", default="1,8,32,64", help="batch sizes of the decode levels ('' or 0: none)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=64, help="text tokens per chat prompt (besides the visual ones)")
    ap.add_argument("--ttft-runs", type=int, default=5)
    ap.add_argument("--ttft-prompt-tokens", type=int, default=None, help="default: --prompt-tokens")
    ap.add_argument("--vit-batch", default="1,8", help="vision-encoder batch sizes ('' : none)")
    ap.add_argument("--vit-runs", type=int, default=5)
    ap.add_argument("--full-vit", action="store_true", help="build all ViT layers (vision_feature_layer = select_layer)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()

    def int_list(s: str) -> list[int]:
        return [int(x) for x in s.split(",") if x.strip() and int(x) > 0]

    levels, vit_batches = int_list(args.concurrency), int_list(args.vit_batch)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("CUDA requested but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = json.loads(Path(args.config).read_text())
    lc = cfg["llm_config"]
    special = image_token_ids(Path(args.tokenizer_dir), lc["vocab_size"])
    config, vit_layers, image_tokens, image_size = hf_config(cfg, special[IMG_CONTEXT], args.full_vit)
    memory = MemorySampler(device) if device.type == "cuda" else None

    t = time.perf_counter()
    model = build_model(config, device, dtype, args.attn)
    sync(device)
    build_s = time.perf_counter() - t
    n_params = sum(p.numel() for p in model.parameters())
    report = {
        "engine": "transformers",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "attn_implementation": args.attn,
        "config": args.config,
        "vit_layers_built": vit_layers,
        "vision_feature_layer": config.vision_feature_layer,
        "parameters": n_params,
        "build_s": round(build_s, 3),
        "image_tokens": image_tokens,
        "pixel_values": "random normal (speed does not depend on them)",
        "gpu_memory": None,
        "vit": [],
        "ttft": None,
        "levels": [],
    }
    failures: list[str] = []

    def write():
        if memory:
            report["gpu_memory"] = {
                "total_mib": memory.total >> 20,
                "before_load_used_mib": memory.baseline >> 20,
                "after_load_used_mib": report.get("_after_load"),
                "peak_used_mib": max(memory.overall, memory.used()) >> 20,
                "torch_max_allocated_mib": report.get("_max_allocated"),
                "torch_max_reserved_mib": report.get("_max_reserved"),
            }
        if args.json:
            out = {k: v for k, v in report.items() if not k.startswith("_")}
            Path(args.json).write_text(json.dumps(out, indent=1) + "\n")

    def track_torch_peaks():
        if memory:
            report["_max_allocated"] = max(report.get("_max_allocated") or 0, torch.cuda.max_memory_allocated(device) >> 20)
            report["_max_reserved"] = max(report.get("_max_reserved") or 0, torch.cuda.max_memory_reserved(device) >> 20)

    if memory:
        report["_after_load"] = memory.used() >> 20
    print(f"transformers {transformers.__version__}, torch {torch.__version__}: {n_params / 1e9:.2f} B parameters "
          f"({vit_layers} ViT layers) built on {device} in {args.dtype} in {build_s:.1f} s", file=sys.stderr)
    write()

    bos, eos, pad = lc.get("bos_token_id", 1), lc.get("eos_token_id", 2), lc.get("pad_token_id", 0)
    max_len = lc.get("max_position_embeddings", 4096)

    def inputs(batch: int, text_tokens: int):
        ids = prompt_ids(text_tokens, image_tokens, special, bos, args.seed)
        input_ids = torch.tensor([ids] * batch, device=device)
        pixel_values = torch.randn(batch, 3, image_size, image_size, device=device, dtype=dtype)
        return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixel_values)

    def generate(batch_inputs, n: int, streamer=None):
        if batch_inputs["input_ids"].shape[1] + n > max_len:
            raise ValueError(f"prompt + {n} tokens exceeds the model's {max_len} positions")
        return model.generate(**batch_inputs, do_sample=False, num_beams=1, max_new_tokens=n, min_new_tokens=n,
                              eos_token_id=eos, pad_token_id=pad, use_cache=True, streamer=streamer)

    def vision(pv):
        return model.model.get_image_features(
            pixel_values=pv,
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        )

    def guarded(label: str, fn, error_value):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001  (out of memory above all: report, go on)
            failures.append(f"{label}: {type(e).__name__}: {e}")
            print(f"FAILED {label}: {type(e).__name__}: {str(e)[:500]}", file=sys.stderr)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return {**error_value, "error": f"{type(e).__name__}: {str(e)[:500]}"}

    with torch.inference_mode():
        t = time.perf_counter()
        generate(inputs(1, args.prompt_tokens), 2)
        for b in vit_batches:
            vision(inputs(b, args.prompt_tokens)["pixel_values"])
        sync(device)
        print(f"warm-up: {time.perf_counter() - t:.1f} s", file=sys.stderr)

        def vit(batch: int):
            if memory:
                memory.reset()
            pv = inputs(batch, args.prompt_tokens)["pixel_values"]
            vision(pv)
            sync(device)
            times = []
            for _ in range(args.vit_runs):
                t0 = time.perf_counter()
                vision(pv)
                sync(device)
                times.append(time.perf_counter() - t0)
            track_torch_peaks()
            p50 = median(times)
            print(f"ViT batch {batch}: {p50 * 1e3:.1f} ms per batch, {p50 * 1e3 / batch:.1f} ms per image",
                  file=sys.stderr)
            return {
                "batch": batch,
                "runs": len(times),
                "ms_per_batch_p50": round(p50 * 1e3, 3),
                "ms_per_batch_mean": round(sum(times) / len(times) * 1e3, 3),
                "ms_per_batch_min": round(min(times) * 1e3, 3),
                "ms_per_image": round(p50 * 1e3 / batch, 3),
                "peak_gpu_used_mib": memory.phase_peak_mib() if memory else None,
            }

        for b in vit_batches:
            report["vit"].append(guarded(f"ViT batch {b}", lambda b=b: vit(b), {"batch": b}))
            write()

        def ttft():
            if memory:
                memory.reset()
            text_tokens = args.ttft_prompt_tokens or args.prompt_tokens
            batch_inputs = inputs(1, text_tokens)
            times = []
            for _ in range(args.ttft_runs):
                sync(device)
                t0 = time.perf_counter()
                out = generate(batch_inputs, 1)
                sync(device)
                times.append(time.perf_counter() - t0)
                assert out.shape[1] == batch_inputs["input_ids"].shape[1] + 1, out.shape
            track_torch_peaks()
            p50 = median(times)
            prompt_len = batch_inputs["input_ids"].shape[1]
            print(f"TTFT (1 image + {text_tokens} text tokens = {prompt_len} prompt tokens): p50 {p50 * 1e3:.1f} ms, "
                  f"min {min(times) * 1e3:.1f} ms over {len(times)} runs", file=sys.stderr)
            return {
                "runs": len(times),
                "prompt_tokens": prompt_len,
                "text_tokens": text_tokens,
                "p50_ms": round(p50 * 1e3, 3),
                "mean_ms": round(sum(times) / len(times) * 1e3, 3),
                "min_ms": round(min(times) * 1e3, 3),
                "max_ms": round(max(times) * 1e3, 3),
                "method": "generate(max_new_tokens=1) wall time, synchronised",
                "peak_gpu_used_mib": memory.phase_peak_mib() if memory else None,
            }

        if args.ttft_runs > 0:
            report["ttft"] = guarded("TTFT", ttft, {})
            write()

        def level(batch: int):
            if memory:
                memory.reset()
            n = args.max_new_tokens
            batch_inputs = inputs(batch, args.prompt_tokens)
            prompt_len = batch_inputs["input_ids"].shape[1]
            streamer = StepTimes()
            sync(device)
            t0 = time.perf_counter()
            out = generate(batch_inputs, n, streamer)
            sync(device)
            wall = time.perf_counter() - t0
            del batch_inputs
            track_torch_peaks()
            if out.shape != (batch, prompt_len + n):
                raise RuntimeError(f"generate() returned {tuple(out.shape)}, expected {(batch, prompt_len + n)}")
            steps = streamer.times[1:]  # the first put() is the prompt
            if len(steps) != n:
                raise RuntimeError(f"{len(steps)} streamer steps for {n} tokens")
            decode_s = steps[-1] - steps[0]
            decode = batch * (n - 1) / decode_s if n > 1 and decode_s > 0 else None
            ttft_s = steps[0] - t0
            result = {
                "concurrency": batch,
                "prompt_tokens": prompt_len,
                "text_tokens": args.prompt_tokens,
                "max_tokens": n,
                "output_tokens": batch * n,
                "wall_s": round(wall, 3),
                "aggregate_tok_s": round(batch * n / wall, 2),
                "decode_tok_s": round(decode, 2) if decode else None,
                "decode_window_s": round(decode_s, 3),
                "decode_window_tokens": batch * (n - 1),
                "decode_window_mean_context": round(prompt_len + n / 2, 1),
                "ttft_p50_ms": round(ttft_s * 1e3, 3),
                "ttft_p99_ms": round(ttft_s * 1e3, 3),
                "itl_p50_ms": round(median([b - a for a, b in zip(steps, steps[1:])]) * 1e3, 3) if n > 1 else None,
                "peak_gpu_used_mib": memory.phase_peak_mib() if memory else None,
            }
            print(f"batch {batch}: decode {result['decode_tok_s']} tok/s, aggregate {result['aggregate_tok_s']} tok/s, "
                  f"TTFT {ttft_s * 1e3:.0f} ms, wall {wall:.1f} s", file=sys.stderr)
            return result

        for b in levels:
            report["levels"].append(guarded(f"batch {b}", lambda b=b: level(b), {"concurrency": b}))
            write()

    if memory:
        memory.stop()
    write()
    if failures:
        for f in failures:
            print(f"FAILED: {f}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
