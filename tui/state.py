"""What the dashboard knows about a run, built only from the trainer's event dicts.

A live run (events from the trainer's bus) and an attached one (events read back from
metrics.jsonl / samples.jsonl) go through the same `RunState.apply`, so every widget serves
both. No Textual and no MLX here: this is bookkeeping, unit-tested on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from grpo_mlx import metric_names as M
from grpo_mlx.events import Event

# Keep the samples of this many recent steps (each holds full completion texts).
MAX_SAMPLE_STEPS = 2000

MAX_LOG_LINES = 1000

# Seconds per step are averaged over this many recent steps for the ETA, as the CLI does.
ETA_WINDOW = 20

ENDED = ("finished", "stopped", "failed", "interrupted")


def number(value: Any) -> float:
    """A logged metric as a float. JSON has no NaN, so the run files write NaN and inf as null:
    null, NaN and inf all read as NaN here. (A metric a step did not log at all is None.)"""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    value = float(value)
    return value if math.isfinite(value) else math.nan


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class RunState:
    # ready: not started | loading: model and data | running | pausing | paused | stopping
    # | finished | stopped | failed | interrupted (the last four come from the `end` event)
    status: str = "ready"
    run_dir: str | None = None
    model: str | None = None
    blas: str | None = None
    config: dict = field(default_factory=dict)
    total_steps: int = 0
    start_step: int = 0
    steps: list[int] = field(default_factory=list)
    # aligned with `steps`: NaN where a step logged NaN/null, None where it logged nothing
    series: dict[str, list[float | None]] = field(default_factory=dict)
    samples: dict[int, list[dict]] = field(default_factory=dict)  # shown step -> groups
    evals: list[dict] = field(default_factory=list)
    checkpoints: list[dict] = field(default_factory=list)
    log: list[tuple[str, str]] = field(default_factory=list)  # (level, line) for the log tab
    log_total: int = 0  # lines ever logged (the list keeps the last MAX_LOG_LINES)
    end: dict | None = None
    skipped_events: int = 0  # malformed events skipped (see `malformed`)

    # ------------------------------------------------------------------ events
    def apply(self, event: Event) -> None:
        problem = malformed(event)
        if problem:  # a line that parses but is not what the trainer writes: skip, say so once
            self.skipped_events += 1
            if self.skipped_events == 1:
                self.log.append(
                    ("warning", f"skipped an event that does not fit ({problem}); later ones are skipped silently")
                )
                del self.log[:-MAX_LOG_LINES]
                self.log_total += 1
            return
        kind = event.get("type")
        line = describe(event)
        if line:
            level = event.get("level") or ("error" if event.get("status") == "failed" else "info")
            self.log.append((level, line))
            del self.log[:-MAX_LOG_LINES]
            self.log_total += 1
        if kind == "start":
            self.status = "running" if self.status not in ("pausing", "paused", "stopping") else self.status
            self.run_dir = event.get("run_dir")
            self.model = event.get("model")
            self.blas = event.get("blas")
            self.config = event.get("config") or {}
            self.total_steps = int(event.get("total_steps") or 0)
            self.start_step = int(event.get("start_step") or 0)
            self.end = None
        elif kind == "step":
            self._add_step(int(event["step"]), event.get("metrics") or {})
            if self.status == "pausing":
                self.status = "paused"  # the trainer waits before its next step
        elif kind == "samples":
            step = int(event["step"])  # the (1-based) number of the step event it belongs to
            self.samples[step] = event.get("groups") or []
            while len(self.samples) > MAX_SAMPLE_STEPS:
                del self.samples[min(self.samples)]
        elif kind == "eval":
            self.evals.append(event)
        elif kind == "checkpoint":
            self.checkpoints.append(event)
        elif kind == "end":
            self.end = event
            self.status = event.get("status") or "finished"

    def _add_step(self, step: int, metrics: dict) -> None:
        if self.steps and step <= self.steps[-1]:
            # a resumed run repeats steps after its last checkpoint: the new ones win
            keep = next(i for i, s in enumerate(self.steps) if s >= step)
            del self.steps[keep:]
            for values in self.series.values():
                del values[keep:]
        n = len(self.steps)
        self.steps.append(step)
        for name, value in metrics.items():
            if name not in self.series:
                self.series[name] = [None] * n  # a metric that appears late: no value before
            self.series[name].append(number(value))
        for values in self.series.values():
            if len(values) == n:
                values.append(None)  # a metric missing at this step (e.g. a skipped step)

    # ------------------------------------------------------------------ queries
    @property
    def step(self) -> int:
        return self.steps[-1] if self.steps else self.start_step

    @property
    def active(self) -> bool:
        return self.status in ("loading", "running", "pausing", "paused", "stopping")

    def values(self, name: str) -> list[float | None]:
        return self.series.get(name, [])

    def latest(self, name: str) -> float | None:
        for value in reversed(self.values(name)):
            if finite(value):
                return value
        return None

    def reward_functions(self) -> list[str]:
        """Names of the reward functions, from the `rewards/<fn>/mean` metrics."""
        return [fn for fn in map(M.reward_function_of, self.series) if fn]

    def seconds_per_step(self) -> float | None:
        recent = [t for t in self.values(M.STEP_TIME)[-ETA_WINDOW:] if finite(t)]
        return sum(recent) / len(recent) if recent else None

    def eta_seconds(self) -> float | None:
        per_step = self.seconds_per_step()
        if per_step is None or not self.total_steps:
            return None
        return per_step * max(self.total_steps - self.step, 0)

    def sample_steps(self) -> list[int]:
        return sorted(self.samples)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) or (isinstance(value, float) and value.is_integer())


def _optional(value: Any, kind) -> bool:
    return value is None or isinstance(value, kind)


def _number_or_none(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def malformed(event: Any) -> str | None:
    """Why an event cannot be shown (its fields have the wrong types), or None if it can. Only
    what the dashboard reads is checked; extra fields are fine."""
    if not isinstance(event, dict):
        return f"a {type(event).__name__}, not an object"
    kind = event.get("type")
    if not isinstance(kind, str):
        return "no type"
    need = {
        "start": [("config", dict), ("total_steps", "int?"), ("start_step", "int?"), ("run_dir", "str?")],
        "step": [("step", "int"), ("metrics", dict)],
        "samples": [("step", "int"), ("groups", list)],
        "eval": [("metrics", dict)],
        "checkpoint": [],
        "message": [("level", "str?")],
        "end": [("summary", "dict?"), ("status", "str?")],
    }.get(kind, [])
    for key, kind_of in need:
        value = event.get(key)
        ok = (
            {
                "int": _is_int(value),
                "int?": value is None or _is_int(value),
                "str?": _optional(value, str),
                "dict?": _optional(value, dict),
            }.get(kind_of)
            if isinstance(kind_of, str)
            else isinstance(value, kind_of)
        )
        if not ok:
            return f"{kind} event: '{key}' is {value!r:.40}"
    if kind == "eval" and not all(_number_or_none(event["metrics"].get(k)) for k in ("accuracy", "mean_reward")):
        return "eval event: a metric is not a number"
    if kind == "samples":
        for group in event["groups"]:
            if not isinstance(group, dict) or not isinstance(group.get("completions", []), list):
                return "samples event: a group is not an object with a list of completions"
            for c in group.get("completions", []):
                if not (
                    isinstance(c, dict)
                    and _number_or_none(c.get("advantage"))
                    and _number_or_none(c.get("reward"))
                    and _optional(c.get("text"), str)
                    and _optional(c.get("rewards"), dict)
                    and _optional(c.get("turns"), list)
                    and all(isinstance(t, dict) for t in c.get("turns") or [])
                ):
                    return "samples event: a completion has fields of the wrong type"
    return None


def describe(event: Event) -> str | None:
    """One log line for the events worth a line (not steps or samples)."""
    kind = event.get("type")
    if kind == "start":
        cfg = event.get("config") or {}
        resumed = f", resuming at step {event['start_step']}" if event.get("start_step") else ""
        return (
            f"run directory {event.get('run_dir')}{resumed}\n  model {event.get('model')}  |  "
            f"B={cfg.get('batch_size')} G={cfg.get('group_size')} loss={cfg.get('loss_type')} "
            f"beta={cfg.get('beta')}  |  BLAS: {event.get('blas')}"
        )
    if kind == "message":
        return f"{event.get('level', 'info')}: {event.get('text')}"
    if kind == "eval":
        m = event.get("metrics") or {}
        acc = f"accuracy {m['accuracy']:.1%}, " if finite(m.get("accuracy")) else ""
        mean = f"mean reward {m['mean_reward']:.3f}" if finite(m.get("mean_reward")) else ""
        calls = f", calls a tool {m['tool_use']:.1%}" if finite(m.get("tool_use")) else ""  # runs with tools
        return f"held-out ({event.get('name')}, {m.get('n')} prompts, greedy): {acc}{mean}{calls}"
    if kind == "checkpoint":
        return f"checkpoint saved at step {event.get('step')}: {event.get('path')}"
    if kind == "end":
        s = event.get("summary") or {}
        line = f"{event.get('status')} after {event.get('step')} steps"
        if finite(s.get("accuracy_before")) and finite(s.get("accuracy_after")):
            line += f"; held-out accuracy {s['accuracy_before']:.1%} -> {s['accuracy_after']:.1%}"
        if finite(s.get("tool_use_before")) and finite(s.get("tool_use_after")):
            line += f", calling a tool {s['tool_use_before']:.1%} -> {s['tool_use_after']:.1%}"
        return line
    return None
