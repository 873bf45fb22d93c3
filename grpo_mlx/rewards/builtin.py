"""The built-in reward functions: `accuracy` reads the `answer` column (option `column=`); `format`
is strict (1/0); `format_soft` gives 0.25 per format rule that holds, so a nearly formatted answer
still gets a signal (both give 1.0 to the same completions); `overlong` is DAPO's soft
punishment; `length` is -min(L, L_max)/L_max, linear in [-1, 0], meant with a small weight;
`digit_steps` is a process reward (one step per answer digit); `code` runs generated Python
against a `tests` column in the OS sandbox (grpo_mlx.sandbox); `judge` asks a language model
(grpo_mlx.judge), configured by the run's judge_* keys.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from grpo_mlx.rewards.answers import answers_match, completion_text, extract_answer
from grpo_mlx.rewards.errors import RewardSpecError

RewardFn = Callable[..., list]


# # Built-in rewards. Each entry is a factory: options -> reward function. The trainer passes
# max_completion_length to every factory, so each one swallows options it does not use (**_).


def _missing(reference: Any) -> bool:
    return (
        reference is None
        or (isinstance(reference, str) and not reference.strip())
        or (isinstance(reference, float) and math.isnan(reference))
    )  # pandas' empty cell


def _needs(fn: RewardFn, *columns: str) -> RewardFn:
    """Mark a built-in with the data columns it reads (check_columns refuses a run without them)."""
    fn.needs_columns = columns
    return fn


def check_columns(reward_fns: list[tuple[str, RewardFn]], examples: list[dict], where: str) -> None:
    """Refuse, before any training, a reward that reads a column no example has a value in (an
    `accuracy` reward without answers would score every completion None: a run that learns nothing)."""
    for name, fn in reward_fns:
        for column in getattr(fn, "needs_columns", ()):
            if examples and all(_missing(ex.get(column)) for ex in examples):
                hint = "name the answer column with --answer-key" if column == "answer" else "add the column"
                raise RewardSpecError(
                    f"reward {name!r} needs the {column!r} column, but no example of {where} has one "
                    f"({hint}, or choose other --reward-functions)"
                )


def accuracy_reward(column: str = "answer", **_) -> RewardFn:
    """1.0 if the extracted answer matches the `column` value, 0.0 if not, None if no answer."""

    def accuracy(prompts, completions, **kwargs):
        answers = kwargs.get(column)
        answers = [None] * len(completions) if answers is None else answers
        return [
            None if _missing(ref) else float(answers_match(extract_answer(completion_text(c)), ref))
            for c, ref in zip(completions, answers, strict=True)
        ]

    return _needs(accuracy, column)


def _format_rules(text: str) -> list[bool]:
    """One think block, one answer block, think before answer, nothing but whitespace outside."""
    think = list(re.finditer(r"<think>.*?</think>", text, re.DOTALL))
    answer = list(re.finditer(r"<answer>.*?</answer>", text, re.DOTALL))
    # Counting the bare tags as well rejects nested or stray tags ("<think>a<think>b</think>").
    return [
        text.count("<think>") == text.count("</think>") == len(think) == 1,
        text.count("<answer>") == text.count("</answer>") == len(answer) == 1,
        bool(think and answer and think[0].end() <= answer[0].start()),
        not re.sub(r"<think>.*?</think>|<answer>.*?</answer>", "", text, flags=re.DOTALL).strip(),
    ]


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
        return [
            0.0 if n <= l_max - l_cache else (l_max - l_cache - n) / l_cache if n <= l_max else -1.0
            for n in _token_counts(kwargs, "overlong")
        ]

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
            out.append(
                [(lead + i + 1, 1.0 if i < len(ref) and ch == ref[i] else 0.0) for i, ch in enumerate(text)] or None
            )
        return out

    return _needs(digit_steps, column)


def code_reward(**options) -> RewardFn:
    """Generated Python run against the example's `tests` column in a sandboxed process."""
    from grpo_mlx.sandbox import code_reward as make

    chosen = {k: v for k, v in options.items() if k in ("timeout", "memory_mb", "tests_column")}
    return _needs(make(**chosen), chosen.get("tests_column", "tests"))


def judge_reward(**options) -> RewardFn:
    """A language model as the judge (grpo_mlx.judge); configured by the run's judge_* keys."""
    from grpo_mlx.judge import judge_reward as make

    return make(**options)


def environment_reward(**_) -> RewardFn:
    """Each episode's environment's `get_reward()` (an `--environment` with that method)."""

    def environment(prompts, completions, environments=None, **kwargs):
        if environments is None:  # completions sampled without episodes (held-out evaluation): not applicable
            return [None] * len(completions)
        return [env.get_reward() for env in environments]

    return environment


BUILTIN_REWARDS: dict[str, Callable[..., RewardFn]] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "format_soft": format_soft_reward,
    "overlong": overlong_reward,
    "length": length_reward,
    "code": code_reward,
    "digit_steps": digit_steps_reward,
    "judge": judge_reward,
    "environment": environment_reward,
}
