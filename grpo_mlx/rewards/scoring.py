"""Scoring a batch: each reward function called once on all completions (with a time limit),
its result validated, outcome rewards summed with their weights, process rewards kept as steps.

Functions are called with keywords only (`prompts=..., completions=..., **columns`, plus TRL's
`trainer_state`, `log_metric`, `log_extra`), as TRL does, so a TRL function that names only
`completions` and `**kwargs` works too; `async def` ones are awaited together (asyncio.gather). `None` means
"not applicable to this completion"; it adds 0 to the weighted total (TRL's nansum).
"""

from __future__ import annotations

import asyncio
import inspect
import math
import numbers
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from grpo_mlx.rewards.answers import completion_text
from grpo_mlx.rewards.builtin import RewardFn
from grpo_mlx.rewards.context import RewardContext, extra_logger, jsonable
from grpo_mlx.rewards.errors import RewardFunctionError

# Scoring a batch


@dataclass
class RewardResult:
    per_function: dict[str, np.ndarray]  # name -> (N,) float64, NaN where the function said None
    total: np.ndarray  # (N,) weighted sum over outcome functions; a None contributes 0 (TRL's nansum)
    # process rewards: name -> per completion a list of (end offset in the text, reward) or None
    steps: dict[str, list] = field(default_factory=dict)
    step_weights: dict[str, float] = field(default_factory=dict)
    extra: dict[str, list] = field(default_factory=dict)  # log_extra column -> (N,) values

    @property
    def shown(self) -> np.ndarray:
        """(N,) the reward reported as `reward`: the outcome total plus each process reward at
        its mean step reward (the advantages use the steps themselves)."""
        return self.total + sum(w * np.nan_to_num(self.per_function[name]) for name, w in self.step_weights.items())

    def select(self, rows: slice) -> RewardResult:
        return RewardResult(
            {k: v[rows] for k, v in self.per_function.items()},
            self.total[rows],
            {k: v[rows] for k, v in self.steps.items()},
            self.step_weights,
            {k: v[rows] for k, v in self.extra.items()},
        )

    @staticmethod
    def concat(parts: list[RewardResult]) -> RewardResult:
        first = parts[0]
        return RewardResult(
            {k: np.concatenate([p.per_function[k] for p in parts]) for k in first.per_function},
            np.concatenate([p.total for p in parts]),
            {k: [s for p in parts for s in p.steps[k]] for k in first.steps},
            first.step_weights,
            {  # a column some calls did not log is None there
                k: [v for p in parts for v in p.extra.get(k, [None] * len(p.total))]
                for k in dict.fromkeys(k for p in parts for k in p.extra)
            },
        )


def _preview(completions: list, index: int) -> str:
    return completion_text(completions[index]) if completions else ""


def _steps(value, text: str, delimiter: str) -> list[tuple[int, float]]:
    """A completion's step rewards as (end offset, reward) pairs. Plain numbers are the rewards
    of the text's steps in order, a step ending after each `delimiter` (and at the end)."""
    if all(isinstance(v, (tuple, list)) and len(v) == 2 for v in value):
        return [(int(o), float(r)) for o, r in value]
    ends, start = [], 0
    while True:
        cut = text.find(delimiter, start) if delimiter else -1
        if cut < 0:
            ends.append(len(text))
            break
        ends.append(cut + len(delimiter))
        start = cut + len(delimiter)
    if len(value) > len(ends):
        raise ValueError(f"{len(value)} step rewards for a text of {len(ends)} steps")
    return [(ends[i], float(r)) for i, r in enumerate(value)]


def _validate(name: str, values: Any, completions: list, delimiter: str = "\n"):
    """Check one function's result. Returns (N,) floats and, for a process reward (a list of
    step rewards for some completion), the steps of every completion (else None)."""
    n = len(completions)

    def fail(message: str, i: int | None = None) -> RewardFunctionError:
        text = _preview(completions, i or 0)
        where = "" if i is None else f" (on completion: {text[:200]!r})"
        return RewardFunctionError(f"reward function {name!r} {message}{where}", name, text, i)

    if isinstance(values, np.ndarray) and values.ndim == 1:
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise fail(f"returned a {type(values).__name__}, expected a list of {n} floats or None")
    if len(values) != n:
        raise fail(f"returned {len(values)} values for {n} completions")
    out = np.empty(n, dtype=np.float64)  # (N,)
    steps: list | None = None
    for i, v in enumerate(values):
        if isinstance(v, (list, tuple)):  # a process reward: one value per reasoning step
            steps = steps if steps is not None else [None] * n
            text = _preview(completions, i)
            try:
                steps[i] = _steps(v, text, delimiter)
            except (TypeError, ValueError) as e:
                raise fail(f"returned step rewards that do not fit completion {i}: {e}", i) from None
            bad = [r for _, r in steps[i] if not math.isfinite(r)]
            if bad:
                raise fail(f"returned step reward {bad[0]} for completion {i}", i)
            out[i] = np.mean([r for _, r in steps[i]]) if steps[i] else np.nan
        elif v is None:
            out[i] = np.nan
        elif isinstance(v, (numbers.Real, np.bool_)):
            if not math.isfinite(float(v)):
                raise fail(f"returned {float(v)} for completion {i}", i)
            out[i] = float(v)
        else:
            raise fail(f"returned {v!r:.50} ({type(v).__name__}) for completion {i}", i)
    if steps is not None:  # outcome values given alongside steps count as one final step
        for i in range(n):
            if steps[i] is None and not math.isnan(out[i]):
                steps[i] = [(len(_preview(completions, i)), float(out[i]))]
    return out, steps


