#!/usr/bin/env python3
"""Make the image-preprocessing fixtures and Pillow's reference outputs for them.

Upstream InternVL-Chat V1.1 preprocesses with Pillow: ``Image.open(f).convert("RGB")``, then
``resize((448, 448), BICUBIC)``, then torchvision's ToTensor (/255 in float32) and Normalize with
the ImageNet mean/std. This script writes small deterministic test images in every format and
pixel layout the server accepts, and next to each one what Pillow 12.x makes of it, so that
``crates/model/tests/preprocess.rs`` can hold the Rust pipeline to exact parity.

Pillow 13 changed the order of the two resize passes for tall images; V1.1 was trained with the
older order, so this refuses to run on anything but Pillow 12.x.

Run from anywhere:  python3 scripts/reference/make_images.py
(needs ``pip install "pillow<13" numpy``; no network, fully deterministic).
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

NONE = Image.Dither.NONE

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "tests" / "fixtures" / "images"
REFERENCE = ROOT / "tests" / "fixtures" / "reference" / "images"

SIZE = 448
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
# The image whose normalised values are also stored as samples, to debug a hash mismatch.
SAMPLED_IMAGE = "jpg_420_333x250"
SAMPLE_COUNT = 300
# References are stored as lossless WebP, half the size of optimised PNG; the manifest's SHA-256
# of the raw RGB bytes proves that whoever decodes them gets Pillow's exact pixels back.
LOSSLESS = {"format": "WEBP", "lossless": True, "quality": 100, "method": 6}


def scene(width: int, height: int, seed: int) -> np.ndarray:
    """RGB content with hard edges (they expose resize-order and rounding differences), a
    fine checkerboard, thin lines, a disc and one patch of full-range noise; mostly flat so
    that the references stay small."""
    rng = np.random.default_rng(seed)
    img = np.empty((height, width, 3), dtype=np.uint8)
    img[:] = rng.integers(0, 256, 3, dtype=np.uint8)
    for _ in range(4):
        x0, x1 = sorted(rng.integers(0, width + 1, 2))
        y0, y1 = sorted(rng.integers(0, height + 1, 2))
        img[y0:y1, x0:x1] = rng.integers(0, 256, 3, dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    # 1- and 2-pixel checkerboards in the top-left corner: the worst case for a resampler.
    cell = np.where(xx < width // 8, 1, 2)
    checker = ((xx // cell + yy // cell) % 2).astype(bool)
    quadrant = (xx < width // 4) & (yy < height // 4)
    img[quadrant & checker] = (250, 250, 250)
    img[quadrant & ~checker] = (5, 5, 5)
    # Thin vertical and horizontal lines, a diagonal edge and a disc.
    img[:, width * 3 // 5 : width * 3 // 5 + 1] = (255, 0, 0)
    img[height * 2 // 3 : height * 2 // 3 + 1, :] = (0, 0, 255)
    img[(xx * height) > (yy * width * 3) + width * height // 2] = (0, 200, 0)
    cx, cy, r = width * 0.7, height * 0.35, min(width, height) * 0.2
    img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = (255, 255, 0)
    # Noise patch, a tenth of each dimension (at least 4 pixels).
    nw, nh = max(4, width // 10), max(4, height // 10)
    px, py = width - nw - width // 10, height - nh - height // 10
    px, py = max(0, px), max(0, py)
    patch = img[py : py + nh, px : px + nw]
    patch[:] = rng.integers(0, 256, patch.shape, dtype=np.uint8)
    return img


def rgb(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(scene(width, height, seed), "RGB")


def with_alpha(im: Image.Image, seed: int) -> Image.Image:
    """Alpha with fully transparent, partial and opaque regions: convert('RGB') must drop it
    without compositing, so RGB under alpha 0 must survive."""
    rng = np.random.default_rng(seed)
    w, h = im.size
    alpha = np.full((h, w), 255, dtype=np.uint8)
    alpha[: h // 3] = 0
    alpha[h // 3 : h // 2] = rng.integers(0, 256, (h // 2 - h // 3, w), dtype=np.uint8)
    out = im.convert("RGBA" if im.mode == "RGB" else "LA")
    out.putalpha(Image.fromarray(alpha, "L"))
    return out


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png16(samples: np.ndarray, colour_type: int) -> bytes:
    """A 16-bit PNG written by hand: Pillow can save 16-bit grey but not 16-bit RGB/LA/RGBA."""
    height, width = samples.shape[:2]
    rows = samples.reshape(height, -1).astype(">u2").tobytes()
    stride = len(rows) // height
    raw = b"".join(b"\x00" + rows[i * stride : (i + 1) * stride] for i in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(raw, 9))
        + png_chunk(b"IEND", b"")
    )


def sixteen_bit(width: int, height: int, seed: int, channels: int) -> np.ndarray:
    """High byte from the scene, low byte random: taking the high byte and rounding to 8 bits
    give different answers, so the fixture tells them apart."""
    rng = np.random.default_rng(seed + 1)
    base = scene(width, height, seed).astype(np.uint16)
    if channels in (1, 2):
        base = base[..., :1]
    if channels in (2, 4):
        alpha = with_alpha(Image.new("L", (width, height)), seed)
        base = np.concatenate([base, np.asarray(alpha)[..., 1:2].astype(np.uint16)], axis=2)
    low = rng.integers(0, 256, base.shape, dtype=np.uint16)
    return ((base << 8) | low).squeeze()


def grey16(width: int, height: int, seed: int) -> Image.Image:
    """16-bit grey spanning the clamp: left third below 256 (kept as is), middle third 256..1023
    and right third full range (both clamp to 255 unless 0..255)."""
    g = scene(width, height, seed)[..., 0].astype(np.uint16)
    v = g.copy()
    third = width // 3
    v[:, third : 2 * third] = g[:, third : 2 * third] * 3 + 256
    v[:, 2 * third :] = g[:, 2 * third :] * 257
    return Image.frombytes("I;16", (width, height), v.astype("<u2").tobytes())


def bmp16(im: Image.Image, masks: tuple[int, int, int] | None) -> bytes:
    """A 16-bit BMP written by hand (Pillow cannot save one): BI_RGB 5-5-5 when masks is None,
    else BI_BITFIELDS with the given red, green and blue masks."""
    a = np.asarray(im.convert("RGB")).astype(np.uint32)
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    if masks is None or masks == (0x7C00, 0x3E0, 0x1F):
        px = ((r >> 3) << 10) | ((g >> 3) << 5) | (b >> 3)
    else:
        px = ((r >> 3) << 11) | ((g >> 2) << 5) | (b >> 3)
    h, w = px.shape
    row_bytes = (w * 2 + 3) & ~3
    rows = b""
    for y in range(h - 1, -1, -1):  # bottom-up
        row = px[y].astype("<u2").tobytes()
        rows += row + b"\x00" * (row_bytes - len(row))
    extra = b"" if masks is None else struct.pack("<III", *masks)
    offset = 14 + 40 + len(extra)
    info = struct.pack(
        "<IiiHHIIiiII", 40, w, h, 1, 16, 0 if masks is None else 3, len(rows), 2835, 2835, 0, 0
    )
    head = b"BM" + struct.pack("<IHHI", offset + len(rows), 0, 0, offset)
    return head + info + extra + rows


def save(im: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **options)
    return buf.getvalue()


def palette_image(width: int, height: int, seed: int, colours: int) -> Image.Image:
    return rgb(width, height, seed).quantize(colours, dither=NONE)


def animated(width: int, height: int, seed: int, fmt: str) -> bytes:
    """Three frames; only the first counts, as Pillow's open() shows the first frame."""
    frames = [palette_image(width, height, seed + i, 32) for i in range(3)]
    if fmt == "WEBP":
        frames = [f.convert("RGB") for f in frames]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def fixtures() -> list[tuple[str, str, bytes]]:
    """(name, extension, file bytes) for every fixture."""
    out: list[tuple[str, str, bytes]] = []

    def add(name: str, ext: str, data: bytes) -> None:
        out.append((name, ext, data))

    # Sizes: upscale, tall, wide, off-by-one, unchanged (no pass), one axis unchanged, strong
    # shrink, a single pixel.
    add("png_rgb_17x13", "png", save(rgb(17, 13, 1), "PNG"))
    add("png_rgb_37x1001", "png", save(rgb(37, 1001, 2), "PNG"))
    add("png_rgb_1203x91", "png", save(rgb(1203, 91, 3), "PNG"))
    add("png_rgb_449x447", "png", save(rgb(449, 447, 4), "PNG"))
    add("png_rgb_448x448", "png", save(rgb(448, 448, 5), "PNG"))
    add("png_rgb_448x300", "png", save(rgb(448, 300, 6), "PNG"))
    add("png_rgb_700x448", "png", save(rgb(700, 448, 7), "PNG"))
    add("png_rgb_2600x37", "png", save(rgb(2600, 37, 36), "PNG"))  # 5.8x shrink: 25 taps
    add("png_rgb_1x1", "png", save(rgb(1, 1, 37), "PNG"))
    # Pixel layouts.
    add("png_l_300x200", "png", save(rgb(300, 200, 8).convert("L"), "PNG"))
    add("png_la_200x150", "png", save(with_alpha(rgb(200, 150, 9).convert("L"), 9), "PNG"))
    add("png_rgba_250x180", "png", save(with_alpha(rgb(250, 180, 10), 10), "PNG"))
    add("png_p_220x160", "png", save(palette_image(220, 160, 11, 200), "PNG"))
    p_trns = palette_image(160, 220, 12, 60)
    add("png_p_trns_160x220", "png", save(p_trns, "PNG", transparency=3))
    add("png_p4_96x64", "png", save(palette_image(96, 64, 13, 16), "PNG", bits=4))
    add("png_1bit_90x70", "png", save(rgb(90, 70, 14).convert("1", dither=NONE), "PNG"))
    add("png_rgb_trns_64x48", "png", save(rgb(64, 48, 15), "PNG", transparency=(5, 5, 5)))
    add("png_i16_120x90", "png", save(grey16(120, 90, 16), "PNG"))
    # tRNS on 16-bit grey: decoders add an alpha channel, Pillow still clamps like "I;16".
    add("png_i16_trns_60x40", "png", save(grey16(60, 40, 38), "PNG", transparency=300))
    add("png_rgb16_96x64", "png", png16(sixteen_bit(96, 64, 17, 3), 2))
    add("png_la16_80x60", "png", png16(sixteen_bit(80, 60, 18, 2), 4))
    add("png_rgba16_80x60", "png", png16(sixteen_bit(80, 60, 19, 4), 6))
    # JPEG: chroma subsampling variants, progressive, grey, CMYK.
    add("jpg_420_333x250", "jpg", save(rgb(333, 250, 20), "JPEG", quality=90, subsampling=2))
    add("jpg_444_250x333", "jpg", save(rgb(250, 333, 21), "JPEG", quality=90, subsampling=0))
    add("jpg_422_199x141", "jpg", save(rgb(199, 141, 22), "JPEG", quality=85, subsampling=1))
    add(
        "jpg_progressive_301x203",
        "jpg",
        save(rgb(301, 203, 23), "JPEG", quality=88, progressive=True),
    )
    add("jpg_grey_211x157", "jpg", save(rgb(211, 157, 24).convert("L"), "JPEG", quality=90))
    add("jpg_cmyk_120x100", "jpg", save(rgb(120, 100, 25).convert("CMYK"), "JPEG", quality=90))
    # WebP, GIF, BMP.
    add("webp_lossy_300x200", "webp", save(rgb(300, 200, 26), "WEBP", quality=80))
    add("webp_lossless_200x300", "webp", save(rgb(200, 300, 27), "WEBP", lossless=True))
    add(
        "webp_lossy_alpha_150x100",
        "webp",
        save(with_alpha(rgb(150, 100, 28), 28), "WEBP", quality=80),
    )
    add("gif_240x160", "gif", save(palette_image(240, 160, 29, 64), "GIF", transparency=7))
    add("gif_animated_90x60", "gif", animated(90, 60, 34, "GIF"))
    add("webp_animated_90x60", "webp", animated(90, 60, 35, "WEBP"))
    add("bmp_rgb_203x101", "bmp", save(rgb(203, 101, 30), "BMP"))
    add("bmp_p_120x80", "bmp", save(palette_image(120, 80, 31, 100), "BMP"))
    add("bmp_555_70x50", "bmp", bmp16(rgb(70, 50, 32), None))
    add("bmp_565_70x50", "bmp", bmp16(rgb(70, 50, 33), (0xF800, 0x7E0, 0x1F)))
    return out


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def normalise(resized: np.ndarray) -> np.ndarray:
    """torchvision ToTensor + Normalize, in float32 exactly as they compute it: divide by 255,
    subtract the mean, divide by the std (no reciprocal), then HWC -> CHW."""
    x = resized.astype(np.float32) / np.float32(255)
    x = (x - MEAN) / STD
    return np.ascontiguousarray(x.transpose(2, 0, 1)).astype("<f4")


