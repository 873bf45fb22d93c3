"""Every recipe in examples/ runs `train --dry-run` on local stand-in data with the recipe's own
columns (the Hub is unreachable here) and a tokenizer-only model directory of the same family."""

import json
from pathlib import Path

import pytest

from grpo_mlx import cli
from grpo_mlx.testing import CHATML, QWEN3_THINKING, save_tokenizer_dir

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
GSM8K = [
    {"question": "Natalia sold 48 clips in April and half as many in May. How many in all?", "answer": "24\n#### 72"},
    {"question": "Weng earns $12 an hour. How much for 50 minutes?", "answer": "12/60*50 = 10\n#### 10"},
]
MBPP = [
    {
        "prompt": "Write a function add(a, b) that returns the sum of a and b.",
        "tests": "assert add(1, 2) == 3\nassert add(-1, 1) == 0",
        "answer": "def add(a, b):\n    return a + b",
    }
]
SYSTEM = {"role": "system", "content": "Think, then answer."}
GSM8K_CHAT = [{"prompt": [SYSTEM, {"role": "user", "content": GSM8K[0]["question"]}], "ground_truth": "72"}]


def write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def hub_layout(folder: Path) -> str:
    """openai/gsm8k's layout: one folder of parquet shards per config."""
    for config in ("main", "socratic"):
        rows = GSM8K if config == "main" else [{**r, "question": "socratic " + r["question"]} for r in GSM8K]
        write_parquet(folder / config / "train-00000-of-00001.parquet", rows)
        write_parquet(folder / config / "test-00000-of-00001.parquet", rows[:1])
    return str(folder)


def jsonl_layout(rows: list[dict]):
    def write(folder: Path) -> str:
        folder.mkdir(parents=True)
        for split in ("train", "test"):
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return str(folder)

    return write


# recipe -> (stand-in data, chat template, what the dry run must show)
RECIPES = {
    "gsm8k_qwen2.5_0.5b.yaml": (
        hub_layout,
        CHATML,
        ["2 train prompts, 1 held-out (test)", "inside <answer> </answer>.<|im_end|>\n<|im_start|>user\nNatalia",
         "<answer>72</answer>'\n    -> accuracy 1, format_soft 1, total 1.25"],
    ),
    "qwen3_no_thinking.yaml": (
        hub_layout,
        QWEN3_THINKING,
        ["chat_template_kwargs {'enable_thinking': False}", "<|im_start|>assistant\n<think>\n\n</think>\n\n\n--- end",
         "<answer>72</answer>'\n    -> accuracy 1, overlong 0, total 1"],
    ),
    "code_tests.yaml": (
        jsonl_layout(MBPP),
        CHATML,
        ["```python\\ndef add(a, b):\\n    return a + b\\n```'\n    -> code 1, total 1",
         "```python\\npass\\n```'\n    -> code 0, total 0"],
    ),
    "trl_rewards.yaml": (
        jsonl_layout(GSM8K_CHAT),
        CHATML,
        ["<|im_start|>system\nThink, then answer.<|im_end|>",
         "-> think_answer_format 1, answer_matches 1, accuracy 1, total 1.25",
         "-> think_answer_format 1, answer_matches 0, accuracy 0, total 0.25"],
    ),
}  # fmt: skip


def test_every_recipe_has_a_stand_in():
    assert sorted(p.name for p in EXAMPLES.glob("*.yaml")) == sorted(RECIPES)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_dry_run(recipe, tmp_path, monkeypatch, capsys):
    make_data, template, expected = RECIPES[recipe]
    model = save_tokenizer_dir(tmp_path / "model", template)
    data = make_data(tmp_path / "data")
    monkeypatch.chdir(ROOT)  # recipes name reward files relative to the repository root
    runs_before = (ROOT / "runs").exists()
    code = cli.main(["train", "-c", str(EXAMPLES / recipe), "--dry-run", "--model", model, "--data", data])
    out = capsys.readouterr().out
    assert code == 0, out
    for text in expected:
        assert text in out, f"{recipe}: {text!r} not in\n{out}"
    assert (ROOT / "runs").exists() == runs_before  # a dry run writes no run directory


def test_the_trl_reward_file_writes_its_data(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("trl_rewards", EXAMPLES / "trl_rewards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    calls = []

    def load_split(data, split, **options):
        calls.append((data, split, options.get("config")))
        return [{"question": q["question"], "answer": q["answer"]} for q in GSM8K]

    monkeypatch.setattr("grpo_mlx.data.load_split", load_split)
    module.write_gsm8k_chat(str(tmp_path / "chat"))
    assert calls == [("openai/gsm8k", "train", "main"), ("openai/gsm8k", "test", "main")]
    first = json.loads((tmp_path / "chat" / "train.jsonl").read_text().splitlines()[0])
    assert first["ground_truth"] == "72" and first["prompt"][-1] == {"role": "user", "content": GSM8K[0]["question"]}
    completions = [[{"role": "assistant", "content": "<think>x</think>\n<answer>72</answer>"}]]
    assert module.think_answer_format(completions) == [1.0]
    assert module.answer_matches(completions, ground_truth=["72"]) == [1.0]
