"""Follow the JSONL files of a run directory that another process is still writing."""

from __future__ import annotations

import json
import os

from grpo_mlx.events import Event


class JsonlTail:
    """Reads only new, complete lines of a file that grows: the offset stops before a line the
    writer has not finished, and the next read picks that line up whole."""

    def __init__(self, path: str):
        self.path = path
        self.offset = 0

    def read(self) -> list[Event]:
        try:
            with open(self.path, "rb") as f:
                if os.fstat(f.fileno()).st_size < self.offset:
                    self.offset = 0  # the file was replaced or truncated: start again
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        end = chunk.rfind(b"\n")
        if end < 0:
            return []
        self.offset += end + 1
        events = []
        for line in chunk[: end + 1].splitlines():
            if not line.strip():
                continue
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line garbled by a killed writer: skip it and keep following
        return events


class RunFollower:
    """metrics.jsonl and samples.jsonl of one run directory, read as one stream of events."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.metrics = JsonlTail(os.path.join(run_dir, "metrics.jsonl"))
        self.samples = JsonlTail(os.path.join(run_dir, "samples.jsonl"))

    def read(self) -> list[Event]:
        # samples after metrics: the dashboard then knows a step before showing its samples
        return self.metrics.read() + self.samples.read()
