"""Trackers: what each one is sent (TRL's names, evaluations, the completions table), read back
from the files each writes without network (wandb offline, trackio's local store, TensorBoard
event files, SwanLab's local mode); a missing package and a failing tracker."""

import glob
import json
import os
import sqlite3
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from grpo_mlx import events, tracking
from grpo_mlx.config import build_config, to_dict

# One short run's events, sent through the real sink in a fresh process (each tracker keeps a
# global run and background threads of its own).
DRIVE = textwrap.dedent(
    """
    import sys
    import grpo_mlx
    from grpo_mlx import events, tracking
    from grpo_mlx.config import build_config, to_dict

    name, run_dir, first = sys.argv[1], sys.argv[2], int(sys.argv[3])  # first: the step it resumes at
    cfg = build_config({"report_to": [name], "project_name": "proj", "run_name": "run-a"})
    bus = events.EventBus()
    sink = tracking.attach(bus, cfg, run_dir)
    bus.emit(events.Start(run_dir=run_dir, config=to_dict(cfg), total_steps=first + 2, start_step=first))
    bus.emit(events.Eval(step=first, name="before", metrics={"n": 4, "accuracy": 0.25, "mean_reward": 0.3}))
    done = dict(text="so 4|5", rewards={"accuracy": 1.0, "format": 0.5}, reward=1.5, advantage=0.7,
                length=3, finish_reason="stop")
    groups = [dict(prompt="2+2?", prompt_text="<user>2+2?", answer="4", completions=[done])]
    for step in (first + 1, first + 2):
        bus.emit(events.Samples(step=step, groups=groups))
        bus.emit(events.Step(step=step, metrics={"reward": 0.5 * step, "completions/mean_length": 3.0}))
    bus.emit(events.Eval(step=first + 2, name="after", metrics={"n": 4, "accuracy": 0.75, "mean_reward": 0.8}))
    bus.emit(events.End(step=first + 2, summary={}, status="finished"))
    assert not sink.failures, sink.failures
    """
)


