"""Reliability: bad input gets one clear sentence, misbehaving rewards and non-finite steps are
handled (generated code: test_sandbox.py), and kills, Ctrl-C or a full disk lose no checkpoint."""

import errno
import json
import os
import signal
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from grpo_mlx import cli
from grpo_mlx.checkpoint import CheckpointError, latest_checkpoint
from grpo_mlx.config import DEMO_DATA, build_config
from grpo_mlx.trainer import Trainer, TrainingStopped

SMALL = ["--batch-size", "4", "--group-size", "4", "--eval-limit", "0", "--learning-rate", "1e-3"]


# ------------------------------------------------------------------ bad input


def run_cli(args, capsys):
    code = cli.main(["train", *args])
    return code, capsys.readouterr().err


def write(path, text, mode="w"):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


BAD_DATA = {
    "malformed_json": ('{"prompt": "1+1", "answer": "2"}\n{"prompt": "2+2", "answer": \n', ["train.jsonl:2", "JSON"]),
    "empty_file": ("", ["train.jsonl", "no examples"]),
    "not_an_object": ('["1+1", "2"]\n', ["train.jsonl:1", "object"]),
    "missing_prompt": ('{"question": "1+1", "answer": "2"}\n', ["train.jsonl:1", "'prompt'", "--prompt-key"]),
    "prompt_wrong_type": ('{"prompt": 12, "answer": "2"}\n', ["train.jsonl:1", "prompt"]),
    "non_utf8": (b'{"prompt": "1+1\xff", "answer": "2"}\n', ["train.jsonl:1", "UTF-8"]),
}


@pytest.mark.parametrize("name", sorted(BAD_DATA))
def test_bad_data_is_one_clear_line(name, tmp_path, capsys):
    text, expected = BAD_DATA[name]
    write(tmp_path / "data" / "train.jsonl", text)
    code, err = run_cli(["--data", str(tmp_path / "data"), "--adapter-path", str(tmp_path / "run"), *SMALL], capsys)
    assert code != 0
    for piece in expected:
        assert piece in err, (piece, err)
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists(), "nothing is written for a run that never started"


def test_prompt_longer_than_limit(tmp_path, capsys):
    write(
        tmp_path / "data" / "train.jsonl",
        '{"prompt": "12+34", "answer": "46"}\n{"prompt": "' + "1+" * 40 + '1", "answer": "41"}\n',
    )
    code, err = run_cli(["--data", str(tmp_path / "data"), "--max-prompt-length", "20", *SMALL], capsys)
    assert code == 1 and "example 1" in err and "20" in err and "Traceback" not in err


def test_prompt_longer_than_model_context(tmp_path, capsys):
    write(tmp_path / "data" / "train.jsonl", '{"prompt": "' + "9" * 600 + '", "answer": "1"}\n')
    code, err = run_cli(["--data", str(tmp_path / "data"), *SMALL], capsys)
    assert code == 1 and "context of 512 tokens" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--model", "/no/such/model", "--data", DEMO_DATA], "does not exist"),
        (["--model", DEMO_DATA, "--data", DEMO_DATA], "not a model directory"),
        (["--model", "some/model"], "'data'"),
        (["--group-size", "1"], "'group_size'"),
        (["--learning-rate", "-1"], "'learning_rate'"),
        (["--loss-type", "ppo"], "grpo, bnpo, dr_grpo, dapo"),
        (["--reward-functions", "acuracy"], "did you mean 'accuracy'"),
        (["--reward-functions", "missing_file.py:reward"], "missing_file.py"),
        (["--reward-functions", "json:dumps_nothing"], "dumps_nothing"),
        (["--resume", "/no/such/run"], "/no/such/run"),
    ],
)
def test_bad_options_are_one_clear_line(args, expected, tmp_path, capsys):
    code, err = run_cli([*SMALL, "--adapter-path", str(tmp_path / "run"), *args], capsys)
    assert code != 0
    assert expected in err, err
    assert "Traceback" not in err


def test_config_file_typo_names_line(tmp_path, capsys):
    cfg = write(tmp_path / "run.yaml", "iters: 3\ngroup_szie: 4\n")
    code, err = run_cli(["-c", str(cfg)], capsys)
    assert code == 2 and "run.yaml:2" in err and "group_size" in err and "Traceback" not in err


def test_debug_shows_the_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "grpo_mlx", "train", "--model", "/no/such/model", "--debug"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr


# ------------------------------------------------------------------ misbehaving rewards

