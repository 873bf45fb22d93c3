"""`train --dry-run`: the rendered prompts with token counts and the rewards of sample
completions, from a tokenizer-only model directory (no weights), and nothing written."""

import json

from grpo_mlx import cli
from grpo_mlx.prompts import encode_prompt
from grpo_mlx.testing import CHATML, QWEN3_THINKING, build_bpe_tokenizer, save_tokenizer_dir

QUESTION = "Natalia sold 48 clips in April and half as many in May. How many clips did she sell?"


def gsm8k_like(tmp_path):
    rows = [{"question": QUESTION, "answer": "48 / 2 = 24\n48 + 24 = 72\n#### 72"}]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(tmp_path / "data")


def dry_run(tmp_path, monkeypatch, capsys, *flags):
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    code = cli.main(["train", "--dry-run", *flags])
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no run directory, nothing written
    return code, capsys.readouterr().out


def test_shows_the_rendered_prompt_with_its_tokens_and_the_rewards(tmp_path, monkeypatch, capsys):
    model = save_tokenizer_dir(tmp_path / "model", CHATML)
    data = gsm8k_like(tmp_path)
    code, out = dry_run(
        tmp_path, monkeypatch, capsys, "--model", model, "--data", data, "--prompt-key", "question",
        "--reward-functions", "accuracy", "format",
    )  # fmt: skip
    assert code == 0
    tok = build_bpe_tokenizer(CHATML)
    text = tok.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True)
    assert f"--- prompt 1 of 1 ({len(encode_prompt(tok, text))} tokens) ---\n{text}\n--- end of prompt ---" in out
    assert "1 train prompts, no held-out split" in out and "no weights loaded" in out
    assert "<answer>72</answer>'\n    -> accuracy 1, format 1, total 2" in out  # the dataset's answer, formatted
    assert "<answer>no idea</answer>'\n    -> accuracy 0, format 1, total 1" in out


def test_chat_template_kwargs_and_notes_reach_the_dry_run(tmp_path, monkeypatch, capsys):
    model = save_tokenizer_dir(tmp_path / "model", QWEN3_THINKING)
    data = gsm8k_like(tmp_path)
    flags = ["--model", model, "--data", data, "--prompt-key", "question"]
    _, out = dry_run(tmp_path, monkeypatch, capsys, *flags)
    assert "<|im_start|>assistant\n\n--- end of prompt" in out  # the template's default: thinking on
    _, out = dry_run(tmp_path, monkeypatch, capsys, *flags, "--chat-template-kwargs", '{"enable_thinking": false}')
    assert "<|im_start|>assistant\n<think>\n\n</think>\n\n\n--- end of prompt" in out
    assert "chat_template_kwargs {'enable_thinking': False}" in out


def test_a_model_without_a_template_is_noted(tmp_path, monkeypatch, capsys):
    model = save_tokenizer_dir(tmp_path / "model", chat_template=None)
    code, out = dry_run(tmp_path, monkeypatch, capsys, "--model", model, "--data", gsm8k_like(tmp_path),
                        "--prompt-key", "question")  # fmt: skip
    assert code == 0 and "chat template: no (plain text)" in out
    assert f"note: {model} has no chat template: prompts are used as plain text" in out
    assert f"tokens) ---\n{QUESTION}\n--- end" in out


def test_an_unreachable_hub_model_fails_at_once_in_one_sentence(tmp_path):
    import os
    import subprocess
    import sys

    data = gsm8k_like(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    command = [sys.executable, "-m", "grpo_mlx", "train", "--dry-run", "--model", "owner/model", "--data", data,
               "--prompt-key", "question"]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr and "Retrying" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "grpo-mlx: error: model 'owner/model': the Hub is unreachable (cannot reach http://127.0.0.1:9 "
        "(ConnectError)) and its tokenizer is not in the local cache"
    )


def test_a_reward_using_trl_s_extra_arguments_runs_in_the_dry_run(tmp_path, monkeypatch, capsys):
    (tmp_path / "trl_style.py").write_text(
        "def steps_done(completions, trainer_state, log_metric, completion_ids, **kw):\n"
        "    log_metric('seen', 1.0)\n"
        "    return [float(trainer_state.global_step + len(ids) > 0) for ids in completion_ids]\n"
    )
    model = save_tokenizer_dir(tmp_path / "model", CHATML)
    code, out = dry_run(tmp_path, monkeypatch, capsys, "--model", model, "--data", gsm8k_like(tmp_path),
                        "--prompt-key", "question", "--reward-functions", "trl_style.py:steps_done")  # fmt: skip
    assert code == 0 and "-> steps_done 1, total 1" in out
