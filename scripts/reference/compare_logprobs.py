#!/usr/bin/env python3
"""Compares the first generated step of `internvl generate --logprobs-out` with the independent
reference's logits (tests/fixtures/reference/model.safetensors, written by generate_model.py):
the chosen token must be the reference's greedy one, and the reported top-20 logprobs must be
the reference's log-softmax at those tokens within a tolerance.

Tolerances: f32 1e-3 (as the CPU tests hold the logits); bf16 3 % of the reference's largest
|logit|. The bf16 bound is three times what bf16 compute itself costs here: transformers'
InternVL on this checkpoint in bf16 against f32 (torch 2.15, CPU) differs by at most 1.1 % of
the largest |logit| in the logits and 1.08 in these top-20 logprobs over the five cases.

Usage: compare_logprobs.py CASE_NAME LOGPROBS_JSONL f32|bf16   (exit 1 when outside)
Needs numpy and safetensors (transformers' dependencies), no torch.
"""

import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests/fixtures/reference"


def main() -> int:
    name, path, dtype = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    logits = load_file(FIXTURES / "model.safetensors")[f"logits.{name}"].astype(np.float64)
    case = next(c for c in json.loads((FIXTURES / "model_cases.json").read_text())["cases"]
                if c["name"] == name)
    reference = logits - logits.max()
    reference = reference - np.log(np.exp(reference).sum())
    first = json.loads(path.read_text().splitlines()[0])
    tolerance = 1e-3 if dtype == "f32" else 0.03 * float(np.abs(logits).max())
    error = max(abs(lp - reference[token]) for token, lp in first["top"])
    expected = case["greedy_tokens"][0]
    ok = first["token"] == expected and error <= tolerance
    print(f"{'PASS' if ok else 'FAIL'}: {name} {dtype}: first token {first['token']} "
          f"(reference {expected}), top-20 logprobs max error {error:.2e} (tolerance {tolerance:.2e})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