REWARDS = {
    "raises": "raise ValueError('bad input')",
    "wrong_count": "return [1.0]",
    "nan": "return [float('nan')] * len(completions)",
    "inf": "return [float('inf')] * len(completions)",
    "not_a_number": "return ['high'] * len(completions)",
    "hangs": "import time; time.sleep(30); return [0.0] * len(completions)",
}


def small(tmp_path, **kw):
    flags = dict(
        adapter_path=str(tmp_path / "run"),
        batch_size=4,
        group_size=4,
        iters=4,
        eval_limit=0,
        save_every=2,
        learning_rate=1e-3,
        reward_timeout=2.0,
    )
    flags.update(kw)
    return build_config(flags)


@pytest.mark.parametrize("kind", sorted(REWARDS))
def test_misbehaving_reward_stops_with_a_checkpoint(kind, tmp_path):
    path = write(tmp_path / "rewards.py", f"def bad(prompts, completions, **kw):\n    {REWARDS[kind]}\n")
    trainer = Trainer(small(tmp_path, reward_functions=["accuracy", f"{path}:bad"]))
    with pytest.raises(TrainingStopped) as e:
        trainer.run()
    assert "'bad'" in str(e.value) and "--resume" in str(e.value)
    if kind != "wrong_count":
        assert "completion" in str(e.value)
    ckpt = latest_checkpoint(trainer.run_dir)
    assert ckpt is not None and json.loads((ckpt / "state.json").read_text())["step"] == 0


def test_skip_policy_keeps_training(tmp_path):
    path = write(
        tmp_path / "flaky.py",
        "calls = []\ndef flaky(prompts, completions, **kw):\n"
        "    calls.append(1)\n    if len(calls) == 2:\n        raise RuntimeError('flaky')\n"
        "    return [0.5] * len(completions)\n",
    )
    trainer = Trainer(small(tmp_path, reward_functions=["accuracy", f"{path}:flaky"], reward_error_policy="skip"))
    summary = trainer.run()
    assert summary["steps"] == 4 and trainer.state["skipped_steps"] == 1


# ------------------------------------------------------------------ non-finite steps


def nan_gradients_in(monkeypatch, bad_steps: set) -> None:
    """Make the trainer's compiled step return NaN gradients in the chosen steps (0-based)."""
    from mlx.utils import tree_map

    from grpo_mlx import trainer as trainer_module

    real = trainer_module.make_loss_and_grad
    current = {"step": -1}
    real_step = Trainer.train_step

    def train_step(self, step):
        current["step"] = step
        return real_step(self, step)

    def make(*args, **kwargs):
        inner = real(*args, **kwargs)

        def step(*a):
            loss, metrics, logp, grads = inner(*a)
            if current["step"] in bad_steps:
                grads = tree_map(lambda g: g * float("nan"), grads)
            return loss, metrics, logp, grads

        return step

    monkeypatch.setattr(trainer_module, "make_loss_and_grad", make)
    monkeypatch.setattr(Trainer, "train_step", train_step)


def test_nan_gradients_skip_the_step(tmp_path, monkeypatch):
    nan_gradients_in(monkeypatch, {1})
    trainer = Trainer(small(tmp_path, iters=4))
    summary = trainer.run()
    assert summary["steps"] == 4 and trainer.state["skipped_steps"] == 1
    weights = mx.load(str(trainer.run_dir / "adapters.safetensors"))
    assert all(np.isfinite(np.array(w)).all() for w in weights.values())


def test_nan_gradients_in_a_row_stop_with_last_good_adapters(tmp_path, monkeypatch):
    reference = Trainer(small(tmp_path / "ref", iters=1))
    reference.run()
    nan_gradients_in(monkeypatch, {1, 2, 3})
    trainer = Trainer(small(tmp_path, iters=6, max_bad_steps=3))
    with pytest.raises(TrainingStopped, match="3 steps in a row"):
        trainer.run()
    good = mx.load(str(reference.run_dir / "adapters.safetensors"))
    saved = mx.load(str(trainer.run_dir / "adapters.safetensors"))
    for k in good:
        np.testing.assert_array_equal(np.array(good[k]), np.array(saved[k]))


# ------------------------------------------------------------------ full disk


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    trainer = Trainer(small(tmp_path, iters=4, save_every=2))
    real_save = mx.save_safetensors
    calls = []

    def failing(path, *args, **kwargs):
        calls.append(path)
        if len(calls) > 2:  # the first checkpoint (adapters + optimizer) succeeds
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(mx, "save_safetensors", failing)
    with pytest.raises(CheckpointError, match="No space left on device.*step_0000002.*intact"):
        trainer.run()
    monkeypatch.undo()
    root = trainer.run_dir / "checkpoints"
    assert [p.name for p in root.iterdir() if p.name.startswith(".tmp")] == []
    assert latest_checkpoint(trainer.run_dir).name == "step_0000002"
    mx.load(str(root / "step_0000002" / "adapters.safetensors"))  # loads: not damaged
    resumed = Trainer(
        build_config({"resume": str(trainer.run_dir)}, base=json.loads((trainer.run_dir / "config.json").read_text()))
    )
    assert resumed.run()["steps"] == 4


