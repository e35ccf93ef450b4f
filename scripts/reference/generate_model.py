#!/usr/bin/env python3
"""Independent Python reference for the InternVL-Chat-Chinese-V1.1 forward.

Builds a TINY model with the exact V1.1 architecture (InternViT with q/k RMSNorm and layer
scale, select_layer -4, pixel shuffle ps_version v1, mlp1 projector, LLaMA with GQA), writes
it as a checkpoint in the ORIGINAL InternVL-Chat layout (upstream `config.json`, sharded bf16
PyTorch pickles + `pytorch_model.bin.index.json`, upstream parameter names) and records what
the reference forward computes on a few conversations, for the Rust implementation to match.

The reference forward is transformers' `InternVLForConditionalGeneration`, configured and
patched to compute what upstream's `InternVLChatModel` (OpenGVLab/InternVL commit 9807c9f,
"Release InternVL-Chat-Chinese-V1.1") computes:

* pixel shuffle: transformers always applies the v2 shuffle (a final permute(0, 2, 1, 3) that
  un-transposes the 16x16 grid). V1.1 was trained with v1, which stops before that permute:
  `pixel_shuffle` is monkeypatched on the model instance (see `pixel_shuffle_v1`).
* select_layer: transformers' default is the last layer; V1.1 uses hidden_states[-4] of
  (embeddings, out_0, ..., out_{L-1}); set through `vision_feature_layer=-4`, CLS dropped by
  `vision_feature_select_strategy="default"`. Checked against the manual forward below, which
  runs only layers 0..=L-4 (so layers L-3..L-1 are never needed).
* q/k norm eps: transformers builds `q_norm`/`k_norm` with a hard-coded eps 1e-6, upstream uses
  `layer_norm_eps`; identical here because layer_norm_eps is 1e-6 (as in the real model).
* attention scale: upstream computes (q * scale) @ k^T, transformers (q @ k^T) * scale. With
  head_dim 16 the scale is 0.25, a power of two, so both orders are bit-identical: no patch.
* position embedding: upstream adds `position_embedding` as is (448 px, 32x32 grid);
  transformers only interpolates when the grid differs, which it never does here.
* LLM: upstream itself runs transformers' `LlamaForCausalLM`; the image merge (embeddings at
  `<IMG_CONTEXT>` replaced, in order, by the projector output) is the same as transformers'
  masked_scatter. Checked below against a manual merge.
* attention runs in eager mode and everything in float32, with every weight rounded to bf16
  first (the checkpoint stores bf16).

Besides the transformers forward, the script carries its own small re-implementation of
upstream's InternViT + pixel shuffle v1 + mlp1 (`upstream_extract_feature`), run straight from
the original-layout state dict read back from the written shards, and asserts that it agrees
with transformers. It also asserts that the written checkpoint reloads (inverse name mapping)
into a second transformers model that reproduces the same logits bit for bit.

Tokenisation follows the published checkpoint's slow `LlamaTokenizer` in legacy mode: BOS,
then the text is split on the special/added tokens and each remaining chunk is
SentencePiece-encoded on its own (each chunk gets the dummy-prefix "▁"). transformers >= 5 has
no slow LlamaTokenizer any more (`use_fast` is ignored), so the script implements that rule on
the `sentencepiece` library directly (`LegacyLlamaTokenizer`) and asserts that transformers'
`LlamaTokenizer.from_pretrained(..., use_fast=False, legacy=True)` gives the same ids.

Inputs (must exist; written by scripts/reference/make_tokenizer.py):
    models/demo-internvl/{tokenizer.model, added_tokens.json, tokenizer_config.json,
                          special_tokens_map.json}
Outputs:
    models/demo-internvl/config.json, pytorch_model-0000{1,2}-of-00002.bin,
        pytorch_model.bin.index.json
    tests/fixtures/images/model-a.png, model-b.png
    tests/fixtures/reference/model.safetensors, model_cases.json

Deterministic (fixed seeds, single-threaded torch) and needs no network. Usage, from the
repository root:

    pip install -r scripts/reference/requirements.txt
    python3 scripts/reference/generate_model.py

Model sizes come from the `PRESETS` table. The default preset `tiny` is the one above. The
preset `bench` writes ONLY a larger checkpoint (vision 256 hidden x 10 layers, LLM 512 hidden x 8
layers, same layout, same weight-scaling rules, tokenizer files copied from --tokenizer-dir,
default models/demo-internvl), for scripts/bench; it writes no fixtures and no images:

    python3 scripts/reference/generate_model.py --preset bench --model-dir target/bench-model
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import PIL
import sentencepiece as spm
import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from safetensors.torch import save_file
from transformers import (
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLModel,
    InternVLVisionConfig,
    LlamaConfig,
)

ROOT = Path(__file__).resolve().parents[2]

# Weight seed and lm_head spread chosen (by a scan over a few seeds) so that every greedy step
# of every case has a top-1 vs top-2 margin far above f32 rounding, while the image cases still
# produce different continuations from their first token on.
WEIGHT_SEED = 2
IMAGE_SEED = 1234
GREEDY_STEPS = 32
MIN_MARGIN = 1e-2
PIXEL_STRIDE = 7
# spread (log-normal sigma) of the lm_head row norms, see init_weights
LM_HEAD_LOGNORM = 0.75

IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# ---------------------------------------------------------------------------------------------
# Model dimensions: one table of presets, V1.1-shaped
# ---------------------------------------------------------------------------------------------
SELECT_LAYER = -4
DOWNSAMPLE_RATIO = 0.5
FORCE_IMAGE_SIZE = 448
# shared by every preset
VISION_COMMON = dict(patch_size=14, image_size=448, layer_norm_eps=1e-6)
LLM_COMMON = dict(rms_norm_eps=1e-6, rope_theta=10000.0)
# The projector is always LayerNorm(4 * vision hidden) -> Linear(4 * vision hidden, llm hidden)
# -> GELU -> Linear(llm hidden, llm hidden); the LLM vocabulary always comes from the tokenizer.
PRESETS = {
    # the reference-fixture model (models/demo-internvl + tests/fixtures/reference)
    "tiny": dict(
        vision=dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=6),
        llm=dict(
            hidden_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_hidden_layers=2,
            intermediate_size=160,
            max_position_embeddings=2048,
        ),
    ),
    # a larger checkpoint for throughput benchmarks (scripts/bench); no fixtures
    "bench": dict(
        vision=dict(hidden_size=256, num_attention_heads=4, intermediate_size=1024, num_hidden_layers=10),
        llm=dict(
            hidden_size=512,
            num_attention_heads=8,
            num_key_value_heads=8,
            num_hidden_layers=8,
            intermediate_size=1376,
            max_position_embeddings=2048,
        ),
    ),
}


class Dims:
    """Model sizes: `vision` (InternViT) and `llm` (LLaMA) dicts, keyed like the configs."""

    def __init__(self, vision: dict, llm: dict):
        self.vision = {**VISION_COMMON, **vision}
        self.llm = {**LLM_COMMON, **llm}

    @classmethod
    def preset(cls, name: str) -> "Dims":
        return cls(**PRESETS[name])

    @classmethod
    def from_upstream_config(cls, cfg: dict) -> "Dims":
        """Sizes of an original-layout checkpoint, from its upstream `config.json` (the inverse
        of `upstream_config_json`; the fixed choices are asserted)."""
        vc, lc = cfg["vision_config"], cfg["llm_config"]
        assert cfg["select_layer"] == SELECT_LAYER and cfg["downsample_ratio"] == DOWNSAMPLE_RATIO
        assert cfg["force_image_size"] == FORCE_IMAGE_SIZE and cfg["template"] == "internvl_zh"
        assert vc["qk_normalization"] and not vc["qkv_bias"] and not lc["tie_word_embeddings"]
        vision = {k: vc[k] for k in (*PRESETS["tiny"]["vision"], *VISION_COMMON)}
        llm = {k: lc[k] for k in (*PRESETS["tiny"]["llm"], *LLM_COMMON)}
        return cls(vision, llm)


# ---------------------------------------------------------------------------------------------
# Tokenizer: the slow LlamaTokenizer's legacy rule, on sentencepiece directly
# ---------------------------------------------------------------------------------------------
class LegacyLlamaTokenizer:
    def __init__(self, model_dir: Path):
        self.sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
        self.sp_size = self.sp.get_piece_size()
        added = json.loads((model_dir / "added_tokens.json").read_text())
        special_map = json.loads((model_dir / "special_tokens_map.json").read_text())

        def content(v):
            return v["content"] if isinstance(v, dict) else v

        self.bos = self.sp.piece_to_id(content(special_map["bos_token"]))
        self.eos = self.sp.piece_to_id(content(special_map["eos_token"]))
        # Tokens never split by SentencePiece: the special tokens and the added tokens.
        self.token_ids: dict[str, int] = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            if key in special_map:
                piece = content(special_map[key])
                pid = self.sp.piece_to_id(piece)
                assert self.sp.id_to_piece(pid) == piece, piece
                self.token_ids[piece] = pid
        for tok, tid in added.items():
            self.token_ids[tok] = tid
        self.added = added
        ids = sorted(added.values())
        assert ids == list(range(self.sp_size, self.sp_size + len(ids))), "added ids not contiguous"
        self.vocab_size = self.sp_size + len(added)
        alternatives = sorted(self.token_ids, key=len, reverse=True)
        self.split_re = re.compile("(" + "|".join(re.escape(t) for t in alternatives) + ")")

    def encode(self, text: str) -> list[int]:
        ids = [self.bos]
        for chunk in self.split_re.split(text):
            if not chunk:
                continue
            if chunk in self.token_ids:
                ids.append(self.token_ids[chunk])
            else:
                ids.extend(self.sp.encode(chunk))
        return ids

    def decode(self, ids: list[int]) -> str:
        """Informational decode, skipping special and added tokens (SentencePiece decode)."""
        special = set(self.token_ids.values())
        return self.sp.decode([i for i in ids if i not in special])


def transformers_slow_tokenizer(model_dir: Path):
    """transformers' own slow path: PreTrainedTokenizer.tokenize (split on added/special tokens)
    + SentencePiece per chunk, what `LlamaTokenizer(use_fast=False, legacy=True)` was before
    transformers 5 (which kept the machinery as `SentencePieceBackend`). It adds no BOS."""
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    class SlowLlamaTokenizer(SentencePieceBackend):
        vocab_files_names = {"vocab_file": "tokenizer.model"}
        model_input_names = ["input_ids", "attention_mask"]

    return SlowLlamaTokenizer.from_pretrained(str(model_dir), legacy=True)


# ---------------------------------------------------------------------------------------------
# Test images and preprocessing
# ---------------------------------------------------------------------------------------------
def make_image_a(rng: np.random.Generator) -> np.ndarray:
    """500x375 (w x h): gradients, rings, a checkerboard, hard-edged shapes, noise."""
    w, h = 500, 375
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = x / (w - 1) * 255.0
    g = y / (h - 1) * 255.0
    rad = np.hypot(x - 310.0, y - 150.0)
    b = 127.5 + 127.5 * np.sin(rad / 9.0)
    img = np.stack([r, g, b], axis=-1)
    # checkerboard of 8-px squares in the lower left
    cb = ((x // 8 + y // 8) % 2 == 0) & (x < 160) & (y > 220)
    img[cb] = (250.0, 250.0, 20.0)
    img[((x // 8 + y // 8) % 2 == 1) & (x < 160) & (y > 220)] = (10.0, 10.0, 120.0)
    # white rectangle and black disc with hard edges
    img[(x >= 200) & (x < 260) & (y >= 40) & (y < 300)] = (255.0, 255.0, 255.0)
    img[np.hypot(x - 400.0, y - 280.0) < 55.0] = (0.0, 0.0, 0.0)
    # one-pixel lines
    img[:, 330:331] = (255.0, 0.0, 0.0)
    img[190:191, :] = (0.0, 255.0, 0.0)
    img += rng.normal(0.0, 12.0, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def make_image_b(rng: np.random.Generator) -> np.ndarray:
    """300x620 (w x h), tall: diagonal stripes, colour blocks, fine texture, noise."""
    w, h = 300, 620
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    stripes = (((x + y) // 12) % 2) * 180.0 + 40.0
    r = stripes
    g = 255.0 * (1.0 - y / (h - 1))
    b = 128.0 + 100.0 * np.cos(x / 17.0) * np.sin(y / 23.0)
    img = np.stack([r, g, b], axis=-1)
    img[(x >= 30) & (x < 130) & (y >= 400) & (y < 560)] = (220.0, 30.0, 60.0)
    img[(x >= 170) & (x < 280) & (y >= 60) & (y < 140)] = (20.0, 200.0, 90.0)
    # fine 1-px alternating texture (aliases strongly under resampling)
    fine = (x >= 150) & (x < 290) & (y >= 300) & (y < 380)
    img[fine & ((x + y) % 2 == 0)] = (255.0, 255.0, 255.0)
    img[fine & ((x + y) % 2 == 1)] = (0.0, 0.0, 0.0)
    img += rng.normal(0.0, 20.0, size=img.shape)
    img[:, :, 2] = np.clip(img[:, :, 2] + rng.uniform(-30.0, 30.0, size=(h, w)), 0, 255)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def load_pixel_values(path: Path, size: int) -> torch.Tensor:
    """Upstream's V1.1 preprocessing: RGB, bicubic resize to size x size, ToTensor, Normalize."""
    img = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    x = x.to(torch.float32).div(255)  # torchvision ToTensor
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32)[:, None, None]
    return x.sub(mean).div(std)  # torchvision Normalize


