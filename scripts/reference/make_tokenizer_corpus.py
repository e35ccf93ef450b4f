#!/usr/bin/env python3
"""Record what the upstream slow LlamaTokenizer does on the demo tokenizer: the Rust reference.

Reads `models/demo-internvl/` (written by `make_tokenizer.py`) and writes:

* `tests/fixtures/reference/tokenizer_corpus.json`: for every corpus string, the ids of
  `LlamaTokenizer(use_fast=False, legacy=True).encode` (BOS added), the slow decodes of those ids
  (skip_special_tokens True and False, and True with clean_up_tokenization_spaces), the ids and
  decode of the fast tokenizer converted from it, raw SentencePiece decodes of hand-made
  byte-fallback id sequences (a multi-byte character split over `<0x..>` pieces, invalid UTF-8),
  and slow and fast decodes of seeded random id sequences, as a model may generate them.
* `tests/fixtures/tokenizer-json/`: the converted fast tokenizer's `tokenizer.json` next to the
  demo checkpoint's config files, so that directory loads like a checkpoint that ships one.

The script checks the slow tokenizer against the rule the Rust crate implements (BOS, split on
added and special tokens, each remaining chunk encoded by the `sentencepiece` package on its
own) and reports every disagreement; it exits non-zero if there is one.

The slow tokenizer is the one the InternVL release runs: transformers 4.x (InternVL pins
4.36/4.37). transformers 5 removed the sentencepiece-backed LlamaTokenizer, so run this in an
environment with transformers 4.37.2:

    python3 -m venv /tmp/tokref
    /tmp/tokref/bin/pip install 'transformers==4.37.2' 'sentencepiece==0.2.3' protobuf
    /tmp/tokref/bin/python scripts/reference/make_tokenizer_corpus.py
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

import sentencepiece as spm
import transformers
from transformers import LlamaTokenizer, LlamaTokenizerFast

CONFIG_FILES = ["added_tokens.json", "tokenizer_config.json", "special_tokens_map.json"]
SEED = 7


def handmade_strings() -> list[str]:
    """Strings chosen for the tokenizer's edge cases; each comment says which one."""
    img = "<img>" + "<IMG_CONTEXT>" * 4 + "</img>"
    return [
        # Empty and whitespace-only: the dummy prefix, whitespace-only pieces, byte fallback.
        "",
        " ",
        "  ",
        "   ",
        "    ",
        " " * 17,
        "\n",
        "\n\n",
        "\n\n\n",
        "\t",
        "\t\t",
        " \t \n ",
        "\r\n",
        "\r\n\r\n",
        "\u00a0",
        "\u3000",
        "\u2581",
        "\u2581\u2581a",
        "a\u2581b",
        # Plain English, leading and trailing spaces.
        "Hello",
        "hello",
        "Hello world",
        "Hello world!",
        " Hello world",
        "Hello world ",
        "  Hello  world  ",
        "Hello\nworld",
        "Hello\n\nworld\n",
        "Hello\tworld",
        "The quick brown fox jumps over the lazy dog.",
        "Please describe this picture in detail.",
        "What is the weather like today?",
        "I think, therefore I am.",
        "It's a cat's toy, isn't it? They're here; we've gone.",
        "Tokenization must be exactly the same as the reference.",
        "A picture is worth a thousand words , but a good caption helps .",
        "UPPER CASE TEXT AND MiXeD cAsE",
        "e-mail: someone@example.com, url: https://example.com/a?b=c&d=e#f",
        "quotes \"double\" and 'single' and `back`",
        "(parentheses) [brackets] {braces} <angles>",
        "punctuation!?.,;:-_/\\|~^%$#@*+=",
        # Digits are split one by one.
        "0",
        "12345",
        "3.14159",
        "1,000,000",
        "2024-01-01T12:34:56Z",
        "In 1999 there were 12345 people and 67.89 percent of them agreed.",
        "version 1.2.3-rc4",
        "０１２３",
        # Code.
        "fn main() {\n    println!(\"hi\");\n}\n",
        "def f(x):\n\treturn x * 2\n",
        "for (int i = 0; i < n; ++i) { sum += a[i]; }",
        "SELECT * FROM t WHERE a >= 18;",
        "    indented line\n        more indented",
        '<div class="image"><img src="cat.png"></div>',
        # Chinese, mixed, rare characters (byte fallback) and outside the BMP.
        "请描述这张图片",
        "请描述这张图片。",
        "这是一张在公园里拍摄的照片，天气晴朗。",
        "图片中有一只猫坐在窗台上，看着外面的小鸟。",
        "我们的模型可以理解图片和文字，并且用中文回答问题。",
        "今天的天气怎么样？",
        "描述这张图片",
        "中文 English 混合 text 123",
        "价格是 25 元",
        "饕餮龘靐齉",
        "𠀀𠀁𪚥",
        "中",
        " 中",
        "中 ",
        "　全角空格　",
        "「引号」『书名』《书》",
        "日本語のテキスト",
        "한국어 텍스트",
        "Ελληνικά κείμενα",
        "Русский текст",
        "العربية",
        "עברית",
        "हिन्दी",
        "e\u0301 vs \u00e9",
        "naïve café résumé",
        "Zalgo: Z\u0335\u0321a\u0334l\u0336g\u0337o\u0338",
        # Emoji: none are in the vocabulary, so all of them are byte fallback.
        "😀",
        "😀😃😄",
        "I love it 😍!",
        "👨\u200d👩\u200d👧\u200d👦",
        "🏳\ufe0f\u200d🌈",
        "👍🏽",
        "🇨🇳🇺🇸",
        "1\ufe0f\u20e3",
        "❤️",
        "中文😀English",
        # Control and unusual code points.
        "\x00",
        "a\x00b",
        "\x07\x1b[31mred\x1b[0m",
        "\u200b",
        "zero\u200bwidth",
        "\ufeffBOM",
        "\ufffd",
        "\U0010ffff",
        "\ue000",
        # Special tokens written in the text.
        "<s>",
        "</s>",
        "<unk>",
        "<s>Hello",
        "Hello</s>",
        "Hello </s>",
        "Hello</s> ",
        "a</s>b",
        "a </s> b",
        "</s></s>",
        "<s><s>",
        "<s></s><unk>",
        "< s>",
        "<S>",
        "</ s>",
        "<s",
        "s>",
        "<<s>>",
        # Added tokens, alone, adjacent to text, with and without spaces.
        "<img>",
        "</img>",
        "<IMG_CONTEXT>",
        "<img></img>",
        "<img><IMG_CONTEXT></img>",
        img,
        "<img>" + "<IMG_CONTEXT>" * 256 + "</img>",
        "<IMG_CONTEXT><IMG_CONTEXT>",
        "text<img>",
        "text <img>",
        "text<img> ",
        "<img>text",
        "<img> text",
        " <img>text",
        "a<IMG_CONTEXT>b",
        "a <IMG_CONTEXT> b",
        "a  <IMG_CONTEXT>  b",
        "</img>\n描述",
        "</img>\n\n描述",
        "</img> \n",
        "<img_context>",
        "<IMG_CONTEXT",
        "IMG_CONTEXT>",
        "<img",
        "<<img>>",
        "<img></s><s>",
        "<quad>",
        "</quad>",
        "<ref>a cat</ref><box>[[10, 20, 30, 40]]</box>",
        "<ref>猫</ref><box>[[0,0,999,999]]</box>",
        "<quad>(1,2),(3,4)</quad>",
        "Please find <ref>the dog</ref> in the image.",
        # Full InternVL prompts (template internvl_zh).
        " <human>: <img><IMG_CONTEXT><IMG_CONTEXT></img>\n描述这张图片 <bot>:",
        f" <human>: {img}\n请描述这张图片的内容。 <bot>:",
        " <human>: " + "<img>" + "<IMG_CONTEXT>" * 256 + "</img>\nWhat is in this image? <bot>:",
        " <human>: 你好 <bot>:",
        " <human>: Hello <bot>:",
        " <human>: 你好 <bot>: 你好！有什么可以帮你的吗？</s><human>: 介绍一下北京 <bot>:",
        f" <human>: {img}\n图中有什么？ <bot>: 一只猫。</s><human>: 它在做什么？ <bot>:",
        f" <human>: {img}\nWhat is this? <bot>: A cat.</s><human>: What colour is it? <bot>: It is orange.</s><human>: Thanks <bot>:",
        " <human>: \n <bot>:",
        " <human>:  <bot>:",
        "<human>: hi <bot>:",
        "<bot>:",
        # Long text: BPE over many symbols.
        "The river flows through the valley. " * 40,
        "学习一门新的语言需要时间和耐心。" * 30,
        "a" * 300,
        "ab" * 200,
        " " * 300,
        "1234567890" * 20,
        "😀" * 50,
    ]