def drive(name, tmp_path, first=0, **env):
    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "SWANLAB_MODE": "local", **env}
    proc = subprocess.run(
        [sys.executable, "-c", DRIVE, name, str(run_dir), str(first)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run_dir


def test_completions_table_has_trls_columns_one_per_reward():
    groups = [
        dict(
            prompt=[{"role": "user", "content": "q"}],
            prompt_text="<q>",
            completions=[
                dict(text="a", rewards={"accuracy": 1.0, "format": None}, reward=1.0, advantage=0.5),
                dict(text="b", rewards={"accuracy": 0.0, "format": 1.0}, reward=1.0, advantage=-0.5),
            ],
        )
    ]
    columns, rows = tracking.completions_table(groups, step=3)
    assert columns == ["step", "prompt", "completion", "accuracy", "format", "reward", "advantage"]
    assert rows == [[3, "<q>", "a", 1.0, None, 1.0, 0.5], [3, "<q>", "b", 0.0, 1.0, 1.0, -0.5]]


def test_metrics_get_trls_prefixes_and_non_numbers_are_left_out():
    assert tracking.train_metrics({"reward": 1, "kl": float("nan"), "skipped": True, "x": "y"}) == {"train/reward": 1.0}
    assert tracking.eval_metrics({"accuracy": 0.5}) == {"eval/accuracy": 0.5}


def test_a_missing_package_is_named_with_its_pip_command(monkeypatch):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda m: None if m == "wandb" else real(m))
    with pytest.raises(
        tracking.TrackerMissing, match=r'--report-to wandb needs wandb.*pip install "grpo-mlx\[wandb\]"'
    ):
        tracking.attach(events.EventBus(), build_config({"report_to": ["wandb"]}), "run")


def test_only_rank_zero_reports_and_no_trackers_means_no_sink():
    cfg = build_config({"report_to": ["tensorboard"]})
    assert tracking.attach(events.EventBus(), cfg, "run", rank=1) is None
    assert tracking.attach(events.EventBus(), build_config({}), "run") is None


class Flaky:
    """A tracker whose second log call fails."""

    calls: list = []

    def __init__(self, project, name, run_dir, config, run_id=None):
        Flaky.calls.append(("start", project, name))

    def log(self, metrics, step):
        Flaky.calls.append(("log", step))
        if step == 2:
            raise ConnectionError("hub went away")

    def table(self, columns, rows, step):
        Flaky.calls.append(("table", step))

    def finish(self, ok):
        Flaky.calls.append(("finish", ok))


def test_a_failing_tracker_is_reported_once_and_dropped(monkeypatch, tmp_path):
    monkeypatch.setitem(tracking.WRITERS, "wandb", Flaky)
    monkeypatch.setattr(tracking, "check_installed", lambda names: None)
    Flaky.calls = []
    cfg = build_config({"report_to": ["wandb"]})
    bus = events.EventBus()
    seen = []
    bus.subscribe(seen.append)
    tracking.attach(bus, cfg, tmp_path / "my-run")
    bus.emit(events.Start(run_dir=str(tmp_path), config=to_dict(cfg), total_steps=3, start_step=0))
    for step in (1, 2, 3):
        bus.emit(events.Step(step=step, metrics={"reward": 1.0}))
    bus.emit(events.End(step=3, summary={}, status="finished"))
    assert Flaky.calls == [("start", "grpo-mlx", "my-run"), ("log", 1), ("log", 2), ("finish", False)]
    warnings = [e["text"] for e in seen if e["type"] == "message"]
    assert len(warnings) == 1 and "ConnectionError: hub went away" in warnings[0] and "training goes on" in warnings[0]


class Remembers:
    """A tracker that records the run id it was asked to continue and hands out its own."""

    seen: list = []

    def __init__(self, project, name, run_dir, config, run_id=None):
        Remembers.seen.append(run_id)
        self.run_id = run_id or f"id-{len(Remembers.seen)}"

    def log(self, metrics, step):
        pass

    def finish(self, ok):
        pass


def test_a_resumed_run_continues_its_tracker_run_and_a_new_one_does_not(monkeypatch, tmp_path):
    monkeypatch.setitem(tracking.WRITERS, "wandb", Remembers)
    monkeypatch.setattr(tracking, "check_installed", lambda names: None)
    Remembers.seen = []
    cfg = build_config({"report_to": ["wandb"]})

    def start(first):
        bus = events.EventBus()
        tracking.attach(bus, cfg, tmp_path)
        bus.emit(events.Start(run_dir=str(tmp_path), config=to_dict(cfg), total_steps=4, start_step=first))
        bus.emit(events.End(step=first + 2, summary={}, status="finished"))

    start(0)  # a new run: no id asked for; its id is kept
    assert json.loads((tmp_path / tracking.IDS_FILE).read_text()) == {"wandb": "id-1"}
    start(2)  # --resume: continues id-1
    start(0)  # --overwrite starts over: a new tracker run
    assert Remembers.seen == [None, "id-1", None]
    (tmp_path / tracking.IDS_FILE).write_text("{not json")  # a file a crash cut short: a new run, no error
    start(2)
    assert Remembers.seen[-1] is None


# ------------------------------------------------------------------ each tracker, read back


def tensorboard_events(folder):
    """Every (tag, step, value or text) in the TFRecord event files tensorboardX wrote."""
    from tensorboardX.proto import event_pb2

    out = []
    for path in glob.glob(str(folder / "events.out.tfevents.*")):
        raw = Path(path).read_bytes()
        pos = 0
        while pos < len(raw):  # record: length u64, crc u32, data, crc u32
            (n,) = struct.unpack("<Q", raw[pos : pos + 8])
            event = event_pb2.Event.FromString(raw[pos + 12 : pos + 12 + n])
            pos += 16 + n
            for v in event.summary.value:
                text = v.tensor.string_val[0].decode() if v.tensor.string_val else None
                out.append((v.tag, event.step, text if text is not None else round(v.simple_value, 4)))
    return out


def test_tensorboard_event_files(tmp_path):
    pytest.importorskip("tensorboardX", reason="pip install 'grpo-mlx[tensorboard]'")
    found = tensorboard_events(drive("tensorboard", tmp_path) / "tensorboard")
    assert ("train/reward", 1, 0.5) in found and ("train/reward", 2, 1.0) in found
    assert ("eval/accuracy", 0, 0.25) in found and ("eval/accuracy", 2, 0.75) in found
    tables = [v for tag, step, v in found if tag.startswith("completions")]
    assert tables and "| step | prompt | completion | accuracy | format | reward | advantage |" in tables[0]
    assert "so 4\\|5" in tables[0]  # a pipe in a completion does not break the table


def wandb_history(run_dir):
    """The history rows of an offline wandb run, from its .wandb file (a LevelDB-style log)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    raw, pos, buf, rows = Path(path).read_bytes(), 7, b"", []
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _crc, n, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        buf, pos = buf + raw[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record.FromString(buf)
            buf = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
            elif record.WhichOneof("record_type") == "run":
                rows.append({"run": (record.run.project, record.run.display_name)})
    return rows, path


def test_wandb_offline_run(tmp_path):
    pytest.importorskip("wandb", reason="pip install 'grpo-mlx[wandb]'")
    rows, path = wandb_history(drive("wandb", tmp_path))
    assert {"run": ("proj", "run-a")} in rows
    history = [r for r in rows if "_step" in r]
    by_step = {r["_step"]: r for r in history}
    assert by_step[0]["eval/accuracy"] == 0.25 and by_step[1]["train/reward"] == 0.5
    assert by_step[2]["train/reward"] == 1.0 and by_step[2]["eval/accuracy"] == 0.75
    table_file = os.path.join(os.path.dirname(path), "files", by_step[1]["completions/path"])
    table = json.loads(Path(table_file).read_text())
    assert table["columns"] == ["step", "prompt", "completion", "accuracy", "format", "reward", "advantage"]
    assert table["data"] == [[1, "<user>2+2?", "so 4|5", 1.0, 0.5, 1.5, 0.7]]


def test_wandb_resumed_run_keeps_its_run_id(tmp_path):
    pytest.importorskip("wandb", reason="pip install 'grpo-mlx[wandb]'")
    drive("wandb", tmp_path)
    drive("wandb", tmp_path, first=2)
    run_id = json.loads((tmp_path / "run" / tracking.IDS_FILE).read_text())["wandb"]
    runs = sorted(glob.glob(str(tmp_path / "run" / "wandb" / "offline-run-*")))
    assert len(runs) == 2 and all(r.endswith("-" + run_id) for r in runs)  # online, wandb joins them as one run


def test_trackio_resumed_run_is_one_run(tmp_path):
    pytest.importorskip("trackio", reason="pip install 'grpo-mlx[trackio]'")
    store = str(tmp_path / "store")
    drive("trackio", tmp_path, TRACKIO_DIR=store)
    drive("trackio", tmp_path, first=2, TRACKIO_DIR=store)
    db = sqlite3.connect(tmp_path / "store" / "proj.db")
    names = {name for (name,) in db.execute("select distinct run_name from metrics")}
    steps = sorted({step for (step,) in db.execute("select step from metrics where run_name='run-a'")})
    assert names == {"run-a"} and steps == [0, 1, 2, 3, 4]


def test_trackio_local_store(tmp_path):
    pytest.importorskip("trackio", reason="pip install 'grpo-mlx[trackio]'")
    drive("trackio", tmp_path, TRACKIO_DIR=str(tmp_path / "store"))
    db = sqlite3.connect(tmp_path / "store" / "proj.db")
    merged = {}
    for step, metrics in db.execute("select step, metrics from metrics where run_name='run-a'"):
        merged.setdefault(step, {}).update(json.loads(metrics))
    assert merged[0]["eval/accuracy"] == 0.25 and merged[2]["train/reward"] == 1.0
    table = merged[1]["completions"]
    assert table["_type"] == "trackio.table" and "so 4|5" in json.dumps(table)


def test_swanlab_local_mode(tmp_path):
    pytest.importorskip("swanlab", reason="pip install 'grpo-mlx[swanlab]'")
    run_dir = drive("swanlab", tmp_path)
    series = []
    for folder in glob.glob(str(run_dir / "swanlog" / "run-*" / "logs" / "*")):
        lines = [json.loads(line) for f in glob.glob(folder + "/*.log") for line in Path(f).read_text().splitlines()]
        series.append([line["data"] for line in sorted(lines, key=lambda x: x["index"])])
    assert [0.25, 0.75] in series and [0.5, 1.0] in series  # eval/accuracy and train/reward
    texts = [s for s in series if s and isinstance(s[0], list)]
    assert texts and "| step | prompt | completion |" in texts[0][0][0]


def test_a_training_run_reports_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboardX", reason="pip install 'grpo-mlx[tensorboard]'")
    from grpo_mlx.trainer import Trainer

    cfg = build_config(
        dict(
            adapter_path=str(tmp_path / "run"),
            batch_size=2,
            group_size=2,
            iters=2,
            eval_limit=4,
            report_to=["tensorboard"],
        )
    )
    Trainer(cfg).run()
    found = tensorboard_events(tmp_path / "run" / "tensorboard")
    assert {step for tag, step, _ in found if tag == "train/reward"} == {1, 2}
    assert {step for tag, step, _ in found if tag == "eval/accuracy"} == {0, 2}  # before and after
    assert any(tag.startswith("completions") for tag, _, _ in found)
