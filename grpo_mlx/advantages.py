"""From rewards to the advantages the loss consumes: outcome rewards give one advantage per
completion, process (step) rewards one per token; both may be combined.

The math is pure functions over mx.array (group, combined and process advantages); the glue at
the end maps the text offsets where steps end to token positions, with the tokenizer.

Choices, stated once: advantages use the group mean and a sample std (n−1 denominator, like
torch.std). A group of one completion has no spread: its std is taken as 0, so its advantage is
0 rather than NaN. Arithmetic is float32 whatever the input dtype.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from grpo_mlx.config import BASELINES, REWARD_COMBINATIONS, SCALE_REWARDS
from grpo_mlx.sampler import decode_text


def _sample_std(x, axis=None, keepdims=False):
    """Standard deviation with the n−1 denominator (torch.std's default); n == 1 gives 0."""
    n = x.size if axis is None else x.shape[axis]
    mean = x.mean(axis=axis, keepdims=True)  # x reduced over axis, kept
    var = ((x - mean) ** 2).sum(axis=axis, keepdims=keepdims) / max(n - 1, 1)  # reduced
    return mx.sqrt(var)


def group_advantages(rewards, scale="group", eps=1e-4, *, baseline="mean"):
    """Advantage of each completion relative to its group: (r − group mean) / (std + eps).

    `scale` picks the std: "group" (each group's own), "batch" (over all B·G rewards, which
    damps the boost that near-constant groups get from a tiny std, as in Dr. GRPO/TRL), or
    "none" (no division: the mean-centred reward).
    `baseline` "leave_one_out" (RLOO) subtracts the mean of the *other* G−1 rewards instead,
    which equals G/(G−1) · (r − group mean); the std scaling then applies as chosen.
    """
    if scale not in SCALE_REWARDS:
        raise ValueError(f"unknown advantage scale {scale!r}; valid values: {', '.join(SCALE_REWARDS)}")
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; valid values: {', '.join(BASELINES)}")
    if rewards.ndim != 2:
        raise ValueError(f"rewards must have shape (B, G), got {tuple(rewards.shape)}")
    rewards = rewards.astype(mx.float32)  # (B, G)
    centred = rewards - rewards.mean(axis=1, keepdims=True)  # (B, G)
    G = rewards.shape[1]
    if baseline == "leave_one_out" and G > 1:
        centred = centred * (G / (G - 1))  # (B, G) r_i − mean of the others
    if scale == "none":
        return centred  # (B, G)
    if scale == "group":
        std = _sample_std(rewards, axis=1, keepdims=True)  # (B, 1)
    else:
        std = _sample_std(rewards)  # ()
    return centred / (std + eps)  # (B, G)


def combined_advantages(rewards, weights, combine="sum", scale="group", eps=1e-4, *, baseline="mean"):
    """Advantages from K reward functions, rewards (K, B, G), weights (K,).

    combine "sum": weighted sum of the rewards, then one normalisation (GRPO as published).
    combine "normalize_each": each function's rewards normalised in its group first, then the
    weighted sum, so a reward with a large range cannot drown the others (as in GDPO).
    """
    weights = mx.array(weights, dtype=mx.float32)[:, None, None]  # (K, 1, 1)
    rewards = rewards.astype(mx.float32)  # (K, B, G)
    if combine == "sum":
        return group_advantages((weights * rewards).sum(axis=0), scale, eps, baseline=baseline)  # (B, G)
    if combine == "normalize_each":
        per_fn = [group_advantages(r, scale, eps, baseline=baseline) for r in rewards]  # K x (B, G)
        return (weights * mx.stack(per_fn)).sum(axis=0)  # (B, G)
    raise ValueError(f"unknown reward combination {combine!r}; valid values: {', '.join(REWARD_COMBINATIONS)}")


def process_advantages(step_rewards, step_index, step_mask, group_size, num_tokens, eps=1e-4):
    """Process supervision (DeepSeekMath §4.1.3): per-token advantages from step rewards.

    step_rewards, step_mask (N, S): the rewards of each completion's steps (padded, mask 1 for
    real steps); step_index (N, S) int: the token at which each step ends. Rewards are normalised
    over all steps of all G completions of a group: r̃ = (r − mean) / (std + eps). The advantage
    of token t is the sum of r̃ over the steps that end at or after t. Returns (N, T).
    """
    n, s = step_rewards.shape
    rewards = step_rewards.astype(mx.float32).reshape(n // group_size, group_size * s)  # (B, G·S)
    mask = step_mask.astype(mx.float32).reshape(rewards.shape)  # (B, G·S)
    count = mx.maximum(mask.sum(axis=1, keepdims=True), 1.0)  # (B, 1)
    mean = (rewards * mask).sum(axis=1, keepdims=True) / count  # (B, 1)
    var = (((rewards - mean) ** 2) * mask).sum(axis=1, keepdims=True) / mx.maximum(count - 1, 1.0)  # (B, 1)
    normed = ((rewards - mean) / (mx.sqrt(var) + eps) * mask).reshape(n, s)  # (N, S)
    at_token = mx.arange(num_tokens)[None, None, :] == step_index[..., None]  # (N, S, T)
    ends = (normed[..., None] * at_token).sum(axis=1)  # (N, T) r̃ placed at each step's last token
    return mx.cumsum(ends[:, ::-1], axis=1)[:, ::-1]  # (N, T) sum over steps ending at or after t


def token_at_offset(tokenizer, ids: list[int], offset: int) -> int:
    """Index of the first token whose decoded prefix reaches `offset` characters (the token
    that ends a step ending at that offset), decoded as the completion text is (special tokens
    skipped). Binary search over prefix decodes: O(log T)."""
    lo, hi = 0, len(ids) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if len(decode_text(tokenizer, ids[: mid + 1])) >= offset:  # offsets count in the text rewards saw
            hi = mid
        else:
            lo = mid + 1
    return max(lo, 0)


def step_arrays(tokenizer, steps: list, completion_ids: list[list[int]]):
    """Pad each completion's (offset, reward) steps into arrays: rewards (N, S), token index
    (N, S), mask (N, S). Steps past the end of the tokens land on the last token."""
    n = len(steps)
    s = max([len(x) for x in steps if x] + [1])
    rewards = np.zeros((n, s), np.float32)  # (N, S)
    index = np.zeros((n, s), np.int32)  # (N, S)
    mask = np.zeros((n, s), np.float32)  # (N, S)
    for i, row in enumerate(steps):
        if not row or not completion_ids[i]:
            continue
        for j, (offset, reward) in enumerate(row):
            rewards[i, j] = reward
            index[i, j] = token_at_offset(tokenizer, completion_ids[i], offset)
            mask[i, j] = 1.0
    return mx.array(rewards), mx.array(index), mx.array(mask)


def compute_advantages(
    per_function: dict,
    totals: np.ndarray,
    steps: dict,
    step_weights: dict,
    *,
    group_size: int,
    weights: list[float] | None,
    combination: str,
    scale: str,
    baseline: str,
    tokenizer,
    completion_ids: list[list[int]],
    num_tokens: int,
    rows: slice = slice(None),
):
    """Advantages for one step's batch of B groups of G: (N,) from outcome rewards, or (N, T)
    when any reward function gave step rewards (outcome advantage broadcast + process part).
    With several ranks, per_function and totals hold the global batch and `rows` picks this
    rank's completions; steps and completion_ids are this rank's own (groups never straddle ranks)."""
    G = group_size
    B = len(totals) // G
    by_name = dict(zip(per_function, weights or [1.0] * len(per_function)))
    outcome = [name for name in per_function if name not in steps]
    if combination == "normalize_each" and len(outcome) > 1:
        stacked = np.stack([np.nan_to_num(per_function[k]).reshape(B, G) for k in outcome])  # (K, B, G)
        adv = combined_advantages(
            mx.array(stacked), [by_name[k] for k in outcome], "normalize_each", scale, baseline=baseline
        )  # (B, G)
    else:
        adv = group_advantages(mx.array(totals.reshape(B, G), dtype=mx.float32), scale, baseline=baseline)  # (B, G)
    adv = adv.reshape(-1)[rows]  # (N,)
    if not steps:
        return adv
    per_token = mx.broadcast_to(adv[:, None], (adv.shape[0], num_tokens))  # (N, T)
    for name, fn_steps in steps.items():
        rewards, index, mask = step_arrays(tokenizer, fn_steps, completion_ids)  # (N, S) each
        per_token = per_token + step_weights[name] * process_advantages(rewards, index, mask, G, num_tokens)  # (N, T)
    return per_token  # (N, T)


def per_completion(advantages, mask):
    """One advantage per completion, for display: (N,) as is, or the mean of an (N, T) per-token
    advantage over each completion's tokens (mask (N, T))."""
    if advantages.ndim == 1:
        return advantages  # (N,)
    return (advantages * mask).sum(axis=1) / mx.maximum(mask.sum(axis=1), 1)  # (N,)
