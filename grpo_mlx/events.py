"""The trainer's one event channel, and the JSONL sink that writes a run directory.

The trainer emits plain dicts with a `type` key; sinks subscribe. The same stream feeds the
headless progress bar, metrics.jsonl / samples.jsonl and the TUI, so a TUI can follow a live run
in-process or attach to the files a headless run writes. No MLX import here.

Event types (all dicts are JSON-serialisable):
  start    {run_dir, config, total_steps, start_step, blas, model}
  eval     {step, name, metrics}                 before/after or periodic held-out evaluation
  step     {step, metrics}                       one training step; TRL metric names
  samples  {step, groups: [{prompt, answer, completions: [{text, rewards, reward, advantage,
                                                            length, finish_reason}]}]}
  message  {level, text}                         info / warning / error lines
  checkpoint {step, path}
  end      {step, summary, status}               status: finished | stopped | failed
"""

from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

Event = dict[str, Any]


@dataclass
class Control:
    """Between-step controls of a run, set from another thread (the TUI, a signal handler).
    Here, not in the trainer, so a UI can hold one before MLX is imported."""

    stop: threading.Event = field(default_factory=threading.Event)
    pause: threading.Event = field(default_factory=threading.Event)
    save_now: threading.Event = field(default_factory=threading.Event)


class EventBus:
    """Fan-out of events to subscribers; a failing sink never breaks training."""

    def __init__(self):
        self._subscribers: list[Callable[[Event], None]] = []
        self._lock = threading.Lock()

    def subscribe(self, fn: Callable[[Event], None]) -> Callable[[Event], None]:
        with self._lock:
            self._subscribers.append(fn)
        return fn

    def emit(self, type: str, **payload: Any) -> Event:
        event = {"type": type, **payload}
        with self._lock:
            subscribers = list(self._subscribers)
        for fn in subscribers:
            fn(event)
        return event


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null so every line stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class JsonlSink:
    """Appends step metrics to metrics.jsonl and generations to samples.jsonl, flushed per line
    so that `grpo-mlx tui --attach` sees each step as soon as it is written."""

    def __init__(self, run_dir: str):
        os.makedirs(run_dir, exist_ok=True)
        self.metrics = open(os.path.join(run_dir, "metrics.jsonl"), "a", encoding="utf-8")
        self.samples = open(os.path.join(run_dir, "samples.jsonl"), "a", encoding="utf-8")

    def __call__(self, event: Event) -> None:
        kind = event["type"]
        if kind == "samples":
            out = self.samples
        elif kind in ("step", "eval", "start", "end", "checkpoint", "message"):
            out = self.metrics
        else:
            return
        out.write(json.dumps(_clean(event), ensure_ascii=False) + "\n")
        out.flush()

    def close(self) -> None:
        self.metrics.close()
        self.samples.close()


def read_jsonl(path: str) -> list[Event]:
    """Read a run file written by JsonlSink, skipping a last line still being written."""
    events = []
    if not os.path.exists(path):
        return events
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break  # a writer is mid-line; the next read picks it up whole
            line = line.strip()
            if line:
                events.append(json.loads(line))
    return events
