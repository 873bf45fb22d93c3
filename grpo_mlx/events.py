"""The trainer's one event channel: typed events, the bus that fans them out, and the JSONL sink
that writes a run directory. No MLX import here.

The trainer emits the dataclasses below; subscribers receive each event's JSON form
(`event.to_json()`, a dict with a `type` key), exactly what metrics.jsonl / samples.jsonl hold, so
the headless progress bar, the files and the TUI see one format whether a run is live in-process
or read back from disk (`grpo-mlx tui --attach`). `from_json` turns a line read back into the
event again and refuses one that is not what it claims to be.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from grpo_mlx.errors import UserError

Event = dict[str, Any]  # an event's JSON form, as subscribers and the files see it


class EventFormatError(ValueError):
    """A JSON object that is not a well-formed event (wrong type, missing or mistyped field)."""


_KINDS = {"int": (int,), "float": (int, float), "str": (str,), "dict": (dict,), "list": (list,)}


class _Event:
    type: ClassVar[str]

    def to_json(self) -> Event:
        return {"type": self.type, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}

    @staticmethod
    def from_json(obj: Any) -> _Event:
        """The event that `obj` (a parsed JSON line) describes; EventFormatError if it is none."""
        if not isinstance(obj, dict):
            raise EventFormatError(f"an event is a JSON object, not {type(obj).__name__}")
        cls = EVENT_TYPES.get(obj.get("type"))
        if cls is None:
            raise EventFormatError(f"unknown event type {obj.get('type')!r}")
        values = {}
        for f in dataclasses.fields(cls):
            if f.name not in obj:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise EventFormatError(f"{cls.type} event without '{f.name}'")
                continue
            value, kinds = obj[f.name], _KINDS.get(str(f.type).split(" |")[0])
            optional = "None" in str(f.type)
            if (
                kinds
                and not (value is None and optional)
                and (not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds)
            ):
                raise EventFormatError(f"{cls.type} event: '{f.name}' is {type(value).__name__}, expected {f.type}")
            values[f.name] = value
        return cls(**values)


@dataclass
class Start(_Event):
    type: ClassVar[str] = "start"
    run_dir: str
    config: dict
    total_steps: int
    start_step: int
    blas: str | None = None
    model: str | None = None
    train_examples: int = 0
    eval_examples: int = 0


@dataclass
class Eval(_Event):
    """A held-out evaluation: name "before", "after" or "periodic"."""

    type: ClassVar[str] = "eval"
    step: int
    name: str
    metrics: dict


@dataclass
class Step(_Event):
    """One training step; metric names are grpo_mlx.metric_names."""

    type: ClassVar[str] = "step"
    step: int
    metrics: dict


@dataclass
class Samples(_Event):
    """Completions of a step, numbered like its step event: groups of
    {prompt, prompt_text, answer, completions: [{text, rewards, reward, advantage, length, finish_reason}]};
    an episode's completion also has `turns` (grpo_mlx.episodes.turn_entry)."""

    type: ClassVar[str] = "samples"
    step: int
    groups: list


@dataclass
class Message(_Event):
    type: ClassVar[str] = "message"
    level: str  # info | warning | error
    text: str


@dataclass
class Checkpoint(_Event):
    type: ClassVar[str] = "checkpoint"
    step: int
    path: str


@dataclass
class End(_Event):
    type: ClassVar[str] = "end"
    step: int
    summary: dict
    status: str  # finished | stopped | failed


EVENT_TYPES: dict[str, type[_Event]] = {cls.type: cls for cls in (Start, Eval, Step, Samples, Message, Checkpoint, End)}
from_json = _Event.from_json


@dataclass
class Control:
    """Between-step controls of a run, set from another thread (the TUI, a signal handler).
    Here, not in the trainer, so a UI can hold one before MLX is imported."""

    stop: threading.Event = field(default_factory=threading.Event)
    pause: threading.Event = field(default_factory=threading.Event)
    save_now: threading.Event = field(default_factory=threading.Event)
    # set by the trainer when its step loop begins: before that there is no step to finish, so
    # a stop request (Ctrl-C) during loading or the first evaluation ends the run at once
    training: threading.Event = field(default_factory=threading.Event)


class EventBus:
    """Fan-out of events to subscribers; a failing sink never breaks training."""

    def __init__(self):
        self._subscribers: list[Callable[[Event], None]] = []
        self._lock = threading.Lock()

    def subscribe(self, fn: Callable[[Event], None]) -> Callable[[Event], None]:
        with self._lock:
            self._subscribers.append(fn)
        return fn

    def emit(self, event: _Event) -> Event:
        """Send `event` to every subscriber, as its JSON form; return that form."""
        event = event.to_json()
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


class RunFilesError(UserError, RuntimeError):
    """metrics.jsonl or samples.jsonl could not be written (a full or read-only disk)."""


class JsonlSink:
    """Appends step metrics to metrics.jsonl and generations to samples.jsonl, flushed per line
    so that `grpo-mlx tui --attach` sees each step as soon as it is written.

    A write that fails (full disk, read-only filesystem) is cut back to the last whole line, so
    the files stay valid JSONL; the sink then writes nothing more, keeps the error, and calls
    `on_error` (the trainer stops after the current step and saves), or raises it at once when
    no `on_error` was given."""

    def __init__(self, run_dir: str, on_error: Callable[[], None] | None = None):
        self.run_dir = run_dir
        self.on_error = on_error
        self.error: RunFilesError | None = None
        self.files = []
        try:
            os.makedirs(run_dir, exist_ok=True)
            self.metrics = self._open("metrics.jsonl")
            self.samples = self._open("samples.jsonl")
        except OSError as e:
            self.close()
            raise RunFilesError(
                f"cannot write {e.filename or run_dir}: {e.strerror or e}; free space, fix the "
                "permissions or choose another --adapter-path"
            ) from None

    def _open(self, name: str):
        # unbuffered bytes: a line is on disk when write returns, and nothing half-written stays
        # in a buffer to reappear when the file is closed after a failure
        f = open(os.path.join(self.run_dir, name), "ab", buffering=0)  # noqa: SIM115 (closed by close())
        self.files.append(f)
        return f

    def __call__(self, event: Event) -> None:
        if self.error is not None:
            return
        kind = event["type"]
        if kind == "samples":
            out = self.samples
        elif kind in ("step", "eval", "start", "end", "checkpoint", "message"):
            out = self.metrics
        else:
            return
        data = (json.dumps(_clean(event), ensure_ascii=False) + "\n").encode("utf-8")
        good = None
        try:
            good = os.fstat(out.fileno()).st_size
            view = memoryview(data)
            while view:
                written = out.write(view)  # a short write on a nearly full disk: go on
                if not written:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), out.name)
                view = view[written:]
        except OSError as e:
            self._fail(out, good, e)

    def _fail(self, out, good: int | None, e: OSError) -> None:
        self.error = RunFilesError(
            f"cannot write {out.name}: {e.strerror or e}; the run stopped "
            f"(free space, then continue with --resume {self.run_dir})"
        )
        try:
            if good is not None:
                os.ftruncate(out.fileno(), good)  # drop the half-written line
        except OSError:
            pass
        self.close()
        if self.on_error is None:
            raise self.error from None
        self.on_error()

    def raise_if_failed(self) -> None:
        """After the run: a failed write ends it as a failure, with its one sentence."""
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        for f in self.files:
            with contextlib.suppress(OSError):  # unbuffered: nothing is left to flush
                f.close()
        self.files = []


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