def _call_with_timeout(fn: RewardFn, timeout: float | None, force: bool = False, /, **kwargs):
    """Run fn in a worker thread and wait at most `timeout` seconds (`force`: in a thread even
    without a timeout). A Python thread cannot be killed: a hung function is abandoned (daemon
    thread) and reported; the run stops or skips."""
    if getattr(fn, "runs_in_process", False):  # its worker process keeps its own time limit
        return fn(**kwargs)
    if getattr(fn, "in_trainer_thread", False):  # MLX work (a local judge): streams are per thread
        return fn(**kwargs)
    if not timeout and not force:
        return fn(**kwargs)
    result: dict = {}

    def target():
        try:
            result["value"] = fn(**kwargs)
        except BaseException as e:  # handed to the caller's thread
            result["error"] = e

    worker = threading.Thread(target=target, daemon=True, name="reward-function")
    worker.start()
    worker.join(timeout)
    if worker.is_alive():  # (join(None) waits for ever)
        raise TimeoutError(f"no result after {timeout:g} s")
    if "error" in result:
        raise result["error"]
    return result["value"]


def _from_signal(e: KeyboardInterrupt) -> bool:
    """A KeyboardInterrupt raised by a signal handler (Ctrl-C) rather than by the function: the
    innermost frame is grpo-mlx's own handler (outside this package's reward code). One a reward
    function raises itself, or one in the worker thread (signals reach only the main thread), is
    the function's failure."""
    if threading.current_thread() is not threading.main_thread():
        return False
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return True
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # grpo_mlx/
    rewards_dir = os.path.dirname(os.path.abspath(__file__))
    innermost = os.path.abspath(tb.tb_frame.f_code.co_filename)
    return innermost.startswith(package) and not innermost.startswith(rewards_dir)


def _failure(name: str, e: BaseException, completions: list) -> RewardFunctionError:
    """A function's exception as the one-sentence error the trainer handles; the user's Ctrl-C
    (a KeyboardInterrupt from the signal handler) is re-raised instead."""
    if isinstance(e, KeyboardInterrupt) and _from_signal(e):
        raise e
    text = _preview(completions, 0)
    what = f"called sys.exit({e.code!r})" if isinstance(e, SystemExit) else f"failed: {type(e).__name__}: {e}"
    return RewardFunctionError(f"reward function {name!r} {what} (on completion: {text[:200]!r})", name, text)