def fuzz_strings(n: int) -> list[str]:
    """Seeded random concatenations of fragments that stress chunking and merging."""
    fragments = [
        "a", "the", "The", " ", "  ", "\n", "\t", "people", " agreed", "per", "cent", "ing",
        "中", "图片", "描述", "这张", "的", "。", "，", "？", "龘", "😀", "👍🏽", "é", "\u2581",
        "0", "42", "3.14", "<img>", "</img>", "<IMG_CONTEXT>", "</s>", "<s>", "<unk>", "<ref>",
        "</box>", "<", ">", "/", "img", "IMG_CONTEXT", "<bot>:", " <human>: ", "{", "}", "()",
        "\r\n", "\u3000", "\x00", "ÿ", "Ω", "ß", "ﬁ",
    ]
    rng = random.Random(SEED)
    return ["".join(rng.choice(fragments) for _ in range(rng.randint(1, 12))) for _ in range(n)]


def manual_rule(text: str, sp: spm.SentencePieceProcessor, added: dict[str, int], bos: int) -> list[int]:
    """BOS, split on added/special tokens (leftmost-longest), encode each chunk on its own."""
    ids = [bos]
    tokens = sorted(added, key=len, reverse=True)
    chunk_start = i = 0
    while i < len(text):
        match = next((t for t in tokens if text.startswith(t, i)), None)
        if match is None:
            i += 1
            continue
        if chunk_start < i:
            ids += sp.encode(text[chunk_start:i])
        ids.append(added[match])
        i += len(match)
        chunk_start = i
    if chunk_start < len(text):
        ids += sp.encode(text[chunk_start:])
    return ids


