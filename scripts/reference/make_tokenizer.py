#!/usr/bin/env python3
"""Train the demo tokenizer: a small SentencePiece BPE model shaped like LLaMA's.

The real InternVL-Chat-Chinese-V1.1 tokenizer (41,919 pieces) cannot be shipped or fetched, so
tests run on a small model trained here with the same trainer and normalizer settings as
LLaMA's `tokenizer.model` (BPE, byte fallback, split digits, dummy prefix, identity
normalisation, whitespace kept as is). The checkpoint files around it (`added_tokens.json`,
`tokenizer_config.json`, `special_tokens_map.json`) have the shape of the published
InternVL-Chat V1.1 ones: slow `LlamaTokenizer`, legacy mode, BOS added, EOS not, and the image
and grounding tokens added after the SentencePiece vocabulary. There is deliberately NO
`tokenizer.json`: the published checkpoint has none either.

Everything is deterministic: the training text is generated here from fixed material with a
seeded RNG, and the trainer runs single-threaded with a fixed seed, so re-running the script
reproduces `tokenizer.model` byte for byte.

Usage (from the repository root; needs only `sentencepiece` and `protobuf`; the committed model
was trained with sentencepiece 0.2.3, other trainer versions may pick other merges):

    python3 scripts/reference/make_tokenizer.py [--out models/demo-internvl]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
from pathlib import Path

import sentencepiece as spm

VOCAB_SIZE = 1800
SEED = 20240101

# Added after the SentencePiece vocabulary, in this order, as InternVL's fine-tuning code does
# with `tokenizer.add_tokens(token_list, special_tokens=True)`.
ADDED_TOKENS = [
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
]

ENGLISH = """\
The quick brown fox jumps over the lazy dog while the farmer watches from the window.
A picture is worth a thousand words, but a good caption still helps the reader.
In the morning the city wakes slowly: buses hum, shops open, and people hurry to work.
She described the image carefully, noting the colours, the shapes and the light.
Large language models read text as tokens, small pieces of words that carry meaning.
The vision encoder turns every image into a grid of features before the language model sees it.
Please describe this picture in detail and tell me what the people are doing.
What is the weather like today? It is sunny with a light breeze from the west.
He bought three apples, two oranges and a loaf of bread at the market on Tuesday.
The museum opens at nine o'clock and closes at five in the afternoon.
There are many reasons to learn a new language, and travel is only one of them.
Our server answers requests quickly because it batches them on the graphics card.
The cat sat on the mat, and the dog slept under the table near the door.
Science is a way of thinking much more than it is a body of knowledge.
Children were playing football in the park while their parents talked on the benches.
The river flows through the valley, past the old mill and under the stone bridge.
I think, therefore I am. To be or not to be, that is the question.
Machine learning needs data, compute, and careful evaluation of the results.
The photograph shows a red car parked in front of a white house with a green door.
Tokenization must be exactly the same as the reference, or the model will see different inputs.
"""

CHINESE_SENTENCES = """\
请描述这张图片的内容。
这是一张在公园里拍摄的照片，天气晴朗，很多人在散步。
图片中有一只猫坐在窗台上，看着外面的小鸟。
我们的模型可以理解图片和文字，并且用中文回答问题。
今天的天气怎么样？今天是晴天，气温二十五度。
他在北京大学学习计算机科学，已经三年了。
中国有很多美丽的城市，比如上海、杭州、成都和西安。
这个问题很有意思，我们需要仔细思考一下。
图中的人正在做什么？他们正在超市里买东西。
请用一句话总结这篇文章的主要内容。
春天来了，花开了，草绿了，小朋友们在田野里放风筝。
学习一门新的语言需要时间和耐心，但是非常值得。
这家饭店的菜很好吃，价格也不贵，我们经常来这里吃饭。
桌子上放着一本书、两支笔和一杯热茶。
火车站离这里不远，走路大约十分钟就能到。
科学技术的发展改变了人们的生活方式。
"""

# Several hundred of the most frequent Chinese characters, so that the trained vocabulary
# covers common text while rarer characters fall back to byte pieces.
CHINESE_CHARS = (
    "的一是不了人我在有他这为之大来以个中上们到说国和地也子时道出而要于就下得可你年生自会那后"
    "能对着事其里所去行过家十用发天如然作方成者多日都三小军二无同么经法当起与好看学进种将还分"
    "此心前面又定见只主没公从已向动工两长知全样本实把点内相开产外本才四电问部度正力机高女文等"
    "手明意最民物理重身新化使体加老很给名信水回山气五各通提表政直教感间月入平常期路位报西海色"
    "东程候果反活先友全结告元并难处光金门接即完记件决保头图车快更思风口边系立白认目条往近住花"
    "题取张林空王流百第市任利几员做米统北运书收强求指变受形解今世区格价亲听千写办美安红字带必"
    "望选神热领院片早节死观清半声放断深满转少照照音阿许调研火传马南队视站费识拉研请别言太关包"
    "吃饭菜茶杯笔桌椅床窗猫狗鸟鱼草树叶雨雪云冷暖春夏秋冬早晚城市京州省县村街道楼房屋衣服鞋帽"
)

CODE = """\
fn main() {
    let numbers = vec![1, 2, 3, 4, 5];
    let total: i32 = numbers.iter().sum();
    println!("total = {}", total);
}
def tokenize(text: str) -> list[int]:
    return [ord(c) for c in text if not c.isspace()]
