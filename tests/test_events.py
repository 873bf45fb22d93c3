"""The event contract: typed events round-trip through their JSON form, a line that is not an
event is refused by name, and every metric the TUI charts is one the trainer really writes."""

import errno
import json
import subprocess

import pytest

from grpo_mlx import events
from grpo_mlx import metric_names as M
from grpo_mlx.events import EventBus, EventFormatError, JsonlSink, RunFilesError, read_jsonl


def test_every_event_type_round_trips_through_json():
    cases = [
        events.Start(run_dir="r", config={"beta": 0.0}, total_steps=3, start_step=0, blas="OpenBLAS", model="m"),
        events.Eval(step=0, name="before", metrics={"n": 2, "accuracy": 0.5}),
        events.Step(step=1, metrics={M.REWARD: 0.25}),
        events.Samples(step=1, groups=[{"prompt": "p", "completions": []}]),
        events.Message(level="info", text="hello"),
        events.Checkpoint(step=1, path="r/checkpoints/1"),
        events.End(step=1, summary={"status": "finished"}, status="finished"),
    ]
    for event in cases:
        as_json = json.loads(json.dumps(event.to_json()))
        assert as_json["type"] == event.type
        assert events.from_json(as_json) == event


@pytest.mark.parametrize(
    "line, problem",
    [
        ([1, 2], "a JSON object, not list"),
        (7, "a JSON object, not int"),
        ({"type": "nonsense"}, "unknown event type 'nonsense'"),
        ({"type": "step", "metrics": {}}, "step event without 'step'"),
        ({"type": "step", "step": "3", "metrics": {}}, "'step' is str"),
        ({"type": "step", "step": True, "metrics": {}}, "'step' is bool"),
        ({"type": "samples", "step": 1, "groups": {"a": 1}}, "'groups' is dict"),
        ({"type": "message", "level": "info", "text": 5}, "'text' is int"),
    ],
)
def test_malformed_lines_are_refused_by_name(line, problem):
    with pytest.raises(EventFormatError, match=problem):
        events.from_json(line)


def test_the_bus_delivers_what_the_files_hold(tmp_path):
    """A live subscriber and a reader of the run directory see the same dicts."""
    bus, seen = EventBus(), []
    bus.subscribe(seen.append)
    sink = bus.subscribe(JsonlSink(str(tmp_path)))
    bus.emit(events.Step(step=1, metrics={M.REWARD: 0.5, M.LOSS: float("nan")}))
    bus.emit(events.Samples(step=1, groups=[]))
    sink.close()
    assert seen[0] == {"type": "step", "step": 1, "metrics": {M.REWARD: 0.5, M.LOSS: seen[0]["metrics"][M.LOSS]}}
    back = read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert back[0]["metrics"] == {M.REWARD: 0.5, M.LOSS: None}  # NaN is written as null
    assert read_jsonl(str(tmp_path / "samples.jsonl")) == [{"type": "samples", "step": 1, "groups": []}]


def test_every_charted_metric_is_written_by_a_real_step(tmp_path):
    """A renamed metric must fail here, not leave an empty chart: one real step of the demo with
    beta > 0 writes every metric the dashboard charts (entropy too, from the sampler)."""
    from grpo_mlx.config import build_config
    from grpo_mlx.trainer import Trainer
    from tui.widgets import CHARTS

    cfg = build_config(
        {
            "adapter_path": str(tmp_path / "run"),
            "iters": 1,
            "batch_size": 2,
            "group_size": 2,
            "eval_limit": 0,
            "beta": 0.04,
            "max_completion_length": 6,
        }
    )
    trainer = Trainer(cfg)
    trainer.setup()
    metrics = trainer.train_step(0)
    for name, _, _ in CHARTS:
        assert name in metrics, f"the dashboard charts {name!r} but the trainer does not write it"
    assert M.reward_mean("accuracy") in metrics and M.time_of("update") in metrics


# ------------------------------------------------------------------ a full or read-only disk


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    yield disk
    subprocess.run(["umount", str(disk)])


def test_full_disk_keeps_whole_lines_and_asks_to_stop(small_disk):
    stops = []
    bus = EventBus()
    sink = bus.subscribe(JsonlSink(str(small_disk), on_error=lambda: stops.append(1)))
    for step in range(1000):  # far more than 16 KiB
        bus.emit(events.Step(step=step, metrics={"reward": 0.5, "text": "x" * 100}))
    assert stops == [1]  # told once
    assert isinstance(sink.error, RunFilesError) and "No space left" in str(sink.error)
    lines = (small_disk / "metrics.jsonl").read_bytes().split(b"\n")
    assert lines[-1] == b"" and all(json.loads(line) for line in lines[:-1])  # no half line
    with pytest.raises(RunFilesError, match="metrics.jsonl"):
        sink.raise_if_failed()


def test_without_on_error_the_first_failure_raises_and_later_events_are_dropped(tmp_path, monkeypatch):
    sink = JsonlSink(str(tmp_path))

    def full(data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sink.metrics, "write", full, raising=False)
    with pytest.raises(RunFilesError):
        sink({"type": "step", "step": 1, "metrics": {}})
    sink({"type": "end", "step": 1, "summary": {}, "status": "failed"})  # no second error


def test_unwritable_run_directory_is_one_sentence(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=16k", "tmpfs", str(ro)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        with pytest.raises(RunFilesError, match="Read-only file system"):
            JsonlSink(str(ro))
    finally:
        subprocess.run(["umount", str(ro)])
