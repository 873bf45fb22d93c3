"""Experiment trackers (`--report-to wandb,trackio,tensorboard,swanlab`) as one more event sink.

The sink receives the events metrics.jsonl holds and passes them on in the names a TRL run
shows: step metrics as `train/<name>` (the names are TRL's already), held-out evaluations as
`eval/<name>`, and each step's sampled completions as a `completions` table (step, prompt,
completion, one column per reward function, reward, advantage) where the tracker has tables
(wandb, trackio), a markdown table as text where it has none (TensorBoard, SwanLab).

Choices, stated once:
- A missing package is named (with its pip command) when the sink is made, before the model
  loads; the tracker itself starts on the run's `start` event, when the config is known.
- A tracker that fails (no login, no network, a full disk) is reported once, as a warning
  message on the bus, and dropped: training goes on, the run directory is still the record.
- Only rank 0 reports: the metrics are already global, and one run per tracker is wanted.
- TensorBoard writes with tensorboardX (numpy and protobuf only; no torch or TensorFlow).
- A resumed run (`--resume`) continues the tracker run it started: wandb by the run id kept in
  <run dir>/trackers.json, trackio by the run name, TensorBoard by appending to the same event
  folder. SwanLab resumes by id only in its cloud mode, so a resumed SwanLab run is a new run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any

from grpo_mlx import events
from grpo_mlx.config import TRACKERS, TrainConfig
from grpo_mlx.errors import UserError

# tracker -> (the module it needs, the pyproject extra that installs it)
PACKAGES = {"wandb": "wandb", "trackio": "trackio", "tensorboard": "tensorboardX", "swanlab": "swanlab"}
DEFAULT_PROJECT = "grpo-mlx"
TABLE = "completions"  # TRL's name for the table of sampled completions
IDS_FILE = "trackers.json"  # tracker -> run id, so that a resumed run continues its tracker runs


class TrackerMissing(UserError, ImportError):
    """A tracker named in --report-to whose package is not installed."""


def check_installed(names: list[str]) -> None:
    """Refuse trackers whose package is missing, in one sentence with the pip command."""
    missing = [n for n in names if importlib.util.find_spec(PACKAGES[n]) is None]
    if missing:
        packages = ", ".join(PACKAGES[n] for n in missing)
        raise TrackerMissing(
            f"--report-to {','.join(missing)} needs {packages}, which is not installed: "
            f'pip install "grpo-mlx[{",".join(missing)}]"'
        )


def attach(bus: events.EventBus, cfg: TrainConfig, run_dir: str | os.PathLike, rank: int = 0) -> TrackerSink | None:
    """Subscribe a sink for `cfg.report_to` to `bus` (rank 0 only); None when there is nothing to report."""
    if rank != 0 or not cfg.report_to:
        return None
    check_installed(cfg.report_to)
    sink = TrackerSink(cfg, run_dir, bus)
    bus.subscribe(sink)
    return sink


class TrackerSink:
    """Fans the run's events out to the configured trackers, dropping any that fails."""

    def __init__(self, cfg: TrainConfig, run_dir: str | os.PathLike, bus: events.EventBus | None = None):
        self.names = [n for n in cfg.report_to if n in TRACKERS]
        self.run_dir = Path(run_dir)
        self.project = cfg.project_name or DEFAULT_PROJECT
        self.run_name = cfg.run_name or self.run_dir.name
        self.bus = bus
        self.trackers: dict[str, Any] = {}
        self.failures: dict[str, str] = {}  # tracker -> the one message it was dropped with

    def __call__(self, event: events.Event) -> None:
        kind = event["type"]
        if kind == "start":
            for name in self.names:
                self._guard(name, lambda name=name: self._start(name, event))
            return
        if kind == "step":
            call = ("log", train_metrics(event["metrics"]), event["step"])
        elif kind == "eval":
            call = ("log", eval_metrics(event["metrics"]), event["step"])
        elif kind == "samples":
            columns, rows = completions_table(event["groups"], event["step"])
            if not rows:
                return
            call = ("table", columns, rows, event["step"])
        elif kind == "end":
            call = ("finish", event["status"] == "finished")
        else:
            return
        for name, tracker in list(self.trackers.items()):
            self._guard(name, lambda tracker=tracker: getattr(tracker, call[0])(*call[1:]))
        if kind == "end":
            self.trackers.clear()

    def _start(self, name: str, event: events.Event) -> None:
        ids = self._ids()
        resumed = event.get("start_step", 0) > 0
        run_id = ids.get(name) if resumed else None
        writer = WRITERS[name](self.project, self.run_name, self.run_dir, event["config"], run_id=run_id)
        self.trackers[name] = writer
        new_id = getattr(writer, "run_id", None)
        if new_id and ids.get(name) != new_id:
            ids[name] = new_id
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / IDS_FILE).write_text(json.dumps(ids, indent=1) + "\n")

    def _ids(self) -> dict[str, str]:
        try:
            ids = json.loads((self.run_dir / IDS_FILE).read_text())
        except (OSError, ValueError):  # no file yet, or one a crash cut short: start new tracker runs
            return {}
        return ids if isinstance(ids, dict) else {}

    def _guard(self, name: str, fn) -> None:
        try:
            fn()
        except Exception as e:  # a tracker is never worth a training run
            tracker = self.trackers.pop(name, None)
            if tracker is not None:
                with contextlib.suppress(Exception):
                    tracker.finish(False)
            text = f"--report-to {name}: {type(e).__name__}: {e}; reporting to {name} stopped, training goes on"
            self.failures[name] = text
            if self.bus is not None:
                self.bus.emit(events.Message(level="warning", text=text))