for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }
if x == None or len(items) > 10: raise ValueError("too many items")
SELECT name, count(*) FROM users WHERE age >= 18 GROUP BY name ORDER BY 2 DESC;
const result = await fetch(url, { method: "POST", body: JSON.stringify(data) });
import torch
model = AutoModel.from_pretrained(path, torch_dtype=torch.bfloat16)
    return self.sp_model.encode(text, out_type=str)
<div class="image"><img src="cat.png" alt="a cat"></div>
"""


def training_lines() -> list[str]:
    """The training text: fixed material plus seeded recombinations so merges have counts."""
    rng = random.Random(SEED)
    english = [line for line in ENGLISH.splitlines() if line]
    chinese = [line for line in CHINESE_SENTENCES.splitlines() if line]
    code = [line for line in CODE.splitlines() if line.strip()]
    lines: list[str] = []
    for _ in range(6):
        lines.extend(english)
        lines.extend(chinese)
        lines.extend(code)
    # Every common character a few times, in short runs, so all of them reach the vocabulary.
    chars = list(CHINESE_CHARS)
    for _ in range(4):
        rng.shuffle(chars)
        lines.extend("".join(chars[i : i + 24]) for i in range(0, len(chars), 24))
    # Recombined sentences and numbers: word-level and digit statistics.
    words = " ".join(english).split()
    for _ in range(400):
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(5, 14))))
    for _ in range(200):
        a, b = rng.randint(0, 99999), rng.randint(0, 999)
        lines.append(f"In {1900 + a % 125} there were {a} people and {b}.{a % 100:02d} percent of them agreed.")
    for _ in range(200):
        lines.append("".join(rng.choice(chinese)[: rng.randint(4, 12)] for _ in range(3)))
    return lines


def train(out_dir: Path) -> bytes:
    """Train the BPE model with LLaMA's trainer and normalizer settings; return its bytes."""
    spm.set_random_generator_seed(SEED)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_lines()),
        model_writer=model,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        character_coverage=0.9995,
        byte_fallback=True,
        split_digits=True,
        split_by_unicode_script=True,
        split_by_whitespace=True,
        split_by_number=True,
        treat_whitespace_as_suffix=False,
        allow_whitespace_only_pieces=True,
        max_sentencepiece_length=16,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
        unk_surface=" \u2047 ",
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        hard_vocab_limit=True,
        minloglevel=2,
    )
    data = model.getvalue()
    (out_dir / "tokenizer.model").write_bytes(data)
    return data


def added_token(content: str) -> dict:
    """One `added_tokens_decoder` entry as transformers saves it for `special_tokens=True`."""
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_checkpoint_files(out_dir: Path, sp_vocab_size: int) -> None:
    """The transformers side of a LlamaTokenizer checkpoint of the InternVL-Chat V1.1 kind."""
    added = {token: sp_vocab_size + i for i, token in enumerate(ADDED_TOKENS)}
    write_json(out_dir / "added_tokens.json", added)
    decoder = {"0": added_token("<unk>"), "1": added_token("<s>"), "2": added_token("</s>")}
    decoder.update({str(i): added_token(t) for t, i in added.items()})
    write_json(
        out_dir / "tokenizer_config.json",
        {
            "add_bos_token": True,
            "add_eos_token": False,
            "added_tokens_decoder": decoder,
            "bos_token": "<s>",
            "clean_up_tokenization_spaces": False,
            "eos_token": "</s>",
            "legacy": True,
            "model_max_length": 4096,
            "pad_token": "<unk>",
            "padding_side": "right",
            "sp_model_kwargs": {},
            "tokenizer_class": "LlamaTokenizer",
            "unk_token": "<unk>",
        },
    )
    special = {k: added_token(v) for k, v in [("bos_token", "<s>"), ("eos_token", "</s>"), ("pad_token", "<unk>"), ("unk_token", "<unk>")]}
    for entry in special.values():
        del entry["special"]
    write_json(out_dir / "special_tokens_map.json", special)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models/demo-internvl"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    stale = args.out / "tokenizer.json"
    if stale.exists():
        raise SystemExit(f"{stale} must not exist: the published checkpoint has no tokenizer.json")
    data = train(args.out)
    sp = spm.SentencePieceProcessor(model_proto=data)
    write_checkpoint_files(args.out, sp.get_piece_size())
    print(
        f"wrote {args.out}: {sp.get_piece_size()} SentencePiece pieces + {len(ADDED_TOKENS)} added tokens, "
        f"tokenizer.model sha256 {hashlib.sha256(data).hexdigest()[:16]}"
    )


if __name__ == "__main__":
    main()