# ---------------------------------------------------------------------------------------------
# Prompt template internvl_zh
# ---------------------------------------------------------------------------------------------
def render_content(content, images: list[str], num_image_tokens: int) -> str:
    """User text as upstream chat() builds it: one image block per image, each followed by
    a newline, all before the text."""
    if isinstance(content, str):
        return content
    files = [p["file"] for p in content if p["type"] == "image"]
    texts = [p["text"] for p in content if p["type"] == "text"]
    assert len(texts) <= 1, "fixtures use at most one text part per message"
    images.extend(files)
    block = IMG_START + IMG_CONTEXT * num_image_tokens + IMG_END + "\n"
    return block * len(files) + "".join(texts)


def build_prompt(messages: list[dict], num_image_tokens: int, default_system: str = ""):
    """internvl_zh: system + " ", then role + ": " + text + sep per message (sep " " after
    <human>, "</s>" after <bot>), then "<bot>:" for the reply."""
    images: list[str] = []
    system = default_system
    msgs = messages
    if msgs and msgs[0]["role"] == "system":
        system = render_content(msgs[0]["content"], images, num_image_tokens)
        msgs = msgs[1:]
    roles = ("<human>", "<bot>")
    seps = (" ", "</s>")
    ret = system + seps[0]
    for i, m in enumerate(msgs):
        expected = "user" if i % 2 == 0 else "assistant"
        assert m["role"] == expected, (i, m["role"])
        text = render_content(m["content"], images, num_image_tokens)
        assert text
        ret += roles[i % 2] + ": " + text + seps[i % 2]
    assert msgs[-1]["role"] == "user"
    ret += roles[1] + ":"
    return ret, images