# ------------------------------------------------------------------ what each tracker gets


def _numbers(metrics: dict, prefix: str) -> dict[str, float]:
    return {
        prefix + k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def train_metrics(metrics: dict) -> dict[str, float]:
    """Step metrics under TRL's `train/` prefix (transformers' integrations add it)."""
    return _numbers(metrics, "train/")


def eval_metrics(metrics: dict) -> dict[str, float]:
    return _numbers(metrics, "eval/")


def completions_table(groups: list[dict], step: int) -> tuple[list[str], list[list]]:
    """TRL's completions table: one row per completion, one column per reward function."""
    functions = list(dict.fromkeys(f for g in groups for c in g.get("completions", []) for f in c.get("rewards", {})))
    columns = ["step", "prompt", "completion", *functions, "reward", "advantage"]
    rows = []
    for group in groups:
        prompt = group.get("prompt_text") or str(group.get("prompt", ""))
        for c in group.get("completions", []):
            rewards = c.get("rewards", {})
            scores = [rewards.get(f) for f in functions]
            rows.append([step, prompt, c.get("text", ""), *scores, c.get("reward"), c.get("advantage")])
    return columns, rows


def markdown_table(columns: list[str], rows: list[list]) -> str:
    """For trackers without tables; cells on one line each, pipes escaped."""

    def cell(v) -> str:
        text = f"{v:.4g}" if isinstance(v, float) else str(v)
        return text.replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------ the writers


class Wandb:
    def __init__(self, project, name, run_dir, config, run_id=None):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=project,
            name=name,
            dir=str(run_dir),
            config=config,
            reinit="create_new",
            id=run_id,
            resume="allow" if run_id else None,
        )
        self.run_id = self.run.id

    def log(self, metrics, step):
        self.run.log(metrics, step=step)

    def table(self, columns, rows, step):
        self.run.log({TABLE: self.wandb.Table(columns=columns, data=rows)}, step=step)

    def finish(self, ok):
        self.run.finish(exit_code=0 if ok else 1)


class Trackio:
    def __init__(self, project, name, run_dir, config, run_id=None):
        import trackio

        self.trackio = trackio
        # trackio keys runs by name within a project: the resumed run's name is its id
        trackio.init(project=project, name=name, config=config, resume="allow" if run_id else "never")
        self.run_id = name

    def log(self, metrics, step):
        self.trackio.log(metrics, step=step)

    def table(self, columns, rows, step):
        self.trackio.log({TABLE: self.trackio.Table(columns=columns, data=rows)}, step=step)

    def finish(self, ok):
        self.trackio.finish()


class TensorBoard:
    """Event files in <run dir>/tensorboard: `tensorboard --logdir runs` shows every run."""

    def __init__(self, project, name, run_dir, config, run_id=None):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logdir=str(Path(run_dir) / "tensorboard"))
        self.writer.add_text("config", markdown_table(["option", "value"], [[k, v] for k, v in config.items()]), 0)

    def log(self, metrics, step):
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def table(self, columns, rows, step):
        self.writer.add_text(TABLE, markdown_table(columns, rows), step)

    def finish(self, ok):
        self.writer.close()


class SwanLab:
    """SWANLAB_MODE decides where it writes (cloud by default; local/offline keep it on this machine)."""

    def __init__(self, project, name, run_dir, config, run_id=None):
        import swanlab

        self.swanlab = swanlab
        self.run = swanlab.init(
            project=project, name=name, config=config, log_dir=str(Path(run_dir) / "swanlog"), reinit=True
        )

    def log(self, metrics, step):
        self.run.log(metrics, step=step)

    def table(self, columns, rows, step):
        self.run.log({TABLE: self.swanlab.Text(markdown_table(columns, rows))}, step=step)

    def finish(self, ok):
        self.run.finish(state="success" if ok else "crashed")


WRITERS = {"wandb": Wandb, "trackio": Trackio, "tensorboard": TensorBoard, "swanlab": SwanLab}
