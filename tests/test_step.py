"""Each stage of the step on its own, with injected sampling and scoring: what the data stream
yields, what dynamic sampling keeps, what a batch holds, and that a non-finite update is never
applied."""

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest

from grpo_mlx.batch import Group, bucket, make_batch
from grpo_mlx.rewards import RewardResult
from grpo_mlx.sampler import Rollout
from grpo_mlx.step import Timing, batch_at, collect_groups, update_policy
from grpo_mlx.world import World


def examples(n):
    return [{"prompt": f"q{i}", "prompt_text": f"q{i}", "prompt_ids": [1 + i, 2], "answer": str(i)} for i in range(n)]


def fake_sample(G, length=3):
    """A rollout whose completion tokens name the prompt (its first id) and the sample."""
    calls = []

    def sample(chosen, seeds):
        calls.append((list(chosen), list(seeds)))
        n = len(chosen) * G
        tokens = np.array([[ex["prompt_ids"][0]] * length for ex in chosen for _ in range(G)], dtype=np.int32)
        return Rollout(
            tokens,
            np.full((n, length), -0.5, np.float32),
            np.full(n, length),
            ["stop"] * n,
            [f"{ex['answer']}:{g}" for ex in chosen for g in range(G)],
            sum(len(e["prompt_ids"]) for e in chosen),
        )

    return sample, calls


def score_by(rule):
    """Rewards from rule(example, g): one outcome function named 'r'."""

    def score(chosen, roll):
        G = len(roll.texts) // len(chosen)
        r = np.array([rule(ex, g) for ex in chosen for g in range(G)], dtype=np.float64)
        return RewardResult({"r": r}, r.copy())

    return score


def test_batch_at_walks_per_epoch_shuffles_without_repeats():
    first = batch_at(10, 0, 0, 10)
    assert sorted(first) == list(range(10))
    assert batch_at(10, 0, 3, 4) == first[3:7]
    across = batch_at(10, 0, 8, 4)  # two from epoch 0, two from epoch 1
    assert across[:2] == first[8:] and across[2:] == batch_at(10, 0, 10, 2)
    assert batch_at(10, 1, 0, 10) != first  # the seed changes the order


def test_collect_groups_draws_the_stream_and_keys_seeds_by_position():
    sample, calls = fake_sample(G=2)
    timing = Timing()
    got = collect_groups(
        examples(6),
        4,
        batch_size=3,
        group_size=2,
        seed=0,
        world=World(),
        sample=sample,
        score=score_by(lambda ex, g: g),
        timing=timing,
    )
    assert got.position == 7 and got.resample_rounds == 0
    assert [g.example for g in got.groups] == [examples(6)[i] for i in batch_at(6, 0, 4, 3)]
    from grpo_mlx.step import prompt_seed

    assert calls[0][1] == [prompt_seed(0, p) for p in (4, 5, 6)]
    assert all(g.rollout.tokens.shape == (2, 3) and list(g.rewards.total) == [0.0, 1.0] for g in got.groups)
    assert got.frac_reward_zero_std == 0.0 and timing["rollout"] >= 0 and set(timing) >= {"rollout", "rewards"}


def test_dynamic_sampling_replaces_flat_groups_and_counts_them():
    sample, calls = fake_sample(G=2)
    informative = {"1", "3"}  # only these prompts get rewards that differ within the group
    score = score_by(lambda ex, g: float(g) if ex["answer"] in informative else 1.0)
    data = examples(8)
    got = collect_groups(
        data,
        0,
        batch_size=2,
        group_size=2,
        seed=0,
        world=World(),
        sample=sample,
        score=score,
        timing=Timing(),
        dynamic_sampling=True,
        max_resample_rounds=10,
    )
    assert sorted(g.example["answer"] for g in got.groups) == ["1", "3"]
    assert not any(g.zero_std for g in got.groups)
    drawn = sum(len(c[0]) for c in calls)
    assert got.position == drawn and got.resample_rounds == len(calls) - 1
    assert got.frac_reward_zero_std == pytest.approx((drawn - 2) / drawn)


def test_dynamic_sampling_trains_on_the_last_round_when_every_group_is_flat():
    sample, calls = fake_sample(G=2)
    got = collect_groups(
        examples(8),
        0,
        batch_size=2,
        group_size=2,
        seed=0,
        world=World(),
        sample=sample,
        score=score_by(lambda ex, g: 1.0),
        timing=Timing(),
        dynamic_sampling=True,
        max_resample_rounds=2,
    )
    assert len(calls) == 3 and got.resample_rounds == 2 and len(got.groups) == 2
    assert all(g.zero_std for g in got.groups) and got.frac_reward_zero_std == 1.0


def test_make_batch_concatenates_groups_of_different_lengths():
    def group(answer, length):
        ex = {"prompt": "p", "prompt_text": "p", "prompt_ids": [5, 6, 7], "answer": answer}
        tokens = np.full((2, length), 9, np.int32)
        roll = Rollout(
            tokens, np.zeros((2, length), np.float32), np.array([length, 1]), ["length", "stop"], ["a", "b"], 3
        )
        r = np.array([1.0, 0.0])
        return Group(ex, roll, RewardResult({"r": r}, r.copy()), False)

    batch = make_batch([group("x", 2), group("y", 5)], group_size=2, pad_id=0)
    assert batch.rollout.tokens.shape == (4, 5) and batch.rollout.prompt_tokens == 6
    assert batch.completion_ids == [[9, 9], [9], [9] * 5, [9]]
    assert batch.mask.shape == (4, bucket(5)) and batch.mask.sum().item() == 2 + 1 + 5 + 1
    assert batch.tokens.shape == (4, bucket(3 + bucket(5))) and list(np.array(batch.prompt_lens)) == [3] * 4
    assert list(batch.rewards.total) == [1.0, 0.0, 1.0, 0.0] and [e["answer"] for e in batch.examples] == ["x", "y"]


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = mx.ones((2,))


def test_update_policy_never_applies_a_non_finite_update():
    model = Tiny()
    optimizer = optim.SGD(learning_rate=0.1)
    before = np.array(model.w)

    def loss_and_grad(tokens, prompt_lens, mask, adv, old, ref, n_items):
        loss = mx.array(float("nan"))
        return loss, {}, mx.zeros(mask.shape), {"w": mx.array([float("inf"), 1.0])}

    batch = make_batch(
        [
            Group(
                {"prompt": "p", "prompt_text": "p", "prompt_ids": [1]},
                Rollout(
                    np.ones((2, 1), np.int32), np.zeros((2, 1), np.float32), np.array([1, 1]), ["stop"] * 2, ["", ""], 1
                ),
                RewardResult({"r": np.zeros(2)}, np.zeros(2)),
                True,
            )
        ],
        2,
        0,
    )
    update = update_policy(
        model,
        optimizer,
        loss_and_grad,
        batch,
        mx.zeros((2,)),
        None,
        num_iterations=2,
        micro_batches=1,
        max_grad_norm=1.0,
        world=World(),
    )
    assert update.skipped and len(update.grad_norms) == 1  # stopped at the first bad pass
    np.testing.assert_array_equal(np.array(model.w), before)


def test_world_of_one_process_passes_values_through():
    world = World()
    assert world.size == 1 and world.is_main
    x = np.arange(4)
    assert world.gather(x) is x and world.share([1, 2, 3]) == [1, 2, 3] and world.own_rows(4) == slice(0, 4)
    assert world.any(False) is False and world.same_everywhere({"a": 1})
    assert bool(world.all(mx.array(True)).item())
