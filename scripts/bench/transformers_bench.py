#!/usr/bin/env python3
"""Throughput baseline: transformers' InternVLForConditionalGeneration on CPU.

Loads an InternVL-Chat V1.1 checkpoint in the ORIGINAL upstream layout (config.json + bf16
`pytorch_model-*.bin` shards + index, e.g. the one `generate_model.py --preset bench` writes)
through the reference generator's own name mapping and V1.1 patches (pixel shuffle v1,
vision_feature_layer = select_layer, CLS dropped; `load_original_checkpoint`), in float32, and
times one batched `generate()`:

* B chats (`--batch`, default 16), each one 448x448 image (tests/fixtures/images/model-a.png and
  model-b.png alternately; Pillow BICUBIC resize + ImageNet normalisation, `load_pixel_values`)
  and a question of ~30 text tokens, in the internvl_zh template
  ` <human>: <img><IMG_CONTEXT>x256</img>\\n{question} <bot>:`, tokenized with the slow
  (sentencepiece, legacy) rule of the generator (`LegacyLlamaTokenizer`), left-padded with
  pad id 0 and an attention mask;
* greedy decoding, EOS ignored through `min_new_tokens = max_new_tokens` (EOS is masked out, so
  every row gets exactly max_new_tokens tokens; asserted), KV cache on;
* time to first token from a streamer in the same timed run: `generate()` calls
  `streamer.put()` once with the prompt, then once per decoding step with the B new tokens; TTFT
  is the time from the `generate()` call to the second `put()` (vision encoder + prefill of all B
  chats + the first greedy step), i.e. the TTFT of a chat in a batch that arrives all at once.

Before the timed run, one untimed warm-up `generate()` (first chat only, 2 tokens) unless
`--no-warmup`. Prints one JSON object on stdout and one human-readable line on stderr.

    python3 scripts/reference/generate_model.py --preset bench --model-dir target/bench-model
    python3 scripts/bench/transformers_bench.py --model-dir target/bench-model --batch 1 --max-new-tokens 32
    python3 scripts/bench/transformers_bench.py --model-dir target/bench-model            # B=16, 256 tokens
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts/reference"))
import generate_model as gm  # noqa: E402  (mapping, V1.1 patches, tokenizer, preprocessing)
from transformers_gpu_bench import StepTimes as TimingStreamer  # noqa: E402  (one put() time per step)

IMAGES = ("model-a.png", "model-b.png")
# ~30 non-image tokens each with the template (29..42 with the demo tokenizer, BOS included)
QUESTIONS = (
    "请描述这张图片的内容。Describe the picture in detail.",
    "What is in this image? 图片里有什么？",
    "Describe the colours and shapes you can see here.",
    "这张图片的主要内容是什么？请详细说明。",
    "What objects are in the picture, and where are they?",
    "请用中文描述图片中的颜色和形状。",
    "Is there any text in this image? What does it say?",
    "图片中左下角是什么？右上角呢？",
)


def build_batch(tok: gm.LegacyLlamaTokenizer, cfg: dict, n_img: int, batch: int, images_dir: Path, pad_id: int):
    pixel = {f: gm.load_pixel_values(images_dir / f, gm.FORCE_IMAGE_SIZE) for f in IMAGES}
    rows, pvs = [], []
    for i in range(batch):
        img, q = IMAGES[i % len(IMAGES)], QUESTIONS[i % len(QUESTIONS)]
        messages = [{"role": "user", "content": [{"type": "image", "file": img}, {"type": "text", "text": q}]}]
        prompt, images = gm.build_prompt(messages, n_img, cfg["system_message"])
        expected = f" <human>: {gm.IMG_START}{gm.IMG_CONTEXT * n_img}{gm.IMG_END}\n{q} <bot>:"
        assert prompt == expected and images == [img], prompt
        rows.append(tok.encode(prompt))
        pvs.append(pixel[img])
    width = max(len(r) for r in rows)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    for i, r in enumerate(rows):  # left padding
        input_ids[i, width - len(r):] = torch.tensor(r)
        attention_mask[i, width - len(r):] = 1
    return input_ids, attention_mask, torch.stack(pvs), [len(r) for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", default=str(ROOT / "target/bench-model"))
    ap.add_argument("--images-dir", default=str(ROOT / "tests/fixtures/images"))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa", help="attention implementation")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--no-warmup", action="store_true")
    args = ap.parse_args()
    model_dir = Path(args.model_dir)

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    t_load = time.perf_counter()
    model, cfg = gm.load_original_checkpoint(model_dir, args.attn)
    load_s = time.perf_counter() - t_load
    n_params = sum(p.numel() for p in model.parameters())
    tok = gm.LegacyLlamaTokenizer(model_dir)
    n_img = gm.num_image_tokens(gm.Dims.from_upstream_config(cfg))
    pad_id = cfg["llm_config"]["pad_token_id"]
    eos_id = cfg["llm_config"]["eos_token_id"]
    input_ids, attention_mask, pixel_values, prompt_lens = build_batch(
        tok, cfg, n_img, args.batch, Path(args.images_dir), pad_id
    )
    N = args.max_new_tokens
    gen_kwargs = dict(
        do_sample=False,
        num_beams=1,
        max_new_tokens=N,
        min_new_tokens=N,  # EOS ignored: masked out until max_new_tokens
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        use_cache=True,
    )

    with torch.inference_mode():
        if not args.no_warmup:
            model.generate(
                input_ids=input_ids[:1, input_ids.shape[1] - prompt_lens[0]:],
                attention_mask=attention_mask[:1, input_ids.shape[1] - prompt_lens[0]:],
                pixel_values=pixel_values[:1],
                **{**gen_kwargs, "max_new_tokens": 2, "min_new_tokens": 2},
            )
        streamer = TimingStreamer()
        t0 = time.perf_counter()
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            streamer=streamer,
            **gen_kwargs,
        )
        wall = time.perf_counter() - t0
    load_after = os.getloadavg()

    new = out[:, input_ids.shape[1]:]
    assert new.shape == (args.batch, N), new.shape
    assert len(streamer.times) == N + 1, len(streamer.times)  # prompt + one put per step
    ttft = streamer.times[1] - t0
    decode_s = streamer.times[-1] - streamer.times[1]
    total_tokens = args.batch * N
    result = {
        "engine": "transformers",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        # 1-minute load average before loading / after the timed run: a value well above
        # `threads` means other processes competed for the cores and the numbers are not valid
        "loadavg_1m": [round(load_before[0], 2), round(load_after[0], 2)],
        "dtype": "float32",
        "attn_implementation": args.attn,
        "model_dir": str(model_dir),
        "parameters": n_params,
        "load_s": round(load_s, 3),
        "warmup": not args.no_warmup,
        "batch": args.batch,
        "max_new_tokens": N,
        "image_tokens_per_chat": n_img,
        "prompt_tokens": {"min": min(prompt_lens), "max": max(prompt_lens), "total": sum(prompt_lens)},
        "padded_prompt_len": int(input_ids.shape[1]),
        "output_tokens": total_tokens,
        "wall_s": round(wall, 3),
        "output_tok_per_s": round(total_tokens / wall, 2),
        "ttft_s": round(ttft, 3),
        "ttft_method": "streamer: generate() call -> first per-step put() (vision + prefill of all rows + 1st step)",
        "decode_s": round(decode_s, 3),
        "decode_tok_per_s": round(args.batch * (N - 1) / decode_s, 2) if N > 1 else None,
        "mean_inter_token_ms": round(1000 * decode_s / (N - 1), 2) if N > 1 else None,
        "eos_ignored": "min_new_tokens = max_new_tokens",
        "row0_first_tokens": new[0, :16].tolist(),
    }
    print(json.dumps(result, indent=1))
    print(
        f"transformers {args.attn} fp32, {result['threads']} threads: B={args.batch} x {N} tokens in {wall:.2f} s "
        f"= {result['output_tok_per_s']:.1f} tok/s aggregate; TTFT {ttft:.2f} s; "
        f"decode {result['decode_tok_per_s']} tok/s ({result['mean_inter_token_ms']} ms/step); "
        f"loadavg {load_before[0]:.2f} -> {load_after[0]:.2f}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
