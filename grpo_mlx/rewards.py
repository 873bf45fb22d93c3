"""Reward functions: TRL-style signature, a few built-ins, loading custom ones, batch scoring.

A reward function is `f(prompts, completions, **columns) -> list[float | None]`, exactly as in
TRL, so TRL reward functions work unchanged. `completions[i]` is a string for plain-text data or
`[{"role": "assistant", "content": text}]` for conversational data; `columns` holds every extra
dataset column as a list aligned with `completions` (e.g. `answer=[...]`) plus `completion_ids`.
`None` means "not applicable to this completion"; it adds 0 to the weighted total (TRL's nansum).

Choices:
- Functions are called with keywords only (`prompts=..., completions=..., **columns`), as TRL
  does, so a TRL function that names only `completions` and `**kwargs` works too.
- Built-ins: `accuracy` reads the `answer` column (option `column=`); `format` is strict (1/0);
  `format_soft` gives 0.25 per format rule that holds, so a nearly formatted answer still gets
  a signal (both give 1.0 to the same completions); `overlong` is DAPO's soft punishment;
  `length` is -min(L, L_max)/L_max, linear in [-1, 0], meant with a small weight.
- Custom functions are used as they are; factory options apply to built-ins only.
- `#### x` counts as an answer only when x is a number or ends the text (else it is a heading).
- No MLX here: this module is imported by cheap code paths (CLI help, TUI).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import os
import re
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from grpo_mlx.errors import UserError

RewardFn = Callable[..., list]


class RewardSpecError(UserError, ValueError):
    """A reward spec (built-in name, file.py:fn, module:fn) cannot be resolved."""


class RewardFunctionError(UserError, RuntimeError):
    """A reward function raised or returned something unusable; the trainer stops cleanly."""

    def __init__(self, message: str, function_name: str, completion: str, index: int | None = None):
        super().__init__(message)
        self.function_name = function_name
        self.completion = completion
        self.index = index


# ---------------------------------------------------------------------------------------------
# Text helpers


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, one message dict, or a list of messages (joined)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        content = completion.get("content")
        if isinstance(content, list):  # multimodal parts: [{"type": "text", "text": ...}]
            return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
        return "" if content is None else str(content)
    if isinstance(completion, (list, tuple)):
        return "\n".join(completion_text(m) for m in completion)
    return "" if completion is None else str(completion)


def _last_boxed(text: str) -> str | None:
    # Braces nest (\boxed{\frac{1}{2}}), so a regex cannot find the end; count instead.
    start = text.rfind("\\boxed{")
    while start != -1:
        depth, i = 0, start + len("\\boxed")
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[i + 1 : j]
        start = text.rfind("\\boxed{", 0, start)  # unbalanced (truncated); try an earlier one
    return None


_HASHES = re.compile(r"####[ \t]*([^\n]*\S)")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# A minus sign only when it is not a hyphen between words/numbers ("3-4" ends in 4, not -4).
_NUMBER = re.compile(r"(?:(?<![\w)])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?!\d)")


def _clean(answer: str) -> str:
    return answer.strip().strip("$").strip().rstrip(".").strip()


def _last_hashes(text: str) -> str | None:
    # "#### x" is also a markdown heading; trust it only if x is a number or ends the text.
    match = ([None] + list(_HASHES.finditer(text)))[-1]
    if match and (_to_number(match[1]) is not None or not text[match.end():].strip()):
        return match[1]
    return None


def extract_answer(text: str) -> str | None:
    """Final answer: last \\boxed{}, else `#### x`, else last <answer>, else the last number."""
    text = completion_text(text)
    for found in (_last_boxed(text), _last_hashes(text),
                  (_ANSWER_TAG.findall(text) or [None])[-1],
                  (_NUMBER.findall(text) or [None])[-1]):
        if found is not None and _clean(found):
            return _clean(found)
    return None


_FRACTION = re.compile(r"(-?)\\[dt]?frac\{\s*(-?\d+)\s*\}\{\s*(-?\d+)\s*\}|(-?\d+)\s*/\s*(-?\d+)")
_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _to_number(s: str) -> float | None:
    s = _clean(s).replace("\\$", "").replace("$", "").replace("\\%", "").rstrip("%").strip()
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?", s):  # thousands commas only, not "1,2"
        s = s.replace(",", "")
    if _PLAIN_NUMBER.fullmatch(s):
        value = float(s)
        return value if math.isfinite(value) else None
    match = _FRACTION.fullmatch(s)
    if match:
        sign, num, den = match[1], match[2] or match[4], match[3] or match[5]
        if int(den) != 0:
            return (-1 if sign else 1) * int(num) / int(den)
    return None


def answers_match(predicted: str | None, reference: Any) -> bool:
    """Numeric equality (1e-6 relative) when both are numbers, else normalised string equality."""
    if predicted is None or reference is None:
        return False
    reference = str(reference)
    if "####" in reference:  # a GSM8K solution: the answer follows the last ####
        hashes = _HASHES.findall(reference)
        reference = hashes[-1] if hashes else reference
    a, b = _to_number(str(predicted)), _to_number(reference)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)
    normalise = lambda s: " ".join(_clean(s).lower().split())  # noqa: E731
    return normalise(str(predicted)) == normalise(reference)


# ---------------------------------------------------------------------------------------------
# Built-in rewards. Each entry is a factory: options -> reward function. The trainer passes
# max_completion_length to every factory, so each one swallows options it does not use (**_).


def _missing(reference: Any) -> bool:
    return (reference is None or (isinstance(reference, str) and not reference.strip())
            or (isinstance(reference, float) and math.isnan(reference)))  # pandas' empty cell


def accuracy_reward(column: str = "answer", **_) -> RewardFn:
    """1.0 if the extracted answer matches the `column` value, 0.0 if not, None if no answer."""
    def accuracy(prompts, completions, **kwargs):
        answers = kwargs.get(column)
        answers = [None] * len(completions) if answers is None else answers
        return [None if _missing(ref) else float(answers_match(extract_answer(completion_text(c)), ref))
                for c, ref in zip(completions, answers, strict=True)]
    return accuracy


def _format_rules(text: str) -> list[bool]:
    """One think block, one answer block, think before answer, nothing but whitespace outside."""
    think = list(re.finditer(r"<think>.*?</think>", text, re.DOTALL))
    answer = list(re.finditer(r"<answer>.*?</answer>", text, re.DOTALL))
    # Counting the bare tags as well rejects nested or stray tags ("<think>a<think>b</think>").
    return [text.count("<think>") == text.count("</think>") == len(think) == 1,
            text.count("<answer>") == text.count("</answer>") == len(answer) == 1,
            bool(think and answer and think[0].end() <= answer[0].start()),
            not re.sub(r"<think>.*?</think>|<answer>.*?</answer>", "", text, flags=re.DOTALL).strip()]


def format_reward(soft: bool = False, **_) -> RewardFn:
    """1.0 when all format rules hold, else 0.0; soft=True gives 0.25 per rule that holds."""
    def format(prompts, completions, **kwargs):
        rules = [_format_rules(completion_text(c)) for c in completions]
        return [sum(r) / len(r) if soft else float(all(r)) for r in rules]
    return format


def format_soft_reward(**options) -> RewardFn:
    options["soft"] = True
    return format_reward(**options)


def _token_counts(kwargs: dict, name: str) -> list[int]:
    if kwargs.get("completion_ids") is None:
        raise ValueError(f"{name} needs the completion_ids column (token ids of each completion)")
    return [len(ids) for ids in kwargs["completion_ids"]]


def _require_max_length(name: str, max_completion_length: int | None) -> int:
    if not max_completion_length or max_completion_length < 1:
        raise RewardSpecError(f"reward {name!r} needs max_completion_length >= 1")
    return int(max_completion_length)


def overlong_reward(max_completion_length: int | None = None, cache_length: int | None = None, **_) -> RewardFn:
    """DAPO soft overlong punishment (eq. 13): 0 up to L_max - L_cache, then linear to -1 at L_max."""
    l_max = _require_max_length("overlong", max_completion_length)
    l_cache = max(1, l_max // 4) if cache_length is None else min(int(cache_length), l_max)
    if l_cache < 1:
        raise RewardSpecError(f"reward 'overlong' needs cache_length >= 1, got {cache_length}")

    def overlong(prompts, completions, **kwargs):
        return [0.0 if n <= l_max - l_cache else (l_max - l_cache - n) / l_cache if n <= l_max else -1.0
                for n in _token_counts(kwargs, "overlong")]
    return overlong


def length_reward(max_completion_length: int | None = None, **_) -> RewardFn:
    """-L / L_max, clipped to [-1, 0]: prefers shorter completions; use with a small weight."""
    l_max = _require_max_length("length", max_completion_length)

    def length(prompts, completions, **kwargs):
        return [-min(n, l_max) / l_max for n in _token_counts(kwargs, "length")]
    return length


def digit_steps_reward(column: str = "answer", **_) -> RewardFn:
    """A process reward for answers written digit by digit (the demo's sums): each character of
    the completion is a step, rewarded 1 when it equals the reference answer's character at the
    same place, else 0; characters past the answer's end get 0. Returns (end offset, reward)
    pairs, so every digit's token is credited or blamed on its own (DeepSeekMath's process
    supervision, with the digits of the sum as the intermediate results)."""

    def digit_steps(prompts, completions, **kwargs):
        answers = kwargs.get(column) or [None] * len(completions)
        out = []
        for completion, answer in zip(completions, answers):
            if _missing(answer):
                out.append(None)
                continue
            raw, ref = completion_text(completion), str(answer).strip()
            lead = len(raw) - len(raw.lstrip())  # offsets count in the completion as written
            text = raw.strip()
            out.append([(lead + i + 1, 1.0 if i < len(ref) and ch == ref[i] else 0.0) for i, ch in enumerate(text)] or None)
        return out

    return digit_steps


def code_reward(**options) -> RewardFn:
    """Generated Python run against the example's `tests` column in a sandboxed process."""
    from grpo_mlx.sandbox import code_reward as make

    return make(**{k: v for k, v in options.items() if k in ("timeout", "memory_mb", "tests_column")})


