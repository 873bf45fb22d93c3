"""The embedded demo: shipped model, tokenizer, chat template and task splits."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from grpo_mlx.demo import task

MODEL_DIR = Path(task.__file__).parent / "model"


@pytest.fixture(scope="module")
def pretrain():
    from grpo_mlx.demo import pretrain  # loads OpenBLAS before MLX when it comes first

    return pretrain


@pytest.fixture(scope="module")
def loaded(pretrain):
    from mlx_lm import load

    return load(str(MODEL_DIR))  # (model, TokenizerWrapper)


def test_load_offline():
    # A fresh interpreter: the hub libraries read HF_HUB_OFFLINE when they are imported.
    code = (
        "import mlx.core as mx, mlx_lm\n"
        f"model, tok = mlx_lm.load({str(MODEL_DIR)!r})\n"
        "from mlx.utils import tree_flatten\n"
        "dtypes = {v.dtype for _, v in tree_flatten(model.parameters())}\n"
        "print(tok.eos_token_id, sorted(tok.eos_token_ids), tok.pad_token_id, dtypes == {mx.float32})\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "[1]", "0", "True"]


def test_shipped_files_are_small():
    names = {p.name for p in MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert sum(p.stat().st_size for p in MODEL_DIR.iterdir()) <= 20 * 2**20


def test_tokenizer_round_trips(loaded, pretrain):
    _, tok = loaded
    for text in ["0123456789+=", "12+34=46", "<answer>46</answer>\n", " a  b ,c\t"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert len(ids) == len(text)  # one character, one token
        assert tok.decode(ids) == text
    for char in pretrain.CHARACTERS:
        assert tok.decode(tok.encode(char, add_special_tokens=False)) == char
    assert tok.convert_tokens_to_ids(["<pad>", "<eos>"]) == [pretrain.PAD_ID, pretrain.EOS_ID]


def test_streaming_detokenizer(loaded):
    _, tok = loaded
    text = "<answer>12 + 34</answer>\nok"
    detok = tok.detokenizer
    detok.reset()
    pieces = []
    for token in tok.encode(text, add_special_tokens=False):
        detok.add_token(token)
        pieces.append(detok.last_segment)
    detok.finalize()
    pieces.append(detok.last_segment)
    assert "".join(pieces) == text == detok.text


def test_chat_template_gives_the_trained_prompt(loaded, pretrain):
    _, tok = loaded
    messages = [{"role": "user", "content": "12+34"}]
    assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == "12+34="
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert list(ids) == tok.encode("12+34=", add_special_tokens=False)  # no BOS
    tokens, mask = pretrain.training_arrays(tok, [{"prompt": "12+34", "answer": "46"}])
    answer = tok.encode("46", add_special_tokens=False) + [pretrain.EOS_ID]
    assert tokens[0, : len(ids) + 3].tolist() == list(ids) + answer
    assert mask[0].tolist() == [0.0] * len(ids) + [1.0] * 3 + [0.0] * (tokens.shape[1] - len(ids) - 3)


def test_splits_are_disjoint_and_canonical():
    splits = task.make_splits()
    assert [len(splits[k]) for k in ("test", "valid", "train")] == [200, 100, 7800]
    prompts = {k: {ex["prompt"] for ex in v} for k, v in splits.items()}
    assert not prompts["test"] & prompts["valid"]
    assert not prompts["train"] & (prompts["test"] | prompts["valid"])
    assert splits == task.make_splits()  # deterministic
    for name, rows in splits.items():  # the shipped JSONL is this split
        lines = (task.DATA_DIR / f"{name}.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in lines] == rows


def test_examples_are_right():
    for ex in task.make_splits()["test"]:
        a, b = ex["prompt"].split("+")
        assert len(ex["prompt"]) == 5 and int(a) + int(b) == int(ex["answer"])
    assert task.is_correct(" 46\n", "46") and not task.is_correct("47", "46")


def test_shipped_model_is_half_trained(loaded, pretrain):
    model, tok = loaded
    accuracy = pretrain.greedy_accuracy(model, tok, task.make_splits()["test"])
    assert 0.05 < accuracy <= 0.50  # GRPO has room to improve and right samples to learn from


def test_forgotten_carries(pretrain):
    assert pretrain.forget_carries(17, 25) == "32"  # 7+5=12 -> 2, 1+2 -> 3 (the carry is lost)
    assert pretrain.forget_carries(95, 87) == "72"  # both carries lost
    assert pretrain.forget_carries(12, 34) == "46"  # nothing to carry: the right sum
    train = task.make_splits()["train"]
    slipped = pretrain.with_slips(train, 0.6)
    changed = [(a, b) for a, b in zip(train, slipped) if a["answer"] != b["answer"]]
    carries = [ex for ex in train if pretrain.forget_carries(*map(int, ex["prompt"].split("+"))) != ex["answer"]]
    assert 0.5 < len(changed) / len(carries) < 0.7
    assert all(b["answer"] == pretrain.forget_carries(*map(int, a["prompt"].split("+"))) for a, b in changed)


def test_sampled_answers_beat_greedy(loaded, pretrain):
    """The shipped model prefers the slip but knows the sum: GRPO's groups are mixed."""
    model, tok = loaded
    mx.random.seed(0)
    stats = pretrain.group_stats(model, tok, task.make_splits()["test"][:100])
    assert stats["mixed"] > 0.5 and stats["any_correct"] > 0.8


@pytest.mark.slow
def test_pretrain_script_writes_a_loadable_model(pretrain, tmp_path):
    from mlx_lm import load

    accuracy = pretrain.pretrain(tmp_path, steps=60, eval_every=60, max_accuracy=1.0)
    model, tok = load(str(tmp_path))
    assert pretrain.greedy_accuracy(model, tok, task.make_splits()["test"]) == accuracy
