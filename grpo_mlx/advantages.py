"""From reward results to the advantages the loss consumes: outcome rewards give one advantage
per completion, process (step) rewards one per token; both may be combined.

Glue between `rewards.RewardResult` and the pure functions of `loss`: the text offsets where
steps end are mapped to token positions here, with the tokenizer.
"""

from __future__ import annotations

import numpy as np

import mlx.core as mx

from grpo_mlx.loss import combined_advantages, group_advantages, process_advantages


def token_at_offset(tokenizer, ids: list[int], offset: int) -> int:
    """Index of the first token whose decoded prefix reaches `offset` characters (the token
    that ends a step ending at that offset). Binary search over prefix decodes: O(log T)."""
    lo, hi = 0, len(ids) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.decode(ids[: mid + 1])) >= offset:
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


def compute_advantages(cfg, per_function: dict, totals: np.ndarray, steps: dict, step_weights: dict,
                       tokenizer, completion_ids: list[list[int]], num_tokens: int, rows: slice = slice(None)):
    """Advantages for one step's batch of B groups of G: (N,) from outcome rewards, or (N, T)
    when any reward function gave step rewards (outcome advantage broadcast + process part).
    With several ranks, per_function and totals hold the global batch and `rows` picks this
    rank's completions; steps and completion_ids are this rank's own (groups never straddle ranks)."""
    G = cfg.group_size
    B = len(totals) // G
    weights = cfg.reward_weights or [1.0] * len(per_function)
    by_name = dict(zip(per_function, weights))
    outcome = [name for name in per_function if name not in steps]
    if cfg.reward_combination == "normalize_each" and len(outcome) > 1:
        stacked = np.stack([np.nan_to_num(per_function[k]).reshape(B, G) for k in outcome])  # (K, B, G)
        adv = combined_advantages(mx.array(stacked), [by_name[k] for k in outcome], "normalize_each",
                                  cfg.scale_rewards, baseline=cfg.advantage_baseline)  # (B, G)
    else:
        adv = group_advantages(mx.array(totals.reshape(B, G), dtype=mx.float32), cfg.scale_rewards,
                               baseline=cfg.advantage_baseline)  # (B, G)
    adv = adv.reshape(-1)[rows]  # (N,)
    if not steps:
        return adv
    per_token = mx.broadcast_to(adv[:, None], (adv.shape[0], num_tokens))  # (N, T)
    for name, fn_steps in steps.items():
        rewards, index, mask = step_arrays(tokenizer, fn_steps, completion_ids)  # (N, S) each
        per_token = per_token + step_weights[name] * process_advantages(rewards, index, mask, G, num_tokens)  # (N, T)
    return per_token  # (N, T)
