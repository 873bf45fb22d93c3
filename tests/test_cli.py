"""The `train` command end to end on the embedded demo: run-directory ownership, resume rules,
failures after start-up (full disk for metrics, rewards that exit or crash, Ctrl-C before the
first step), each one sentence, a non-zero exit, and the last good state saved."""

import errno
import json
import os
import signal
import subprocess
import sys

import pytest

from grpo_mlx import cli
from grpo_mlx.config import DEMO_DATA, DEMO_MODEL
from grpo_mlx.events import Control

QUICK = ["--iters", "2", "--batch-size", "2", "--group-size", "2", "--eval-limit", "0"]


def train(*args, env=None):
    """`grpo-mlx train` in a subprocess: (exit status, stderr's lines)."""
    proc = subprocess.run(
        [sys.executable, "-m", "grpo_mlx", "train", *args], capture_output=True, text=True, timeout=300, env=env
    )
    return proc.returncode, proc.stderr


def error_line(err: str) -> str:
    """The one error sentence, checked to be one line with no traceback."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("grpo-mlx: error:")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "run"
    code, err = train(*QUICK, "--adapter-path", str(run))
    assert code == 0, err
    return run


# ------------------------------------------------------------------ one owner, one history


def test_a_directory_holding_a_run_is_refused(finished_run):
    code, err = train(*QUICK, "--adapter-path", str(finished_run))
    line = error_line(err)
    assert code == 1 and "already holds a run" in line and f"--resume {finished_run}" in line and "--overwrite" in line
    assert "model" not in err.split("grpo-mlx: error:")[0]  # refused before anything loaded or printed


@pytest.mark.parametrize("where", [DEMO_MODEL, DEMO_DATA, os.path.join(DEMO_MODEL, "adapters")])
def test_model_or_data_directory_is_refused(where):
    code, err = train(*QUICK, "--adapter-path", where)
    assert code == 1 and "inside the" in error_line(err)
    assert not os.path.exists(os.path.join(DEMO_MODEL, "adapters"))


def test_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    code, err = train(*QUICK, "--adapter-path", str(tmp_path / "f"))
    assert code == 1 and "is a file" in error_line(err)


def test_a_second_trainer_is_refused_naming_the_first(tmp_path):
    from grpo_mlx.rundir import RunLock

    (tmp_path / "run").mkdir()
    lock = RunLock(tmp_path / "run").acquire()
    try:
        code, err = train(*QUICK, "--adapter-path", str(tmp_path / "run"))
    finally:
        lock.release()
    assert code == 1 and f"pid {os.getpid()}" in error_line(err)


def test_read_only_run_directory_is_refused_before_loading(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        code, err = train(*QUICK, "--adapter-path", str(ro / "run"))
    finally:
        subprocess.run(["umount", str(ro)])
    assert code == 1 and "cannot write there" in error_line(err)


def test_resume_alone_continues_the_recorded_run_and_refuses_changes(finished_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    code, err = train("--resume", str(run), "--group-size", "4")
    assert code == 2 and "group_size 2 -> 4" in error_line(err)
    code, err = train("--resume", str(run), "--iters", "3")
    assert code == 0, err
    assert "resuming at step 2" in err and "finished after 3 steps" in err
    config = json.loads((run / "config.json").read_text())
    assert (config["batch_size"], config["group_size"], config["eval_limit"]) == (2, 2, 0)  # the record, not defaults
    steps = [
        json.loads(line)["step"]
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["type"] == "step"
    ]
    assert steps == [1, 2, 3]


def test_recorded_paths_are_absolute_and_eval_works_from_elsewhere(finished_run, tmp_path):
    adapter_config = json.loads((finished_run / "adapter_config.json").read_text())
    config = json.loads((finished_run / "config.json").read_text())
    assert os.path.isabs(adapter_config["model"]) and os.path.isabs(config["data"])
    proc = subprocess.run(
        [sys.executable, "-m", "grpo_mlx", "eval", "--adapter-path", str(finished_run), "-k", "1", "--limit", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------ failures after start-up


def test_full_disk_for_metrics_stops_with_a_checkpoint_and_one_sentence(tmp_path, monkeypatch, capsys):
    from grpo_mlx import events

    real_open = events.JsonlSink._open

    class FillsUp:
        """metrics.jsonl on a disk that fills after the start event and two steps."""

        def __init__(self, f):
            self.f, self.writes = f, 0

        def write(self, data):
            self.writes += 1
            if self.writes > 3:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

    def fake_open(self, name):
        f = real_open(self, name)
        if name == "metrics.jsonl":
            self.files[-1] = FillsUp(f)
            return self.files[-1]
        return f

    monkeypatch.setattr(events.JsonlSink, "_open", fake_open)
    code = cli.main(
        [
            "train",
            "--iters",
            "6",
            "--batch-size",
            "2",
            "--group-size",
            "2",
            "--eval-limit",
            "0",
            "--adapter-path",
            str(tmp_path / "run"),
        ]
    )
    err = capsys.readouterr().err
    line = error_line(err)
    assert code == 1 and "metrics.jsonl" in line and "No space left" in line and "--resume" in line
    from grpo_mlx.checkpoint import latest_checkpoint

    events_written = [json.loads(text) for text in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [e["step"] for e in events_written if e["type"] == "step"]
    saved = json.loads((latest_checkpoint(tmp_path / "run") / "state.json").read_text())["step"]
    # the run stopped after the step whose line failed: that step finished and was saved
    assert 1 <= saved < 6 and steps == list(range(1, saved + 1))[: len(steps)] and saved - len(steps) <= 1


def write_reward(tmp_path, body):
    path = tmp_path / "bad_reward.py"
    path.write_text(f"def bad(prompts, completions, **kw):\n    {body}\n")
    return f"{path}:bad"


@pytest.mark.parametrize(
    "body, isolation, expected",
    [
        ("import sys; sys.exit(0)", "thread", "called sys.exit(0)"),
        ("raise KeyboardInterrupt", "thread", "KeyboardInterrupt"),
        ("import os; os._exit(0)", "process", "exit status 0"),
        ("import ctypes; ctypes.string_at(0)", "process", "SIGSEGV"),
    ],
)
def test_a_reward_that_exits_or_crashes_stops_with_a_checkpoint(body, isolation, expected, tmp_path, capsys):
    code = cli.main(
        [
            "train",
            *QUICK,
            "--adapter-path",
            str(tmp_path / "run"),
            "--reward-isolation",
            isolation,
            "--reward-functions",
            "accuracy",
            write_reward(tmp_path, body),
        ]
    )
    line = error_line(capsys.readouterr().err)
    assert code == 1 and "'bad'" in line and expected in line and "Checkpoint saved at step 0" in line
    assert (tmp_path / "run" / "checkpoints" / "step_0000000" / "state.json").exists()


def test_a_run_whose_every_step_is_skipped_fails_with_a_diagnosis(tmp_path, capsys):
    code = cli.main(
        [
            "train",
            *QUICK,
            "--adapter-path",
            str(tmp_path / "run"),
            "--reward-error-policy",
            "skip",
            "--max-bad-steps",
            "5",
            "--reward-functions",
            write_reward(tmp_path, "raise ValueError('x')"),
        ]
    )
    err = capsys.readouterr().err
    line = error_line(err)
    assert code == 1 and "all 2 steps were skipped" in line and "finished" not in err


def test_ctrl_c_while_loading_stops_at_once_without_a_resume_hint(tmp_path, monkeypatch, capsys):
    from grpo_mlx import trainer

    def interrupted(path):
        os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C once, during loading
        raise AssertionError("a first Ctrl-C before training must stop at once")

    monkeypatch.setattr(trainer, "load_model", interrupted)
    code = cli.main(["train", *QUICK, "--adapter-path", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 130 and "--resume" not in err and "nothing to resume" in err


def test_first_ctrl_c_after_training_started_waits_for_the_step():
    control = Control()
    control.training.set()
    with cli.graceful_stop(control, started=control.training.is_set):
        os.kill(os.getpid(), signal.SIGINT)
    assert control.stop.is_set()


def test_a_wrong_flag_gets_one_short_usage_line_not_every_flag(capsys):
    from grpo_mlx.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--num-generatons", "4"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.splitlines() == [
        "usage: grpo-mlx train [options]  (see grpo-mlx train --help)",
        "grpo-mlx train: error: unknown option --num-generatons (did you mean --num-generations?)",
    ]


def test_progress_printer_shows_the_tool_use_of_runs_with_tools():
    import io

    from grpo_mlx.cli import ProgressPrinter

    out = io.StringIO()
    printer = ProgressPrinter(out)
    printer({"type": "eval", "name": "before", "metrics": {"n": 4, "accuracy": 0.25, "mean_reward": 0.25}})
    printer(
        {"type": "eval", "name": "after", "metrics": {"n": 4, "accuracy": 1.0, "mean_reward": 1.0, "tool_use": 0.75}}
    )
    summary = {
        "run_dir": "r",
        "accuracy_before": 0.25,
        "accuracy_after": 1.0,
        "tool_use_before": 0.0,
        "tool_use_after": 0.75,
    }
    printer({"type": "end", "status": "finished", "step": 2, "summary": summary})
    lines = out.getvalue().splitlines()
    assert lines[0] == "held-out (before, 4 prompts, greedy): accuracy 25.0%, mean reward 0.250"  # no tools: no share
    assert lines[1].endswith("mean reward 1.000, calls a tool 75.0%")
    assert "held-out episodes calling a tool: 0.0% -> 75.0%" in lines