def byte_piece_cases(sp: spm.SentencePieceProcessor, bos: int, eos: int) -> list[list[int]]:
    """Id sequences that exercise byte-fallback decoding, valid and invalid UTF-8."""

    def b(*bytes_: int) -> list[int]:
        return [sp.piece_to_id(f"<0x{x:02X}>") for x in bytes_]

    word = sp.piece_to_id("\u2581the")
    space = sp.piece_to_id("\u2581")
    return [
        b(*"你".encode()),  # a 3-byte character split over three pieces
        b(*"😀".encode()),  # a 4-byte character
        b(*"龘龘".encode()),
        b(0x0A),
        b(0x0A) + [word],  # a word piece after bytes keeps its space
        [word] + b(*"😀".encode()) + [word],
        [bos] + b(*"é".encode()) + [eos],
        b(0xE4, 0xBD),  # truncated character: one U+FFFD per byte
        b(0xE4, 0xBD) + [word],
        b(0xFF),
        b(0x80),
        b(0x80, 0x80, 0x41),
        b(0xC0, 0xAF),  # overlong encoding
        b(0xED, 0xA0, 0x80),  # UTF-16 surrogate
        b(0xF4, 0x90, 0x80, 0x80),  # beyond U+10FFFF
        b(0xEF, 0xBF, 0xBD),  # a literal U+FFFD is valid
        b(0xF0, 0x9F, 0x98) + b(*"你".encode()),  # truncated emoji then a good character
        [space, word],  # only the first piece's space is the dummy prefix
        [space, space, word],
        b(0x20) + [word],
        [0],
        [0, word, 0],
    ]


