"""The demo task: add two 2-digit numbers.

Choices, stated once:
- operands are 10..99, so every prompt is exactly five characters ("12+34") and every rendered
  prompt ("12+34=") has the same token length: batched greedy evaluation needs no padding.
- the answer is the plain decimal sum ("46", "123"), no zero padding.
- the split is over ordered pairs: "12+34" may be in `test` while "34+12" is in `train`.
  A model that learns commutativity may use that; it still never saw the held-out string.

No MLX here: the data loader, reward functions and tests import this cheaply.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

LOW, HIGH = 10, 99  # operand range, inclusive
N_TEST = 200
N_VALID = 100
DATA_DIR = Path(__file__).parent / "data"


def example(a: int, b: int) -> dict:
    return {"prompt": f"{a}+{b}", "answer": str(a + b)}


def all_examples() -> list[dict]:
    """Every ordered pair, in a fixed order (8100 examples)."""
    return [example(a, b) for a in range(LOW, HIGH + 1) for b in range(LOW, HIGH + 1)]


def make_splits(seed: int = 0) -> dict[str, list[dict]]:
    """The canonical disjoint split: `test` (held out), `valid`, and `train` (the rest)."""
    examples = all_examples()
    random.Random(seed).shuffle(examples)
    return {
        "test": examples[:N_TEST],
        "valid": examples[N_TEST : N_TEST + N_VALID],
        "train": examples[N_TEST + N_VALID :],
    }


def write_splits(out_dir: str | Path = DATA_DIR, seed: int = 0) -> dict[str, Path]:
    """Write {train,valid,test}.jsonl, one {"prompt", "answer"} object a line."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in make_splits(seed).items():
        path = out_dir / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        paths[name] = path
    return paths


def is_correct(completion: str, answer: str) -> bool:
    """Exact match after stripping whitespace: the demo's ground truth."""
    return completion.strip() == answer


if __name__ == "__main__":
    for name, path in write_splits().items():
        print(f"{name}: {path}")
