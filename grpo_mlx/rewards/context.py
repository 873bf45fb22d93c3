"""What a reward function sees besides the batch, as TRL 1.16 passes it: `trainer_state` (the
step, epoch and step count, for rewards that change with training), `log_metric(name, value)`
(a scalar logged with the step's metrics under the name given, averaged over the step's calls)
and `log_extra(column, values)` (a column of the step's samples, one value per completion).

A RewardContext lives for one training step and keeps the metrics; each scoring call keeps its
own extra columns (they travel with its completions in RewardResult.extra, so dynamic sampling
that drops a group drops its values too). Pure Python.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class TrainerState:
    """The attributes of transformers' TrainerState that reward functions read."""

    global_step: int = 0  # optimizer steps done before this batch was scored
    max_steps: int = 0  # steps the run will take
    epoch: float = 0.0  # passes over the training prompts so far (fractional)


@dataclass
class RewardContext:
    trainer_state: TrainerState = field(default_factory=TrainerState)
    logged: dict[str, list[float]] = field(default_factory=dict)  # name -> values of the step's calls

    def log_metric(self, name: str, value: float) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"log_metric needs a metric name (a non-empty string), got {name!r:.40}")
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            try:  # a 0-d numpy or torch value
                value = float(value)
            except (TypeError, ValueError):
                raise TypeError(f"log_metric({name!r}, ...) needs a number, got {type(value).__name__}") from None
        self.logged.setdefault(name, []).append(float(value))

    def metrics(self) -> dict[str, float]:
        """Each logged metric averaged over the step's calls, as TRL averages them."""
        return {k: sum(v) / len(v) if v else math.nan for k, v in self.logged.items()}


def jsonable(value):
    """A logged value as samples.jsonl can hold it: numpy scalars as numbers, containers kept,
    anything else as its text (a value json cannot write would stop the run's files)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch / mlx scalars
        return value.item()
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    return str(value)


def extra_logger(columns: dict[str, list]) -> Callable[[str, list], None]:
    """A `log_extra(column, values)` that appends to `columns` (one function's calls)."""

    def log_extra(column: str, values: list) -> None:
        if not isinstance(column, str) or not column:
            raise TypeError(f"log_extra needs a column name (a non-empty string), got {column!r:.40}")
        columns.setdefault(column, []).extend(list(values))

    return log_extra
