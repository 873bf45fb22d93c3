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

    def loss_and_grad(tokens, prompt_lens, mask, adv, old, ref, n_items, extra):
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


# ------------------------------------------------------------------ the objective's batch-wide options
# A real batch from the demo (its model, sampler and rewards), updated with plain SGD at lr 1, so
# the change of the adapters is minus the gradient, and compared between runs from the same start.


@pytest.fixture(scope="module")
def demo():
    from grpo_mlx import data, prompts
    from grpo_mlx.config import build_config
    from grpo_mlx.policy import add_adapters, load_model
    from grpo_mlx.trainer import Trainer

    cfg = build_config({"batch_size": 4, "group_size": 4, "eval_limit": 0, "max_completion_length": 12})
    model, tokenizer = load_model(cfg.model)
    adapter_config = add_adapters(model, cfg)
    train = prompts.prepare_examples(data.load_split(cfg.data, "train")[:8], tokenizer)
    t = Trainer.from_parts(cfg, model, tokenizer, train, adapter_config=adapter_config)
    collected = collect_groups(t.train_examples, 0, world=t.world, sample=t.sample, score=t.score, timing=Timing(),
                               **t._sampling)  # fmt: skip
    batch = make_batch(collected.groups, 4, t.pad_id)
    n = batch.tokens.shape[0]
    adv = mx.array(np.random.default_rng(0).normal(size=n).astype(np.float32))  # (N,) a signal on every row
    return t, batch, adv


def adapter_change(t, batch, adv, *, micro_batches=1, objective=None, **loss_options):
    """The change one SGD step (lr 1) makes to the adapters; the model is restored after."""
    from mlx.utils import tree_unflatten

    from grpo_mlx.policy import snapshot_adapters
    from grpo_mlx.step import Objective, make_loss_and_grad

    objective = objective or Objective()
    start = snapshot_adapters(t.model)
    loss_and_grad = make_loss_and_grad(t.model, 1.0, entropy=objective.entropy, **loss_options)
    update = update_policy(t.model, optim.SGD(learning_rate=1.0), loss_and_grad, batch, adv, None, num_iterations=1,
                           micro_batches=micro_batches, max_grad_norm=0.0, world=World(), objective=objective,
                           temperature=1.0)  # fmt: skip
    after = snapshot_adapters(t.model)
    t.model.update(tree_unflatten(list(start.items())))
    change = np.concatenate([(np.array(after[k]) - np.array(start[k])).ravel() for k in sorted(start)])
    return change, {k: float(mx.mean(mx.stack(v)).item()) for k, v in update.metrics.items()}


def with_rollout(batch, **fields):
    import dataclasses

    return dataclasses.replace(batch, rollout=dataclasses.replace(batch.rollout, **fields))


def test_entropy_mask_uses_the_whole_batch_threshold_in_micro_batches(demo):
    from grpo_mlx.step import Objective

    t, batch, adv = demo
    # 0.24 puts the threshold at q(n-1) = 0.76 * 48 = 36.48 of the 49 sorted entropies, inside a wide
    # gap (0.062 | 0.633), so float noise between a whole and a split pass (~1e-6) moves no token
    # across it; elsewhere near-equal entropies (a group's rows share contexts) sit on the threshold
    q = Objective(top_entropy_quantile=0.24)
    whole, m = adapter_change(t, batch, adv, objective=q, loss_type="dapo", top_entropy_quantile=0.24)
    split, m2 = adapter_change(t, batch, adv, micro_batches=2, objective=q, loss_type="dapo", top_entropy_quantile=0.24)
    np.testing.assert_allclose(split, whole, atol=1e-6 * np.abs(whole).max())
    plain, _ = adapter_change(t, batch, adv, loss_type="dapo")
    assert np.abs(plain - whole).max() > 1e-3 * np.abs(plain).max(), "the mask changes the update"
    assert int(batch.mask.sum().item()) == 49, "the demo batch the comment above counts"
    assert m["entropy_mask/kept_mean"] == pytest.approx(12 / 49)  # sorted positions 37..48
    # split: the mean of the two micro-batches' fractions, as TRL averages its logged figures
    assert m2["entropy_mask/kept_mean"] == pytest.approx(12 / 49, abs=0.02)