def is_async(fn) -> bool:
    """An `async def` function (or an object whose __call__ is one): TRL awaits these together."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


def _await_together(calls: list[tuple[RewardFn, dict]], timeout: float | None) -> list:
    """Run the async functions concurrently (asyncio.gather, as TRL does) on an event loop of
    their own in a worker thread (the caller may be inside a loop already); each result is its
    value or the exception it raised. `timeout` bounds each function and, as a last resort for
    one that blocks its loop, the whole gather."""

    async def one(fn, kwargs):
        return await (asyncio.wait_for(fn(**kwargs), timeout) if timeout else fn(**kwargs))

    async def together():
        return await asyncio.gather(*(one(fn, kw) for fn, kw in calls), return_exceptions=True)

    try:
        return _call_with_timeout(
            lambda: asyncio.run(together()), 2 * timeout + 1 if timeout else None, True
        )  # in a thread
    except TimeoutError as e:
        return [e] * len(calls)


def compute_rewards(
    reward_fns: list[tuple[str, RewardFn]],
    weights: list[float] | None,
    prompts: list,
    completions: list,
    columns: dict[str, list],
    timeout: float | None = None,
    context: RewardContext | None = None,
) -> RewardResult:
    """Call each function once on the whole batch (at most `timeout` seconds each; the async
    ones concurrently); validate; weighted sum with None as 0. Every function also receives
    TRL's `trainer_state`, `log_metric` and `log_extra` (from `context`, a fresh one if None);
    its metrics stay in the context, its extra columns come back in RewardResult.extra."""
    weights = [1.0] * len(reward_fns) if weights is None else list(weights)
    if len(weights) != len(reward_fns):
        raise ValueError(f"{len(weights)} reward weights for {len(reward_fns)} reward functions")
    context = context or RewardContext()
    # The names TRL passes explicitly would collide with a column of the same name.
    reserved = ("prompts", "completions", "trainer_state", "log_metric", "log_extra")
    columns = {k: v for k, v in columns.items() if k not in reserved}
    base = dict(prompts=prompts, completions=completions, **columns, trainer_state=context.trainer_state)
    extras = [{} for _ in reward_fns]  # per function: column -> values it logged
    calls = [{**base, "log_metric": context.log_metric, "log_extra": extra_logger(e)} for e in extras]
    results: list = [None] * len(reward_fns)
    for i, (name, fn) in enumerate(reward_fns):
        if is_async(fn):
            continue
        try:
            results[i] = _call_with_timeout(fn, timeout, **calls[i])
        except (Exception, SystemExit, KeyboardInterrupt) as e:
            raise _failure(name, e, completions) from e
    pending = [i for i, (_, fn) in enumerate(reward_fns) if is_async(fn)]
    if pending:
        for i, value in zip(pending, _await_together([(reward_fns[i][1], calls[i]) for i in pending], timeout)):
            if isinstance(value, BaseException):
                raise _failure(reward_fns[i][0], value, completions) from value
            results[i] = value
    return _combine(reward_fns, weights, results, extras, completions)


def _combine(reward_fns, weights, results: list, extras: list[dict], completions: list) -> RewardResult:
    """Validate each function's values (in order), sum the outcome ones with their weights."""
    per_function: dict[str, np.ndarray] = {}
    steps: dict[str, list] = {}
    step_weights: dict[str, float] = {}
    extra: dict[str, list] = {}
    total = np.zeros(len(completions), dtype=np.float64)  # (N,)
    for (name, fn), weight, values, logged in zip(reward_fns, weights, results, extras, strict=True):
        key, k = name, 2
        while key in per_function:  # the same function twice, e.g. with different options
            key, k = f"{name}_{k}", k + 1
        per_function[key], fn_steps = _validate(name, values, completions, getattr(fn, "step_delimiter", "\n"))
        if fn_steps is not None:  # enters the advantages per token, not the outcome total
            steps[key], step_weights[key] = fn_steps, weight
        else:
            total += weight * np.nan_to_num(per_function[key], nan=0.0)
        for column, vals in logged.items():
            if len(vals) != len(completions):  # they must line up with the samples they describe
                raise RewardFunctionError(
                    f"reward function {name!r} logged {len(vals)} values of column {column!r} with log_extra "
                    f"for {len(completions)} completions (give one value per completion)",
                    name,
                    _preview(completions, 0),
                )
            extra[column] = [jsonable(v) for v in vals]
    return RewardResult(per_function=per_function, total=total, steps=steps, step_weights=step_weights, extra=extra)


def score_examples(
    reward_fns: list[tuple[str, RewardFn]],
    examples: list[dict],
    texts: list[str],
    completion_ids: list[list[int]],
    *,
    weights: list[float] | None = None,
    timeout: float | None = None,
    context: RewardContext | None = None,
    row_columns: dict[str, list] | None = None,
) -> RewardResult:
    """Rewards of len(texts) completions, len(texts) / len(examples) per example in order, as
    TRL calls reward functions: prompts repeated per completion; each completion a string, or
    [{"role": "assistant", "content": text}] when the prompt is a conversation; every other
    column of the examples passed by name; `completion_ids` the sampled ids; `row_columns`
    more keywords with one value per completion (`environments`)."""
    group_size = len(texts) // max(len(examples), 1)
    rows = [ex for ex in examples for _ in range(group_size)]
    prompts = [ex["prompt"] for ex in rows]
    completions = [
        [{"role": "assistant", "content": text}] if isinstance(ex["prompt"], list) else text
        for text, ex in zip(texts, rows, strict=True)
    ]
    skip = {"prompt", "prompt_text", "prompt_ids"}
    columns = {k: [ex.get(k) for ex in rows] for k in (rows[0] if rows else {}) if k not in skip}
    columns["completion_ids"] = completion_ids
    columns.update(row_columns or {})
    return compute_rewards(reward_fns, weights, prompts, completions, columns, timeout=timeout, context=context)