CASES = [
    (
        "text",
        [{"role": "user", "content": "Hello! 请用中文介绍一下你自己，并告诉我今天的天气怎么样？"}],
    ),
    (
        "one_image",
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "file": "model-a.png"},
                    {"type": "text", "text": "请描述这张图片的内容。Describe the picture in detail."},
                ],
            }
        ],
    ),
    (
        "two_images",
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "file": "model-a.png"},
                    {"type": "image", "file": "model-b.png"},
                    {"type": "text", "text": "What is different between these two pictures? 这两张图片有什么不同？"},
                ],
            }
        ],
    ),
    (
        "multi_turn",
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "file": "model-a.png"},
                    {"type": "text", "text": "图片中有什么？"},
                ],
            },
            {"role": "assistant", "content": "图片中有一只猫坐在窗台上，看着外面的小鸟。"},
            {
                "role": "user",
                "content": [
                    {"type": "image", "file": "model-b.png"},
                    {"type": "text", "text": "And this one? 这张呢？"},
                ],
            },
        ],
    ),
    (
        "system",
        [
            {"role": "system", "content": "You are a helpful assistant. 你是一个乐于助人的助手。"},
            {"role": "user", "content": "What is the capital of China? 中国的首都是哪里？"},
        ],
    ),
]


# ---------------------------------------------------------------------------------------------
# transformers model
# ---------------------------------------------------------------------------------------------
def hf_config(vocab_size: int, image_token_id: int, dims: Dims) -> InternVLConfig:
    vision = InternVLVisionConfig(
        hidden_size=dims.vision["hidden_size"],
        num_attention_heads=dims.vision["num_attention_heads"],
        intermediate_size=dims.vision["intermediate_size"],
        num_hidden_layers=dims.vision["num_hidden_layers"],
        patch_size=dims.vision["patch_size"],
        image_size=dims.vision["image_size"],
        layer_norm_eps=dims.vision["layer_norm_eps"],
        attention_bias=False,  # qkv_bias false
        use_qk_norm=True,  # qk_normalization true (full-width RMSNorm)
        norm_type="rms_norm",
        hidden_act="gelu",  # exact erf GELU
        layer_scale_init_value=0.1,  # layer scale on (values are overwritten below)
        use_mean_pooling=True,  # no final layernorm (upstream has none)
        use_absolute_position_embeddings=True,
        use_mask_token=False,
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=dims.llm["hidden_size"],
        intermediate_size=dims.llm["intermediate_size"],
        num_hidden_layers=dims.llm["num_hidden_layers"],
        num_attention_heads=dims.llm["num_attention_heads"],
        num_key_value_heads=dims.llm["num_key_value_heads"],
        rms_norm_eps=dims.llm["rms_norm_eps"],
        max_position_embeddings=dims.llm["max_position_embeddings"],
        rope_parameters={"rope_type": "default", "rope_theta": dims.llm["rope_theta"]},
        hidden_act="silu",
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        image_seq_length=num_image_tokens(dims),
        downsample_ratio=DOWNSAMPLE_RATIO,
        projector_hidden_act="gelu",
        vision_feature_layer=SELECT_LAYER,
        vision_feature_select_strategy="default",  # drop CLS
        tie_word_embeddings=False,
    )


def num_image_tokens(dims: Dims) -> int:
    grid = FORCE_IMAGE_SIZE // dims.vision["patch_size"]
    return int(grid * grid * DOWNSAMPLE_RATIO * DOWNSAMPLE_RATIO)