def test_truncated_completions_leave_the_loss(demo):
    from grpo_mlx.step import Objective

    t, batch, adv = demo
    n = batch.tokens.shape[0]
    reasons = ["length" if i % 3 == 0 else "stop" for i in range(n)]
    cut = with_rollout(batch, finish_reasons=reasons)
    masked, _ = adapter_change(t, cut, adv, objective=Objective(mask_truncated=True))
    zeroed = mx.array(np.where([r == "length" for r in reasons], 0.0, np.array(adv)).astype(np.float32))
    expected, _ = adapter_change(t, batch, zeroed)  # grpo, beta 0: a row without advantage adds nothing
    np.testing.assert_allclose(masked, expected, atol=1e-7)
    everything = with_rollout(batch, finish_reasons=["length"] * n)
    none, _ = adapter_change(t, everything, adv, objective=Objective(mask_truncated=True))
    assert not none.any()
    unmasked, _ = adapter_change(t, cut, adv)  # without the option truncation changes nothing
    assert np.abs(unmasked - masked).max() > 0


def policy_logprobs_as_sampled(t, batch):
    from grpo_mlx.step import policy_pass

    logp, _ = policy_pass(t.model, batch, 1.0, [slice(0, batch.tokens.shape[0])], entropy=False)
    width = batch.rollout.logprobs.shape[1]
    return np.array(logp)[:, :width] * batch.rollout.mask  # (N, t)


def test_mismatch_correction_masks_exactly_the_far_sequences(demo):
    from grpo_mlx.step import Objective

    t, batch, adv = demo
    sampled = policy_logprobs_as_sampled(t, batch)  # the sampler agrees with the trainer: weights 1
    far = 1
    sampled[far] -= 1.0 * batch.rollout.mask[far]  # ratio e^len > 3 on that sequence
    shifted = with_rollout(batch, logprobs=sampled.astype(np.float32))
    correction = Objective(mismatch=dict(mode="sequence_mask", clip_max=3.0, clip_min=None))
    corrected, m = adapter_change(t, shifted, adv, objective=correction)
    zeroed = np.array(adv)
    zeroed[far] = 0.0
    expected, _ = adapter_change(t, batch, mx.array(zeroed))
    np.testing.assert_allclose(corrected, expected, atol=1e-6 * np.abs(expected).max())
    assert m["sampling/importance_sampling_ratio/mean"] == pytest.approx((len(zeroed) - 1) / len(zeroed))
    assert m["sampling/sampling_logp_difference/max"] == pytest.approx(1.0, abs=1e-5)


def test_off_policy_mask_drops_negative_far_sequences_only(demo):
    from grpo_mlx.step import Objective

    t, batch, adv = demo
    a = np.array(adv)
    neg, pos = int(np.argmin(a)), int(np.argmax(a))
    sampled = policy_logprobs_as_sampled(t, batch)
    for row in (neg, pos):
        sampled[row] += 1.0 * batch.rollout.mask[row]  # KL(sampler || policy) of 1 per token
    shifted = with_rollout(batch, logprobs=sampled.astype(np.float32))
    masked, m = adapter_change(
        t, shifted, adv, objective=Objective(off_policy_mask=True), off_policy_mask_threshold=0.5
    )
    zeroed = a.copy()
    zeroed[neg] = 0.0  # the positive one stays
    expected, _ = adapter_change(t, batch, mx.array(zeroed))
    np.testing.assert_allclose(masked, expected, atol=1e-6 * np.abs(expected).max())
    assert m["off_policy_mask/dropped_mean"] > 0


def test_mismatch_is_measured_without_the_correction(demo):
    t, batch, adv = demo
    _, m = adapter_change(t, batch, adv)
    assert 0 <= m["sampling/sampling_logp_difference/mean"] < 1e-3  # the sampler and trainer agree
    assert "sampling/importance_sampling_ratio/mean" not in m


def test_micro_batches_hold_one_slice_of_activations_at_a_time(demo):
    """Gradient accumulation evaluates each slice before the next: the peak falls with the slices
    (when all slices' graphs were built first and evaluated together, 4 slices peaked as 1 did),
    and the update is the one-batch update."""
    t, batch, adv = demo
    peaks, changes = {}, {}
    for k in (1, 4):
        mx.eval(t.model.parameters())
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        changes[k], _ = adapter_change(t, batch, adv, micro_batches=k)
        peaks[k] = mx.get_peak_memory() - base
    assert peaks[4] < 0.6 * peaks[1], peaks
    assert np.abs(changes[4] - changes[1]).max() < 1e-5 * np.abs(changes[1]).max()
