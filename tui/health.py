"""Health rules: judgements on a run's metric history that a person watching would want pointed
out. Pure Python over the dashboard's series (lists of floats, None for missing or NaN), no
Textual, so each rule is unit-tested with hand-made histories.

Thresholds are stated here, once; each rule says in its message what it saw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import mean, median

from grpo_mlx import metric_names as M

ZERO_STD_LIMIT = 0.5  # frac_reward_zero_std above this ...
ZERO_STD_STEPS = 3  # ... for this many steps in a row: most groups teach nothing
KL_JUMP_FACTOR = 4.0  # kl above this many times its recent median ...
KL_JUMP_MIN = 0.01  # ... and above it by at least this much (ignores jitter near zero)
KL_BASELINE = 10  # steps whose median is the baseline (at least half of them needed)
CLIPPED_LIMIT = 0.95  # completions/clipped_ratio at or above this: (nearly) all hit the length limit
TREND_WINDOW = 10  # reward vs correctness: the last N steps against the N before them
REWARD_RISE = 0.1  # total reward up by at least this ...
ACCURACY_FLAT = 0.01  # ... while the correctness reward moved by at most this
CORRECTNESS_NAMES = ("accuracy", "correct")  # reward functions taken to measure correctness


@dataclass(frozen=True)
class Alert:
    rule: str
    level: str  # "warning" or "error"
    text: str


def _finite(values):
    return [v for v in values if _ok(v)]


def _ok(v) -> bool:
    return v is not None and math.isfinite(v)


def check(steps: list[int], series: dict[str, list]) -> list[Alert]:
    """All alerts for a history. `series[name][i]` is the value at `steps[i]`: a float, NaN
    where the step logged NaN (null in the files), None where it did not log that metric."""
    alerts = []
    for rule in (non_finite, zero_std, kl_jump, all_clipped, reward_without_correctness):
        alert = rule(steps, series)
        if alert:
            alerts.append(alert)
    return alerts


def non_finite(steps, series):
    bad = {
        name: {s for s, v in zip(steps, series.get(name, [])) if v is not None and not math.isfinite(v)}
        for name in (M.LOSS, M.GRAD_NORM)
    }
    hit = sorted(bad[M.LOSS] | bad[M.GRAD_NORM])
    if not hit:
        return None
    names = " and ".join(n for n in (M.LOSS, M.GRAD_NORM) if bad[n])
    shown = ", ".join(map(str, hit[-5:])) + (" ..." if len(hit) > 5 else "")
    latest = hit[-1] == steps[-1]  # still happening now: an error, else a reminder
    return Alert(
        "non_finite",
        "error" if latest else "warning",
        f"{names} NaN at {len(hit)} step(s) ({shown}): those updates were skipped",
    )


def zero_std(steps, series):
    recent = series.get(M.FRAC_REWARD_ZERO_STD, [])[-ZERO_STD_STEPS:]
    if len(recent) < ZERO_STD_STEPS or any(not _ok(v) or v <= ZERO_STD_LIMIT for v in recent):
        return None
    return Alert(
        "zero_std",
        "warning",
        f"most groups had identical rewards for {ZERO_STD_STEPS}+ steps ({recent[-1]:.0%} in the last): "
        "they teach nothing (tasks too easy or too hard? try a larger group, temperature or dynamic sampling)",
    )


def kl_jump(steps, series):
    values = series.get(M.KL, [])
    if not values or not _ok(values[-1]):
        return None
    baseline = _finite(values[-KL_BASELINE - 1 : -1])
    if len(baseline) < KL_BASELINE // 2:
        return None
    typical = median(baseline)
    now = values[-1]
    if now > KL_JUMP_FACTOR * typical and now - typical >= KL_JUMP_MIN:
        return Alert(
            "kl_jump",
            "warning",
            f"KL jumped to {now:.4g} (recent median {typical:.4g}): the policy is moving fast; "
            "consider a lower learning rate or a larger beta",
        )
    return None


def all_clipped(steps, series):
    values = series.get(M.CLIPPED_RATIO, [])
    if not values or not _ok(values[-1]) or values[-1] < CLIPPED_LIMIT:
        return None
    return Alert(
        "all_clipped",
        "warning",
        f"{values[-1]:.0%} of completions hit the length limit: raise max_completion_length or reward shorter answers",
    )


def reward_without_correctness(steps, series):
    names = [k for k in series if M.reward_function_of(k)]
    correctness = [k for k in names if any(c in k.lower() for c in CORRECTNESS_NAMES)]
    if len(names) < 2 or not correctness:
        return None  # with correctness as the only reward, reward *is* correctness
    reward = series.get(M.REWARD, [])
    if len(reward) < 2 * TREND_WINDOW:
        return None

    def rise(values):
        before = _finite(values[-2 * TREND_WINDOW : -TREND_WINDOW])
        after = _finite(values[-TREND_WINDOW:])
        return mean(after) - mean(before) if before and after else None

    reward_rise = rise(reward)
    if reward_rise is None or reward_rise < REWARD_RISE:
        return None
    for name in correctness:
        moved = rise(series[name])
        if moved is not None and moved <= ACCURACY_FLAT:
            fn = M.reward_function_of(name)
            return Alert(
                "reward_without_correctness",
                "warning",
                f"reward rose {reward_rise:+.3f} over the last {TREND_WINDOW} steps while {fn} moved "
                f"{moved:+.3f}: another reward may be gamed",
            )
    return None