def pixel_shuffle_v1(self, vision_features: torch.Tensor, scale_factor: float = 0.5):
    """Upstream InternVLChatModel.pixel_shuffle with ps_version 'v1' (V1.1): transformers'
    version minus its final permute(0, 2, 1, 3), so the downsampled grid stays transposed."""
    n, w, h, c = vision_features.size()
    x = vision_features.view(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    return x


def new_model(config: InternVLConfig, attn_implementation: str = "eager") -> InternVLForConditionalGeneration:
    model = InternVLForConditionalGeneration._from_config(
        config, attn_implementation=attn_implementation, dtype=torch.float32
    )
    model.eval()
    # ps_version v1 (see module docstring).
    model.model.pixel_shuffle = types.MethodType(pixel_shuffle_v1, model.model)
    assert model.config.vision_config._attn_implementation == attn_implementation
    assert model.config.text_config._attn_implementation == attn_implementation
    return model


def load_original_checkpoint(model_dir: Path, attn_implementation: str = "eager"):
    """An original-layout checkpoint directory (config.json + bf16 shards) as a float32
    transformers model, patched to V1.1 like `new_model`. Returns (model, upstream config)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    dims = Dims.from_upstream_config(cfg)
    added = json.loads((model_dir / "added_tokens.json").read_text())
    vocab_size = cfg["llm_config"]["vocab_size"]
    model = new_model(hf_config(vocab_size, added[IMG_CONTEXT], dims), attn_implementation)
    sd = read_checkpoint(model_dir)
    hf = original_to_hf({k: v.to(torch.float32) for k, v in sd.items()}, dims.vision["hidden_size"])
    missing, unexpected = model.load_state_dict(hf, strict=True)
    assert not missing and not unexpected
    return model, cfg


def init_weights(model: InternVLForConditionalGeneration, seed: int, dims: Dims) -> None:
    """Random weights scaled for O(1) activations and peaked logits, rounded to bf16."""
    g = torch.Generator().manual_seed(seed)
    vh, vi = dims.vision["hidden_size"], dims.vision["intermediate_size"]
    lh, li = dims.llm["hidden_size"], dims.llm["intermediate_size"]
    proj_in = vh * int(1 / DOWNSAMPLE_RATIO) ** 2
    patch_fan_in = 3 * dims.vision["patch_size"] ** 2

    def randn(shape, std):
        return torch.randn(shape, generator=g) * std

    def norm_weight(shape):
        return 1.0 + randn(shape, 0.1)

    with torch.no_grad():
        for name, p in model.named_parameters():
            s = p.shape
            if name.endswith("embeddings.cls_token"):
                v = randn(s, 0.5)
            elif name.endswith("embeddings.position_embeddings"):
                v = randn(s, 0.5)
            elif name.endswith("patch_embeddings.projection.weight"):
                v = randn(s, 1.0 / math.sqrt(patch_fan_in))
            elif name.endswith("patch_embeddings.projection.bias"):
                v = randn(s, 0.1)
            elif re.search(r"\.lambda_[12]$", name):
                v = 0.1 + 0.9 * torch.rand(s, generator=g)  # layer scale in [0.1, 1)
            elif re.search(r"(layernorm_before|layernorm_after|q_norm|k_norm)\.weight$", name):
                v = norm_weight(s)
            elif re.search(r"attention\.[qkv]_proj\.weight$", name):
                v = randn(s, 1.0 / math.sqrt(vh))
            elif name.endswith("attention.projection_layer.weight"):
                v = randn(s, 1.0 / math.sqrt(vh))
            elif name.endswith("attention.projection_layer.bias"):
                v = randn(s, 0.05)
            elif name.endswith("mlp.fc1.weight"):
                v = randn(s, 1.0 / math.sqrt(vh))
            elif name.endswith("mlp.fc1.bias"):
                v = randn(s, 0.1)
            elif name.endswith("mlp.fc2.weight"):
                v = randn(s, 1.0 / math.sqrt(vi))
            elif name.endswith("mlp.fc2.bias"):
                v = randn(s, 0.05)
            elif name.endswith("multi_modal_projector.layer_norm.weight"):
                v = norm_weight(s)
            elif name.endswith("multi_modal_projector.layer_norm.bias"):
                v = randn(s, 0.1)
            elif name.endswith("multi_modal_projector.linear_1.weight"):
                v = randn(s, 1.0 / math.sqrt(proj_in))
            elif name.endswith("multi_modal_projector.linear_1.bias"):
                v = randn(s, 0.1)
            elif name.endswith("multi_modal_projector.linear_2.weight"):
                v = randn(s, 1.0 / math.sqrt(lh))
            elif name.endswith("multi_modal_projector.linear_2.bias"):
                v = randn(s, 0.1)
            elif name.endswith("embed_tokens.weight"):
                v = randn(s, 1.0)
            elif re.search(r"self_attn\.[qkvo]_proj\.weight$", name):
                v = randn(s, 1.0 / math.sqrt(lh))
            elif re.search(r"mlp\.(gate|up)_proj\.weight$", name):
                v = randn(s, 1.0 / math.sqrt(lh))
            elif name.endswith("mlp.down_proj.weight"):
                v = randn(s, 1.0 / math.sqrt(li))
            elif re.search(r"(input_layernorm|post_attention_layernorm|language_model\.norm)\.weight$", name):
                v = norm_weight(s)
            elif name == "lm_head.weight":
                # Rows with log-normal norms: a heavy upper tail of the logits, so every greedy
                # step has a clear argmax (top-1 vs top-2 margins far above f32 rounding).
                v = randn(s, 8.0 / math.sqrt(lh)) * torch.exp(randn((s[0], 1), LM_HEAD_LOGNORM))
            else:
                raise KeyError(f"no init rule for {name} {tuple(s)}")
            p.copy_(v.to(torch.bfloat16).to(torch.float32))


# ---------------------------------------------------------------------------------------------
# Name mapping transformers <-> original InternVL-Chat layout
# ---------------------------------------------------------------------------------------------
VT = "model.vision_tower."
_VISION_LAYER_RENAMES = {
    "layernorm_before.weight": "norm1.weight",
    "layernorm_after.weight": "norm2.weight",
    "attention.q_norm.weight": "attn.q_norm.weight",
    "attention.k_norm.weight": "attn.k_norm.weight",
    "attention.projection_layer.weight": "attn.proj.weight",
    "attention.projection_layer.bias": "attn.proj.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "lambda_1": "ls1",
    "lambda_2": "ls2",
}
_FIXED_RENAMES = {
    VT + "embeddings.cls_token": "vision_model.embeddings.class_embedding",
    VT + "embeddings.position_embeddings": "vision_model.embeddings.position_embedding",
    VT + "embeddings.patch_embeddings.projection.weight": "vision_model.embeddings.patch_embedding.weight",
    VT + "embeddings.patch_embeddings.projection.bias": "vision_model.embeddings.patch_embedding.bias",
    "model.multi_modal_projector.layer_norm.weight": "mlp1.0.weight",
    "model.multi_modal_projector.layer_norm.bias": "mlp1.0.bias",
    "model.multi_modal_projector.linear_1.weight": "mlp1.1.weight",
    "model.multi_modal_projector.linear_1.bias": "mlp1.1.bias",
    "model.multi_modal_projector.linear_2.weight": "mlp1.3.weight",
    "model.multi_modal_projector.linear_2.bias": "mlp1.3.bias",
    "lm_head.weight": "language_model.lm_head.weight",
}


def hf_to_original(sd: dict[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    used = set()
    for name, t in sd.items():
        if name in _FIXED_RENAMES:
            out[_FIXED_RENAMES[name]] = t
            used.add(name)
            continue
        m = re.fullmatch(r"model\.vision_tower\.encoder\.layer\.(\d+)\.(.+)", name)
        if m:
            i, rest = m.groups()
            pre = f"vision_model.encoder.layers.{i}."
            if rest in ("attention.q_proj.weight", "attention.k_proj.weight", "attention.v_proj.weight"):
                if rest.startswith("attention.q_proj"):
                    base = f"{VT}encoder.layer.{i}.attention."
                    # upstream qkv: reshape(B, N, 3, H, D) -> rows [q; k; v]
                    out[pre + "attn.qkv.weight"] = torch.cat(
                        [sd[base + "q_proj.weight"], sd[base + "k_proj.weight"], sd[base + "v_proj.weight"]], 0
                    )
                used.add(name)
                continue
            out[pre + _VISION_LAYER_RENAMES[rest]] = t
            used.add(name)
            continue
        m = re.fullmatch(r"model\.language_model\.(.+)", name)
        if m:
            out["language_model.model." + m.group(1)] = t
            used.add(name)
            continue
        raise KeyError(f"unmapped transformers parameter {name}")
    assert used == set(sd)
    return out


def original_to_hf(sd: dict[str, torch.Tensor], vision_hidden: int) -> dict[str, torch.Tensor]:
    inv_fixed = {v: k for k, v in _FIXED_RENAMES.items()}
    inv_layer = {v: k for k, v in _VISION_LAYER_RENAMES.items()}
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if name in inv_fixed:
            out[inv_fixed[name]] = t
            continue
        m = re.fullmatch(r"vision_model\.encoder\.layers\.(\d+)\.(.+)", name)
        if m:
            i, rest = m.groups()
            pre = f"{VT}encoder.layer.{i}."
            if rest == "attn.qkv.weight":
                q, k, v = t.split(vision_hidden, 0)
                out[pre + "attention.q_proj.weight"] = q
                out[pre + "attention.k_proj.weight"] = k
                out[pre + "attention.v_proj.weight"] = v
            else:
                out[pre + inv_layer[rest]] = t
            continue
        m = re.fullmatch(r"language_model\.model\.(.+)", name)
        if m:
            out["model.language_model." + m.group(1)] = t
            continue
        raise KeyError(f"unknown original parameter {name}")
    return out


# ---------------------------------------------------------------------------------------------
# Original-layout checkpoint
# ---------------------------------------------------------------------------------------------
def upstream_config_json(vocab_size: int, dims: Dims) -> dict:
    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "torch_dtype": "bfloat16",
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            "num_channels": 3,
            "hidden_size": dims.vision["hidden_size"],
            "num_attention_heads": dims.vision["num_attention_heads"],
            "intermediate_size": dims.vision["intermediate_size"],
            "num_hidden_layers": dims.vision["num_hidden_layers"],
            "patch_size": dims.vision["patch_size"],
            "image_size": dims.vision["image_size"],
            "qkv_bias": False,
            "qk_normalization": True,
            "layer_norm_eps": dims.vision["layer_norm_eps"],
            "hidden_act": "gelu",
            "initializer_factor": 0.1,
            "initializer_range": 0.02,
            "dropout": 0.0,
            "attention_dropout": 0.0,
            "drop_path_rate": 0.0,
            "use_flash_attn": False,
            "torch_dtype": "bfloat16",
        },
        "llm_config": {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": dims.llm["hidden_size"],
            "intermediate_size": dims.llm["intermediate_size"],
            "num_attention_heads": dims.llm["num_attention_heads"],
            "num_key_value_heads": dims.llm["num_key_value_heads"],
            "num_hidden_layers": dims.llm["num_hidden_layers"],
            "rms_norm_eps": dims.llm["rms_norm_eps"],
            "rope_theta": dims.llm["rope_theta"],
            "rope_scaling": None,
            "max_position_embeddings": dims.llm["max_position_embeddings"],
            "vocab_size": vocab_size,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "hidden_act": "silu",
            "pretraining_tp": 1,
            "use_cache": True,
        },
        "select_layer": SELECT_LAYER,
        "downsample_ratio": DOWNSAMPLE_RATIO,
        "force_image_size": FORCE_IMAGE_SIZE,
        "template": "internvl_zh",
        "dynamic_image_size": False,
        "use_thumbnail": False,
        "system_message": "",
        "pad2square": False,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
    }


def write_checkpoint(model_dir: Path, orig: "OrderedDict[str, torch.Tensor]", vocab_size: int, dims: Dims) -> None:
    shard_names = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    shards: list[dict[str, torch.Tensor]] = [{}, {}]
    weight_map: dict[str, str] = {}
    total = 0
    for name, t in orig.items():
        idx = 1 if name.startswith("language_model.") else 0  # vision + mlp1 | LLM
        # clone: each tensor gets its own storage (no views of larger buffers in the pickle)
        tb = t.detach().to(torch.bfloat16).contiguous().clone()
        shards[idx][name] = tb
        weight_map[name] = shard_names[idx]
        total += tb.numel() * tb.element_size()
    for fname, shard in zip(shard_names, shards):
        torch.save(shard, model_dir / fname)  # zip format, pickle protocol 2, plain dict
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (model_dir / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (model_dir / "config.json").write_text(json.dumps(upstream_config_json(vocab_size, dims), indent=2) + "\n")


def read_checkpoint(model_dir: Path) -> dict[str, torch.Tensor]:
    index = json.loads((model_dir / "pytorch_model.bin.index.json").read_text())
    sd: dict[str, torch.Tensor] = {}
    for fname in sorted(set(index["weight_map"].values())):
        shard = torch.load(model_dir / fname, map_location="cpu", weights_only=True)
        for k, v in shard.items():
            assert index["weight_map"][k] == fname
            assert v.dtype == torch.bfloat16, (k, v.dtype)
            sd[k] = v
    assert set(sd) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(v.numel() * 2 for v in sd.values())
    return sd


# ---------------------------------------------------------------------------------------------
# Independent re-implementation of upstream's vision path (from the original-layout weights)
# ---------------------------------------------------------------------------------------------
def upstream_extract_feature(sd: dict[str, torch.Tensor], cfg: dict, pixel_values: torch.Tensor) -> torch.Tensor:
    """InternVisionModel (modeling_intern_vit.py @ 9807c9f, naive attention) up to
    hidden_states[select_layer], CLS dropped, pixel_shuffle v1, mlp1. Runs only the layers
    that select_layer needs."""
    w = {k: v.to(torch.float32) for k, v in sd.items()}
    vc = cfg["vision_config"]
    C, H = vc["hidden_size"], vc["num_attention_heads"]
    D = C // H
    eps = vc["layer_norm_eps"]
    scale = D**-0.5

    def rms(x, weight):
        x32 = x.to(torch.float32)
        return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps))

    e = "vision_model.embeddings."
    x = F.conv2d(pixel_values, w[e + "patch_embedding.weight"], w[e + "patch_embedding.bias"], stride=vc["patch_size"])
    x = x.flatten(2).transpose(1, 2)
    B = x.shape[0]
    x = torch.cat([w[e + "class_embedding"].expand(B, 1, -1), x], 1) + w[e + "position_embedding"]
    n_states = vc["num_hidden_layers"] + 1
    sel = cfg["select_layer"]
    run = sel if sel >= 0 else n_states + sel  # hidden_states[run] = output of `run` layers
    for i in range(run):
        p = f"vision_model.encoder.layers.{i}."
        h = rms(x, w[p + "norm1.weight"])
        N = h.shape[1]
        qkv = F.linear(h, w[p + "attn.qkv.weight"]).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = rms(q.transpose(1, 2).flatten(-2, -1), w[p + "attn.q_norm.weight"]).view(B, N, H, D).transpose(1, 2)
        k = rms(k.transpose(1, 2).flatten(-2, -1), w[p + "attn.k_norm.weight"]).view(B, N, H, D).transpose(1, 2)
        attn = ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        a = (attn @ v).transpose(1, 2).reshape(B, N, C)
        a = F.linear(a, w[p + "attn.proj.weight"], w[p + "attn.proj.bias"])
        x = x + a * w[p + "ls1"]
        h = rms(x, w[p + "norm2.weight"])
        h = F.linear(h, w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"])
        h = F.gelu(h)
        h = F.linear(h, w[p + "mlp.fc2.weight"], w[p + "mlp.fc2.bias"])
        x = x + h * w[p + "ls2"]
    x = x[:, 1:, :]
    g = int(x.shape[1] ** 0.5)
    x = x.reshape(B, g, g, -1)
    x = pixel_shuffle_v1(None, x, scale_factor=cfg["downsample_ratio"])
    x = x.reshape(B, -1, x.shape[-1])
    x = F.layer_norm(x, (x.shape[-1],), w["mlp1.0.weight"], w["mlp1.0.bias"], eps=1e-5)
    x = F.linear(x, w["mlp1.1.weight"], w["mlp1.1.bias"])
    x = F.gelu(x)
    x = F.linear(x, w["mlp1.3.weight"], w["mlp1.3.bias"])
    return x


# ---------------------------------------------------------------------------------------------
# Reference forward
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def last_logits(model, ids: list[int], pixel_values: torch.Tensor | None) -> torch.Tensor:
    out = model(input_ids=torch.tensor([ids]), pixel_values=pixel_values, use_cache=False)
    return out.logits[0, -1].to(torch.float32)


@torch.no_grad()
def greedy(model, ids: list[int], pixel_values: torch.Tensor | None, steps: int):
    """Greedy decoding with a full recompute each step; never stops at EOS."""
    seq = list(ids)
    tokens, margins = [], []
    for _ in range(steps):
        logits = last_logits(model, seq, pixel_values)
        top = torch.topk(logits, 2)
        margins.append(float(top.values[0] - top.values[1]))
        nxt = int(torch.argmax(logits))
        assert nxt == int(top.indices[0])
        tokens.append(nxt)
        seq.append(nxt)
    return tokens, margins


TOKENIZER_FILES = ("tokenizer.model", "added_tokens.json", "tokenizer_config.json", "special_tokens_map.json")


def make_checkpoint(dims: Dims, tok: LegacyLlamaTokenizer, model_dir: Path):
    """Random V1.1 model of the given sizes, written to `model_dir` in the original layout and
    read back. Returns (model, model2 reloaded from the written checkpoint, the transformers
    state dict, the original-layout bf16 state dict read back, the upstream config.json)."""
    img_context_id = tok.added[IMG_CONTEXT]
    config = hf_config(tok.vocab_size, img_context_id, dims)
    model = new_model(config)
    init_weights(model, WEIGHT_SEED, dims)
    sd_hf = model.state_dict()
    print("transformers parameters:", len(sd_hf), "tensors,", sum(v.numel() for v in sd_hf.values()), "values")
    assert model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr()

    # ---- checkpoint (original layout) ----
    orig = hf_to_original(sd_hf)
    for i in range(dims.vision["num_hidden_layers"]):  # every layer is in the checkpoint, even those select_layer skips
        assert f"vision_model.encoder.layers.{i}.attn.qkv.weight" in orig
    model_dir.mkdir(parents=True, exist_ok=True)
    write_checkpoint(model_dir, orig, tok.vocab_size, dims)
    sd_orig = read_checkpoint(model_dir)

    # ---- check: reload through config.json and the inverse mapping ----
    model2, cfg_json = load_original_checkpoint(model_dir)
    assert Dims.from_upstream_config(cfg_json).__dict__ == dims.__dict__
    for k, v in model2.state_dict().items():
        assert torch.equal(v, sd_hf[k]), k
    return model, model2, sd_hf, sd_orig, cfg_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="tiny",
        help="tiny (default): the reference checkpoint + fixtures; bench: only a larger checkpoint, "
        "written to --model-dir (required), tokenizer files copied from --tokenizer-dir",
    )
    ap.add_argument("--model-dir", default=None, help="default (tiny): models/demo-internvl")
    ap.add_argument("--tokenizer-dir", default=str(ROOT / "models/demo-internvl"), help="bench: tokenizer source")
    ap.add_argument("--images-dir", default=str(ROOT / "tests/fixtures/images"))
    ap.add_argument("--out-dir", default=str(ROOT / "tests/fixtures/reference"))
    args = ap.parse_args()
    if args.preset == "tiny":
        main_tiny(args)
    else:
        if args.model_dir is None:
            ap.error(f"--preset {args.preset} needs --model-dir (e.g. target/bench-model)")
        main_bench(args)


def main_bench(args) -> None:
    """Only a checkpoint (config.json, shards, index, tokenizer copied): no fixtures, no images.
    The fixture images are read (not written) to check the activation scale."""
    model_dir, tok_dir, images_dir = Path(args.model_dir), Path(args.tokenizer_dir), Path(args.images_dir)
    if model_dir.resolve() == tok_dir.resolve():
        sys.exit(f"--model-dir {model_dir} is the tokenizer source: refusing to overwrite its checkpoint")
    torch.manual_seed(WEIGHT_SEED)
    torch.use_deterministic_algorithms(True)
    dims = Dims.preset(args.preset)

    model_dir.mkdir(parents=True, exist_ok=True)
    for f in TOKENIZER_FILES:
        shutil.copyfile(tok_dir / f, model_dir / f)
    tok = LegacyLlamaTokenizer(model_dir)
    print(f"tokenizer: vocab {tok.vocab_size} (copied from {tok_dir})")
    model, model2, sd_hf, sd_orig, cfg_json = make_checkpoint(dims, tok, model_dir)
    n_vl = dims.vision["num_hidden_layers"]

    # ---- activation scale (and the upstream re-implementation of the vision path) ----
    stats = []
    with torch.no_grad():
        pv = load_pixel_values(images_dir / "model-a.png", FORCE_IMAGE_SIZE)[None]
        hs = model2.model.vision_tower(pixel_values=pv, output_hidden_states=True).hidden_states
        assert len(hs) == n_vl + 1
        stats.append(("vision model-a.png", [round(float(h.pow(2).mean().sqrt()), 3) for h in hs]))
        feats = model2.model.get_image_features(pixel_values=pv).pooler_output[0]
        assert feats.shape == (num_image_tokens(dims), dims.llm["hidden_size"])
        manual = upstream_extract_feature(sd_orig, cfg_json, pv)[0]
        err = (manual - feats).abs().max().item()
        print(f"vision embeds rms {feats.pow(2).mean().sqrt():.3f}; "
              f"max |transformers - upstream re-implementation| = {err:.2e}")
        assert err < 1e-3, err
        prompt, _ = build_prompt(CASES[1][1], num_image_tokens(dims), cfg_json["system_message"])
        ids = torch.tensor([tok.encode(prompt)])
        out = model2.model(input_ids=ids, pixel_values=pv, output_hidden_states=True)
        stats.append(("llm one_image", [round(float(h.pow(2).mean().sqrt()), 3) for h in out.hidden_states]))
        logits = model2.lm_head(out.last_hidden_state[0, -1])
        print(f"one_image: {ids.shape[1]} prompt tokens, last logits std {logits.std():.2f}")
    for label, rms_list in stats:
        print(f"rms {label}: {rms_list}")
        assert all(0.05 < r < 20.0 for r in rms_list), (label, rms_list)

    n_params = sum(v.numel() for v in sd_orig.values())
    files = sorted(model_dir.glob("*"))
    print(f"{model_dir}: {n_params} parameters ({n_params / 1e6:.2f} M), "
          f"{sum(p.stat().st_size for p in files)} bytes on disk")
    for p in files:
        print(f"  {p.name}: {p.stat().st_size} bytes")


def main_tiny(args) -> None:
    model_dir = Path(args.model_dir) if args.model_dir else ROOT / "models/demo-internvl"
    images_dir, out_dir = Path(args.images_dir), Path(args.out_dir)
    dims = Dims.preset("tiny")

    if not PIL.__version__.startswith("12."):
        sys.exit(f"Pillow {PIL.__version__}: the fixtures need Pillow 12.x (13 changed the bicubic pass order)")
    torch.manual_seed(WEIGHT_SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    # ---- tokenizer ----
    tok = LegacyLlamaTokenizer(model_dir)
    vocab_size = tok.vocab_size
    img_context_id = tok.added[IMG_CONTEXT]
    img_start_id, img_end_id = tok.added[IMG_START], tok.added[IMG_END]
    assert tok.bos == 1 and tok.eos == 2
    print(f"tokenizer: {tok.sp_size} SentencePiece pieces + {len(tok.added)} added = vocab {vocab_size}; "
          f"<img>={img_start_id} </img>={img_end_id} <IMG_CONTEXT>={img_context_id}")
    slow_tok = transformers_slow_tokenizer(model_dir)
    assert len(slow_tok) == vocab_size, (len(slow_tok), vocab_size)
    from transformers import LlamaTokenizer

    # transformers >= 5 ignores use_fast=False and returns the `tokenizers`-backed tokenizer.
    fast_tok = LlamaTokenizer.from_pretrained(str(model_dir), use_fast=False, legacy=True)
    assert len(fast_tok) == vocab_size, (len(fast_tok), vocab_size)

    # ---- images ----
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(IMAGE_SEED)
    arrays = {"model-a.png": make_image_a(rng), "model-b.png": make_image_b(rng)}
    for fname, arr in arrays.items():
        Image.fromarray(arr, "RGB").save(images_dir / fname, format="PNG", optimize=False, compress_level=9)
        back = np.asarray(Image.open(images_dir / fname).convert("RGB"))
        assert np.array_equal(back, arr)
    pixel = {f: load_pixel_values(images_dir / f, FORCE_IMAGE_SIZE) for f in arrays}

    # ---- model, checkpoint (original layout), reload check ----
    model, model2, sd_hf, sd_orig, cfg_json = make_checkpoint(dims, tok, model_dir)
    n_vl = dims.vision["num_hidden_layers"]

    # ---- vision embeddings ----
    vision_embeds = {}
    with torch.no_grad():
        for f, pv in pixel.items():
            feats = model.model.get_image_features(pixel_values=pv[None]).pooler_output[0]
            assert feats.shape == (num_image_tokens(dims), dims.llm["hidden_size"])
            feats2 = model2.model.get_image_features(pixel_values=pv[None]).pooler_output[0]
            assert torch.equal(feats, feats2)
            manual = upstream_extract_feature(sd_orig, cfg_json, pv[None])[0]
            err = (manual - feats).abs().max().item()
            print(f"{f}: vision embeds rms {feats.pow(2).mean().sqrt():.3f}; "
                  f"max |transformers - upstream re-implementation| = {err:.2e}")
            assert err < 1e-4, err
            vision_embeds[f] = feats.clone()

        # the v1 shuffle really differs from v2 (guards against the patch being ignored)
        probe = torch.arange(1 * 4 * 4 * 2, dtype=torch.float32).view(1, 4, 4, 2)
        v1 = pixel_shuffle_v1(None, probe)
        v2 = InternVLModel.pixel_shuffle(None, probe)  # transformers' own (v2) shuffle
        assert not torch.equal(v1, v2) and torch.equal(v1.permute(0, 2, 1, 3), v2)

        # activation scale through every layer
        stats = []
        for f, pv in pixel.items():
            hs = model.model.vision_tower(pixel_values=pv[None], output_hidden_states=True).hidden_states
            assert len(hs) == n_vl + 1
            stats.append(("vision " + f, [round(float(h.pow(2).mean().sqrt()), 3) for h in hs]))

    # ---- cases ----
    n_img = num_image_tokens(dims)
    tensors: dict[str, torch.Tensor] = {}
    cases_out = []
    for name, messages in CASES:
        prompt, images = build_prompt(messages, n_img, cfg_json["system_message"])
        ids = tok.encode(prompt)
        slow_ids = [tok.bos] + slow_tok(prompt, add_special_tokens=False).input_ids
        assert slow_ids == ids, f"{name}: transformers' slow (sentencepiece) tokenizer disagrees"
        fast_ids = fast_tok(prompt).input_ids
        fast_agrees = fast_ids == ids
        if not fast_agrees:
            d = next(i for i, (a, b) in enumerate(zip(fast_ids + [-1], ids + [-1])) if a != b)
            print(f"{name}: note: transformers' tokenizers-backed LlamaTokenizer differs from the slow "
                  f"one at position {d}: {fast_ids[d:d + 3]} vs {ids[d:d + 3]}")
        assert ids.count(img_context_id) == n_img * len(images)
        assert ids.count(img_start_id) == len(images) == ids.count(img_end_id)
        pv = torch.stack([pixel[f] for f in images]) if images else None

        logits = last_logits(model, ids, pv)
        logits2 = last_logits(model2, ids, pv)
        assert torch.equal(logits, logits2), f"{name}: reloaded checkpoint gives other logits"

        # manual merge: embeddings at <IMG_CONTEXT>, in order, replaced by the upstream
        # re-implementation's features, then transformers' LLaMA (what upstream runs)
        with torch.no_grad():
            ids_t = torch.tensor(ids)
            emb = model2.model.language_model.embed_tokens(ids_t).clone()
            if images:
                feats = torch.cat([upstream_extract_feature(sd_orig, cfg_json, pixel[f][None])[0] for f in images])
                emb[ids_t == img_context_id] = feats
            out = model2.model.language_model(inputs_embeds=emb[None], output_hidden_states=True)
            manual_logits = model2.lm_head(out.last_hidden_state[0, -1])
            stats.append((f"llm {name}", [round(float(h.pow(2).mean().sqrt()), 3) for h in out.hidden_states]))
        err = (manual_logits - logits).abs().max().item()
        assert err < 1e-3, (name, err)

        tokens, margins = greedy(model, ids, pv, GREEDY_STEPS)
        first_eos = tokens.index(tok.eos) if tok.eos in tokens else None
        min_margin = min(margins)
        text = tok.decode(tokens)
        print(f"{name}: {len(ids)} prompt tokens, images {images}, logits std {logits.std():.2f}, "
              f"max |manual - transformers| {err:.1e}, min greedy margin {min_margin:.4f}, first EOS {first_eos}")
        print(f"    greedy: {tokens}")
        assert min_margin > MIN_MARGIN, (name, min_margin)
        tensors[f"logits.{name}"] = logits.contiguous()
        cases_out.append(
            {
                "name": name,
                "messages": messages,
                "images": images,
                "prompt": prompt,
                "input_ids": ids,
                "greedy_tokens": tokens,
                "first_eos_index": first_eos,
                "min_greedy_margin": min_margin,
                "greedy_margins": margins,
                "greedy_text": text,
                "fast_tokenizer_agrees": fast_agrees,
            }
        )

    for label, rms_list in stats:
        print(f"rms {label}: {rms_list}")
        assert all(0.05 < r < 20.0 for r in rms_list), (label, rms_list)

    # ---- fixtures ----
    out_dir.mkdir(parents=True, exist_ok=True)
    images_meta = []
    for f, pv in pixel.items():
        key = f.removesuffix(".png")
        flat = pv.reshape(-1)
        tensors[f"pixel_values.{key}"] = flat[::PIXEL_STRIDE].contiguous().clone()
        tensors[f"vision_embeds.{key}"] = vision_embeds[f].contiguous()
        h, w = arrays[f].shape[:2]
        images_meta.append(
            {
                "file": f,
                "width": w,
                "height": h,
                "pixel_values_shape": list(pv.shape),
                "pixel_values_stride": PIXEL_STRIDE,
                "pixel_values_sum": float(flat.double().sum()),
                "vision_embeds_shape": list(vision_embeds[f].shape),
            }
        )
    versions = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "pillow": PIL.__version__,
        "sentencepiece": spm.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
    }
    save_file(
        tensors,
        str(out_dir / "model.safetensors"),
        # one metadata key only: safetensors writes the metadata map in random order
        metadata={"pixel_values_stride": str(PIXEL_STRIDE)},
    )
    (out_dir / "model.safetensors").chmod(0o644)  # safetensors creates it 0600
    doc = {
        "generator": "scripts/reference/generate_model.py",
        "versions": versions,
        "weight_seed": WEIGHT_SEED,
        "image_seed": IMAGE_SEED,
        "model_dir": "models/demo-internvl",
        "vocab_size": vocab_size,
        "bos_token_id": tok.bos,
        "eos_token_id": tok.eos,
        "img_start_token_id": img_start_id,
        "img_end_token_id": img_end_id,
        "img_context_token_id": img_context_id,
        "num_image_tokens": n_img,
        "greedy_steps": GREEDY_STEPS,
        "image_block": "each image becomes <img> + <IMG_CONTEXT> x num_image_tokens + </img> + \"\\n\", "
        "all blocks (in order) before the message text",
        "tensors": {
            "pixel_values.<image>": "float32 flat sample pixel_values.reshape(-1)[::pixel_values_stride] of the "
            "[3,448,448] normalised CHW pixel values",
            "vision_embeds.<image>": "float32 [num_image_tokens, llm hidden] projector (mlp1) output",
            "logits.<case>": "float32 [vocab_size] logits at the last prompt position",
        },
        "images": images_meta,
        "cases": cases_out,
    }
    (out_dir / "model_cases.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")

    for p in sorted(list(model_dir.glob("*")) + list(images_dir.glob("model-*.png")) + list(out_dir.glob("model*"))):
        print(f"{p.relative_to(ROOT)}: {p.stat().st_size} bytes")


if __name__ == "__main__":
    main()