def random_id_sequences(n: int, vocab_size: int, sp: spm.SentencePieceProcessor) -> list[list[int]]:
    """Seeded id sequences a model could generate: any id, with byte and whitespace pieces and
    the special and added tokens over-represented, since decoding quirks live there."""
    rng = random.Random(SEED + 1)
    whitespace = [i for i in range(sp.get_piece_size()) if set(sp.id_to_piece(i)) <= {"\u2581"}]
    favoured = list(range(0, 3)) + list(range(vocab_size - 9, vocab_size)) + whitespace
    bytes_ = [i for i in range(sp.get_piece_size()) if sp.is_byte(i)]
    pools = [range(vocab_size), favoured, bytes_]
    return [[rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 16))] for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/demo-internvl"))
    parser.add_argument("--corpus", type=Path, default=Path("tests/fixtures/reference/tokenizer_corpus.json"))
    parser.add_argument("--fast-dir", type=Path, default=Path("tests/fixtures/tokenizer-json"))
    parser.add_argument("--strings", type=int, default=300, help="corpus size; the rest after the handmade ones is fuzz")
    args = parser.parse_args()
    if int(transformers.__version__.split(".")[0]) >= 5:
        sys.exit(f"transformers {transformers.__version__} has no slow LlamaTokenizer: use transformers 4.x (see --help)")
    if (args.model / "tokenizer.json").exists():
        sys.exit(f"{args.model} must not contain tokenizer.json: the slow tokenizer is the reference")

    slow = LlamaTokenizer.from_pretrained(args.model, use_fast=False, legacy=True)
    sp = spm.SentencePieceProcessor(model_file=str(args.model / "tokenizer.model"))
    added = dict(slow.added_tokens_encoder)

    # The fast tokenizer converted from the slow one: keep only its tokenizer.json.
    args.fast_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        LlamaTokenizerFast.from_pretrained(args.model, from_slow=True, legacy=True).save_pretrained(tmp)
        shutil.copy(Path(tmp) / "tokenizer.json", args.fast_dir / "tokenizer.json")
    for name in CONFIG_FILES:
        shutil.copy(args.model / name, args.fast_dir / name)
    fast = LlamaTokenizerFast.from_pretrained(args.fast_dir)

    strings = handmade_strings()
    strings += fuzz_strings(max(0, args.strings - len(strings)))
    entries = []
    manual_mismatch = fast_id_mismatch = fast_decode_mismatch = 0
    for text in strings:
        ids = slow.encode(text)
        manual = manual_rule(text, sp, added, slow.bos_token_id)
        if manual != ids:
            manual_mismatch += 1
            print(f"slow != manual rule for {text!r}:\n  slow   {ids}\n  manual {manual}")
        fast_ids = fast.encode(text)
        fast_decode = fast.decode(fast_ids, skip_special_tokens=True)
        decode = slow.decode(ids, skip_special_tokens=True)
        fast_id_mismatch += fast_ids != ids
        fast_decode_mismatch += fast_decode != decode
        entries.append(
            {
                "text": text,
                "ids": ids,
                "decode_skip_special": decode,
                "decode_keep_special": slow.decode(ids, skip_special_tokens=False),
                "decode_skip_special_clean_up": slow.decode(
                    ids, skip_special_tokens=True, clean_up_tokenization_spaces=True
                ),
                "fast_ids": fast_ids,
                "fast_decode_skip_special": fast_decode,
                "fast_decode_keep_special": fast.decode(fast_ids, skip_special_tokens=False),
            }
        )
    byte_cases = [
        {
            "ids": ids,
            "pieces": [sp.id_to_piece(i) for i in ids],
            "sentencepiece_decode": sp.decode(ids),
            "decode_skip_special": slow.decode(ids, skip_special_tokens=True),
            "decode_keep_special": slow.decode(ids, skip_special_tokens=False),
        }
        for ids in byte_piece_cases(sp, slow.bos_token_id, slow.eos_token_id)
    ]
    id_decodes = [
        {
            "ids": ids,
            "decode_skip_special": slow.decode(ids, skip_special_tokens=True),
            "decode_keep_special": slow.decode(ids, skip_special_tokens=False),
            "fast_decode_skip_special": fast.decode(ids, skip_special_tokens=True),
            "fast_decode_keep_special": fast.decode(ids, skip_special_tokens=False),
        }
        for ids in random_id_sequences(300, len(slow), sp)
    ]
    summary = {
        "transformers": transformers.__version__,
        "sentencepiece": spm.__version__,
        "strings": len(entries),
        "slow_equals_manual_rule": len(entries) - manual_mismatch,
        "fast_ids_equal_slow": len(entries) - fast_id_mismatch,
        "fast_decode_equals_slow": len(entries) - fast_decode_mismatch,
    }
    corpus = {
        "about": "Reference for crates/model tokenizer tests; regenerate with scripts/reference/make_tokenizer_corpus.py",
        "model_dir": str(args.model),
        "summary": summary,
        "special_ids": sorted(slow.all_special_ids),
        "vocab_size": len(slow),
        "entries": entries,
        "byte_piece_decodes": byte_cases,
        "random_id_decodes": id_decodes,
    }
    args.corpus.parent.mkdir(parents=True, exist_ok=True)
    args.corpus.write_text(json.dumps(corpus, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(summary, indent=1))
    if manual_mismatch:
        sys.exit(f"{manual_mismatch} strings where the slow tokenizer disagrees with the manual rule")


if __name__ == "__main__":
    main()