BUILTIN_REWARDS: dict[str, Callable[..., RewardFn]] = {
    "accuracy": accuracy_reward, "format": format_reward, "format_soft": format_soft_reward,
    "overlong": overlong_reward, "length": length_reward, "code": code_reward,
    "digit_steps": digit_steps_reward,
}


# ---------------------------------------------------------------------------------------------
# Resolving a spec: "accuracy", "path/to/file.py:fn" or "package.module:fn"


def _load_failure(spec: str, what: str, e: Exception) -> RewardSpecError:
    if isinstance(e, SyntaxError):  # name the file that is broken, which may be a helper it imports
        return RewardSpecError(f"reward {spec!r}: syntax error in {e.filename} line {e.lineno}: {e.msg}")
    return RewardSpecError(f"reward {spec!r}: cannot import {what}: {type(e).__name__}: {e}")


def _load_file(spec: str, path: Path):
    if not path.is_file():
        raise RewardSpecError(f"reward {spec!r}: file not found: {path}")
    name = f"grpo_mlx_reward_{path.stem}_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickle look the module up by name
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)  # as with `python file.py`, the files beside it are importable
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise _load_failure(spec, f"file {str(path)!r}", e) from e
    finally:
        sys.path.remove(folder)
    return module


def _import_module(spec: str, dotted: str):
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:  # a console script does not see the working directory; users expect it to
        sys.path.append(cwd)
    try:
        return importlib.import_module(dotted)
    except Exception as e:
        raise _load_failure(spec, f"module {dotted!r}", e) from e
    finally:
        if added:
            sys.path.remove(cwd)


