"""How a step's kept groups become one training batch: the `Batch` record the later stages read,
and the padded token arrays of the teacher-forced pass."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from grpo_mlx.rewards import RewardResult
from grpo_mlx.sampler import Rollout

# Sequence lengths are padded to shape buckets so that the compiled step is traced once per bucket,
# not once per length: multiples of BUCKET up to 8 * BUCKET, then four sizes per octave (at most 25%
# padding): 16, 32, ..., 128, 160, 192, 224, 256, 320, ...
BUCKET = 16


@dataclass
class Group:
    """One prompt and its G scored completions, as sampling made them."""

    example: dict
    rollout: Rollout  # G rows
    rewards: RewardResult  # G rows
    zero_std: bool  # every completion got the same total reward: no learning signal


@dataclass
class Batch:
    """B groups of G completions, ready for the teacher-forced pass. Rows are b * G + g."""

    examples: list[dict]  # (B,)
    rollout: Rollout  # (N,) rows
    rewards: RewardResult  # (N,) rows
    tokens: mx.array  # (N, L) int32, [prompt | completion | padding]
    prompt_lens: mx.array  # (N,) int32
    mask: mx.array  # (N, T) float32, 1 on completion tokens

    @property
    def completion_ids(self) -> list[list[int]]:
        return self.rollout.completion_ids


def make_batch(groups: list[Group], group_size: int, pad_id: int) -> Batch:
    """Concatenate the groups' rows in order and build the padded training arrays."""
    examples = [g.example for g in groups]
    rollout = Rollout.concat([g.rollout for g in groups])
    rewards = RewardResult.concat([g.rewards for g in groups])
    tokens, prompt_lens, mask = training_arrays([ex["prompt_ids"] for ex in examples], rollout, group_size, pad_id)
    return Batch(examples, rollout, rewards, tokens, prompt_lens, mask)


def _round_up(n: int, k: int) -> int:
    return max(k, -(-n // k) * k)


def bucket(size: int) -> int:
    """The padded length for `size` tokens (see BUCKET)."""
    granule = BUCKET
    while size > 8 * granule:
        granule *= 2
    return _round_up(size, granule)


def training_arrays(prompt_ids: list[list[int]], rollout: Rollout, group_size: int, pad_id: int):
    """Right-padded [prompt | completion] rows for the teacher-forced pass.
    Returns tokens (N, L), prompt_lens (N,), completion mask (N, T) as mx arrays."""
    n, t = rollout.tokens.shape
    t_pad = bucket(t)
    lens = np.repeat([len(p) for p in prompt_ids], group_size)  # (N,)
    L = bucket(int(lens.max()) + t_pad)
    tokens = np.full((n, L), pad_id, dtype=np.int32)  # (N, L)
    for row in range(n):
        p = prompt_ids[row // group_size]
        tokens[row, : len(p)] = p
        tokens[row, len(p) : len(p) + t] = rollout.tokens[row]
    mask = np.zeros((n, t_pad), dtype=np.float32)  # (N, T)
    mask[:, :t] = rollout.mask
    return mx.array(tokens), mx.array(lens.astype(np.int32)), mx.array(mask)
