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
        self.line = 0  # lines read so far, for naming a bad one
        self.skipped = 0

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
        for line in chunk[: end + 1].split(b"\n")[:-1]:
            self.line += 1
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue  # a line garbled by a killed writer: skip it and keep following
            if isinstance(event, dict):
                events.append(event)
                continue
            # valid JSON that is no event (a list, a number): skip it, and say so the first time
            self.skipped += 1
            if self.skipped == 1:
                events.append(
                    {
                        "type": "message",
                        "level": "warning",
                        "text": f"{os.path.basename(self.path)}:{self.line}: skipped a line that is "
                        f"not an event ({type(event).__name__}); later ones are skipped silently",
                    }
                )
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