def _suggest(name: str, choices: list[str]) -> str:
    import difflib  # only on the error path
    # difflib misses a mere prefix ("shout" for "shout_reward"); look for one of those too.
    close = difflib.get_close_matches(name, choices, n=1) or [c for c in choices if c.startswith(name)]
    return f"did you mean {close[0]!r}? " if close else ""


def resolve_reward(spec: str, **options) -> tuple[str, RewardFn]:
    """A (display name, reward function) for a built-in name, `file.py:fn` or `module:fn`."""
    spec = spec.strip()
    if spec in BUILTIN_REWARDS:
        return spec, BUILTIN_REWARDS[spec](**options)
    if ":" not in spec:
        hint = ("name the function: file.py:function" if spec.endswith(".py") else
                f"unknown built-in reward; {_suggest(spec, list(BUILTIN_REWARDS))}built-ins: "
                f"{', '.join(BUILTIN_REWARDS)}; custom: path/to/file.py:function or package.module:function")
        raise RewardSpecError(f"reward {spec!r}: {hint}")
    target, attr = spec.rsplit(":", 1)
    if not attr.isidentifier():
        raise RewardSpecError(f"reward {spec!r}: {attr!r} after the colon is not a function name")
    is_file = target.endswith(".py") or "/" in target or os.sep in target
    module = _load_file(spec, Path(target).expanduser()) if is_file else _import_module(spec, target)
    if not hasattr(module, attr):
        defined = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                         and getattr(v, "__module__", None) == module.__name__)
        listing = f"it defines: {', '.join(defined)}" if 0 < len(defined) <= 12 else (
            "it defines no functions" if not defined else f"it defines {len(defined)} callables")
        raise RewardSpecError(f"reward {spec!r}: no {attr!r} in {target}; {_suggest(attr, defined)}{listing}")
    fn = getattr(module, attr)
    if not callable(fn):
        raise RewardSpecError(f"reward {spec!r}: {attr!r} in {target} is a {type(fn).__name__}, not a function")
    return getattr(fn, "__name__", attr), fn