# ------------------------------------------------------------------ kills and Ctrl-C

TRAIN = [sys.executable, "-c", "import sys; from grpo_mlx.cli import main; sys.exit(main(sys.argv[1:]))"]
RUN_ARGS = ["train", *SMALL, "--iters", "6", "--save-every", "2"]

KILL_POINTS = {
    # while the adapters of the second checkpoint are being written into the temporary directory
    "writing": "import grpo_mlx.checkpoint as c\norig = c.save_adapters\nn = []\n"
    "def f(*a):\n    n.append(1)\n    orig(*a)\n    if len(n) == 2: os.kill(os.getpid(), signal.SIGKILL)\n"
    "c.save_adapters = f\n",
    # after the checkpoint directory is renamed into place, before `latest` moves
    "publishing": "import grpo_mlx.checkpoint as c\norig = c._copy_atomic\nn = []\n"
    "def f(*a):\n    n.append(1)\n    if len(n) == 3: os.kill(os.getpid(), signal.SIGKILL)\n    orig(*a)\n"
    "c._copy_atomic = f\n",
}


def train_args(run):
    return [*RUN_ARGS, "--adapter-path", str(run)]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("straight") / "run"
    subprocess.run([*TRAIN, *train_args(run)], check=True, capture_output=True, timeout=600)
    return mx.load(str(run / "adapters.safetensors"))


def assert_same_adapters(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), atol=1e-6, err_msg=k)


def resume(run):
    proc = subprocess.run([*TRAIN, "train", "--resume", str(run)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return mx.load(str(run / "adapters.safetensors"))


@pytest.mark.parametrize("point", sorted(KILL_POINTS))
def test_sigkill_during_save_loses_nothing(point, tmp_path, straight_run):
    run = tmp_path / "run"
    code = (
        "import os, signal, sys\n"
        + KILL_POINTS[point]
        + "from grpo_mlx.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, *train_args(run)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL
    ckpt = latest_checkpoint(run)
    assert ckpt is not None and ckpt.name in ("step_0000002", "step_0000004")
    mx.load(str(ckpt / "adapters.safetensors"))
    mx.load(str(run / "adapters.safetensors"))
    assert_same_adapters(resume(run), straight_run)


# A reward function that signals its own process when the Nth batch is scored (TRIGGER_AT, with
# TRIGGER_SIG): the fault lands at a known step however slow the machine is. It adds 0 to every
# reward, so a run with it is the same run as without.
TRIGGER = """import os, signal
calls = []
def trigger(prompts, completions, **kw):
    calls.append(1)
    if os.environ.get("TRIGGER_AT") and len(calls) == int(os.environ["TRIGGER_AT"]):
        os.kill(os.getpid(), getattr(signal, os.environ["TRIGGER_SIG"]))
    return [0.0] * len(completions)
"""


def triggered_run(tmp_path, sig: str, at: int):
    reward = tmp_path / "trigger.py"
    reward.write_text(TRIGGER)
    run = tmp_path / "run"
    env = {**os.environ, "TRIGGER_AT": str(at), "TRIGGER_SIG": sig}
    args = [*train_args(run), "--reward-functions", "accuracy", f"{reward}:trigger", "--reward-weights", "1", "0"]
    proc = subprocess.run([*TRAIN, *args], capture_output=True, text=True, timeout=600, env=env)
    return run, proc


def test_sigkill_during_training_then_resume(tmp_path, straight_run):
    run, proc = triggered_run(tmp_path, "SIGKILL", at=3)  # killed while scoring step 3
    assert proc.returncode == -signal.SIGKILL
    assert latest_checkpoint(run).name == "step_0000002"
    assert_same_adapters(resume(run), straight_run)


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_ctrl_c_and_sigterm_save_and_say_how_to_resume(sig, tmp_path, straight_run):
    run, proc = triggered_run(tmp_path, sig, at=3)  # arrives during step 3, which still completes
    assert proc.returncode == 130, proc.stderr[-2000:]
    err = proc.stderr
    assert "stopping after this step" in err and "--resume" in err and "Traceback" not in err
    assert latest_checkpoint(run).name == "step_0000003"
    assert_same_adapters(resume(run), straight_run)
