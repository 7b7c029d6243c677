"""Small data makers shared by several test files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from longkd.tools.tiny import ids_to_text


def write_random_text(path: Path, *, samples: int, vocab: int, lengths: tuple[int, int], seed: int) -> Path:
    """A jsonl file of ``samples`` rows ``{"text": "t5 t17 ..."}`` over the word tokenizer's ids.

    Args:
        lengths: (low, high) sample length in tokens, high exclusive.
    """
    rng = np.random.default_rng(seed)
    with path.open("w") as f:
        for _ in range(samples):
            ids = rng.integers(4, vocab, size=int(rng.integers(*lengths)))
            f.write(json.dumps({"text": ids_to_text(ids)}) + "\n")
    return path