# ---------------------------------------------------------------------------------------------
# Scoring a batch


@dataclass
class RewardResult:
    per_function: dict[str, np.ndarray]  # name -> (N,) float64, NaN where the function said None
    total: np.ndarray  # (N,) weighted sum over outcome functions; a None contributes 0 (TRL's nansum)
    # process rewards: name -> per completion a list of (end offset in the text, reward) or None
    steps: dict[str, list] = field(default_factory=dict)
    step_weights: dict[str, float] = field(default_factory=dict)

    @property
    def shown(self) -> np.ndarray:
        """(N,) the reward reported as `reward`: the outcome total plus each process reward at
        its mean step reward (the advantages use the steps themselves)."""
        return self.total + sum(w * np.nan_to_num(self.per_function[name]) for name, w in self.step_weights.items())

    def select(self, rows: slice) -> RewardResult:
        return RewardResult({k: v[rows] for k, v in self.per_function.items()}, self.total[rows],
                            {k: v[rows] for k, v in self.steps.items()}, self.step_weights)

    @staticmethod
    def concat(parts: list[RewardResult]) -> RewardResult:
        first = parts[0]
        return RewardResult({k: np.concatenate([p.per_function[k] for p in parts]) for k in first.per_function},
                            np.concatenate([p.total for p in parts]),
                            {k: [s for p in parts for s in p.steps[k]] for k in first.steps}, first.step_weights)


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


def _call_with_timeout(fn: RewardFn, timeout: float | None, **kwargs):
    """Run fn in a worker thread and wait at most `timeout` seconds. A Python thread cannot be
    killed: a hung function is abandoned (daemon thread) and reported; the run stops or skips."""
    if not timeout:
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
    if worker.is_alive():
        raise TimeoutError(f"no result after {timeout:g} s")
    if "error" in result:
        raise result["error"]
    return result["value"]


def compute_rewards(reward_fns: list[tuple[str, RewardFn]], weights: list[float] | None,
                    prompts: list, completions: list, columns: dict[str, list],
                    timeout: float | None = None) -> RewardResult:
    """Call each function once on the whole batch (at most `timeout` seconds each); validate;
    weighted sum with None as 0."""
    weights = [1.0] * len(reward_fns) if weights is None else list(weights)
    if len(weights) != len(reward_fns):
        raise ValueError(f"{len(weights)} reward weights for {len(reward_fns)} reward functions")
    # The two names TRL passes explicitly would collide with a column of the same name.
    columns = {k: v for k, v in columns.items() if k not in ("prompts", "completions")}
    per_function: dict[str, np.ndarray] = {}
    steps: dict[str, list] = {}
    step_weights: dict[str, float] = {}
    total = np.zeros(len(completions), dtype=np.float64)  # (N,)
    for (name, fn), weight in zip(reward_fns, weights, strict=True):
        key, k = name, 2
        while key in per_function:  # the same function twice, e.g. with different options
            key, k = f"{name}_{k}", k + 1
        try:
            values = _call_with_timeout(fn, timeout, prompts=prompts, completions=completions, **columns)
        except Exception as e:
            text = _preview(completions, 0)
            raise RewardFunctionError(f"reward function {name!r} failed: {type(e).__name__}: {e} "
                                      f"(on completion: {text[:200]!r})", name, text) from e
        per_function[key], fn_steps = _validate(name, values, completions, getattr(fn, "step_delimiter", "\n"))
        if fn_steps is not None:  # enters the advantages per token, not the outcome total
            steps[key], step_weights[key] = fn_steps, weight
        else:
            total += weight * np.nan_to_num(per_function[key], nan=0.0)
    return RewardResult(per_function=per_function, total=total, steps=steps, step_weights=step_weights)