def main() -> None:
    if not PIL.__version__.startswith("12."):
        sys.exit(f"Pillow 12.x is required (found {PIL.__version__}): pip install 'pillow<13'")
    IMAGES.mkdir(parents=True, exist_ok=True)
    REFERENCE.mkdir(parents=True, exist_ok=True)
    manifest = {
        "pillow": PIL.__version__,
        "size": SIZE,
        "mean": MEAN.tolist(),
        "std": STD.tolist(),
        "images": [],
    }
    for name, ext, data in fixtures():
        (IMAGES / f"{name}.{ext}").write_bytes(data)
        with Image.open(io.BytesIO(data)) as im:
            opened_mode = im.mode
            decoded = im.convert("RGB")
        resized = decoded.resize((SIZE, SIZE), Image.Resampling.BICUBIC)
        for image, kind in ((decoded, "decoded"), (resized, "resized")):
            image.save(REFERENCE / f"{name}.{kind}.webp", **LOSSLESS)
        pixels = normalise(np.asarray(resized))
        entry = {
            "name": name,
            "file": f"{name}.{ext}",
            "pillow_mode": opened_mode,
            "width": decoded.width,
            "height": decoded.height,
            "decoded": {"file": f"{name}.decoded.webp", "sha256": sha256(decoded.tobytes())},
            "resized": {"file": f"{name}.resized.webp", "sha256": sha256(resized.tobytes())},
            "normalised": {
                "sha256": sha256(pixels.tobytes()),
                "sum": float(pixels.astype(np.float64).sum()),
            },
        }
        if name == SAMPLED_IMAGE:
            flat = pixels.reshape(-1)
            rng = np.random.default_rng(1234)
            idx = np.sort(rng.choice(flat.size, SAMPLE_COUNT, replace=False))
            entry["normalised"]["samples"] = [[int(i), float(flat[i])] for i in idx]
            entry["normalised"]["mean"] = float(pixels.astype(np.float64).mean())
        manifest["images"].append(entry)
        print(f"{name:28} {opened_mode:6} {decoded.width}x{decoded.height}")
    (REFERENCE / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


if __name__ == "__main__":
    main()
