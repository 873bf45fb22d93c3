"""grpo_mlx.advantages against numbers worked out by hand: group, batch and no scaling, RLOO,
rewards combined before or after normalisation, process (step) advantages, text offsets to tokens."""

import mlx.core as mx
import numpy as np
import pytest

from grpo_mlx.advantages import (
    combined_advantages,
    group_advantages,
    process_advantages,
    step_arrays,
    token_at_offset,
)


def close(actual, expected, tol=None):
    if tol is None:
        np.testing.assert_allclose(np.array(actual), np.array(expected, dtype=np.float64), rtol=1e-5, atol=1e-5)
    else:
        np.testing.assert_allclose(np.array(actual), np.array(expected, dtype=np.float32), atol=tol, rtol=0)


# --------------------------------------------------------------------------- advantages


def test_group_scale_and_zero_variance_group():
    rewards = mx.array([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])  # (2, 3)
    # group 0: mean 2, sample var (1 + 0 + 1) / 2 = 1 → ±1 / (1 + 1e-4); group 1: all equal → 0
    close(group_advantages(rewards), [[-0.9999000099990001, 0.0, 0.9999000099990001], [0, 0, 0]])
    # two values: mean 0.5, sample var (0.25 + 0.25) / 1 = 0.5 → ±0.5 / (sqrt(0.5) + 1e-4)
    close(group_advantages(mx.array([[0.0, 1.0]])), [[-0.7070067953266834, 0.7070067953266834]])


def test_zero_variance_is_finite_even_with_inexact_floats():
    adv = group_advantages(mx.array([[0.1, 0.1, 0.1, 0.1], [0.7, 0.7, 0.7, 0.7]]))  # (2, 4)
    assert np.isfinite(np.array(adv)).all()
    close(adv, np.zeros((2, 4)))


def test_group_of_one_gives_zero_not_nan():
    close(group_advantages(mx.array([[3.0], [-1.0]])), [[0.0], [0.0]])


def test_batch_scale():
    rewards = mx.array([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])  # (2, 3)
    # centred by group mean: [-1, 0, 1], [0, 0, 0]; batch of 6: mean 3.5,
    # squared deviations 6.25 + 2.25 + 0.25 + 3·2.25 = 15.5, sample var 15.5 / 5 = 3.1
    a = 0.5679295780145796  # 1 / (sqrt(3.1) + 1e-4)
    close(group_advantages(rewards, scale="batch"), [[-a, 0.0, a], [0.0, 0.0, 0.0]])


def test_no_scale():
    rewards = mx.array([[1.0, 2.0, 6.0], [5.0, 5.0, 5.0]])  # (2, 3), group means 3 and 5
    close(group_advantages(rewards, scale="none"), [[-2.0, -1.0, 3.0], [0.0, 0.0, 0.0]])


def test_advantage_errors():
    with pytest.raises(ValueError, match="group, batch, none"):
        group_advantages(mx.array([[1.0, 2.0]]), scale="rank")
    with pytest.raises(ValueError, match=r"\(B, G\)"):
        group_advantages(mx.array([1.0, 2.0]))


def test_process_advantages_worked_example():
    """DeepSeekMath §4.1.3 on a group of two completions of five tokens.
    Completion 0: steps end at tokens 1 and 4 with rewards 1 and 0.
    Completion 1: steps end at tokens 2 and 3 with rewards 1 and 1.
    The group's step rewards R = {1, 0, 1, 1}: mean 0.75, sample std sqrt(0.75/3) = 0.5,
    so the normalised rewards are 0.5, -1.5 (completion 0) and 0.5, 0.5 (completion 1).
    A token's advantage is the sum over the steps that end at or after it:
      completion 0: t0..1: 0.5 - 1.5 = -1.0;  t2..4: -1.5
      completion 1: t0..2: 0.5 + 0.5 = 1.0;   t3: 0.5;   t4: no step left = 0"""
    rewards = mx.array([[1.0, 0.0], [1.0, 1.0]])
    index = mx.array([[1, 4], [2, 3]])
    mask = mx.ones((2, 2))
    adv = process_advantages(rewards, index, mask, group_size=2, num_tokens=5, eps=0.0)
    close(adv, [[-1.0, -1.0, -1.5, -1.5, -1.5], [1.0, 1.0, 1.0, 0.5, 0.0]])


def test_process_advantages_ignore_padded_steps_and_separate_groups():
    # two groups of one... of two completions each; group 2 has a padded step that must not count
    rewards = mx.array([[1.0, 0.0], [0.0, 0.0], [2.0, 9.0], [0.0, 9.0]])
    index = mx.array([[0, 1], [0, 1], [0, 0], [0, 0]])
    mask = mx.array([[1, 1], [1, 1], [1, 0], [1, 0]])
    adv = np.array(process_advantages(rewards, index, mask, group_size=2, num_tokens=2, eps=0.0))
    # group 2: R = {2, 0}: mean 1, std sqrt(2) -> +-0.7071 at token 0, nothing after it
    close(adv[2:], [[0.70710677, 0.0], [-0.70710677, 0.0]])
    # group 1: R = {1, 0, 0, 0}: mean 0.25, std 0.5 -> 1.5, -0.5, -0.5, -0.5
    close(adv[:2], [[1.0, -0.5], [-1.0, -0.5]])


class CharTokenizer:
    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_offsets_map_to_tokens():
    tok = CharTokenizer()
    ids = [ord(c) for c in "12\n34"]
    assert token_at_offset(tok, ids, 1) == 0 and token_at_offset(tok, ids, 3) == 2 and token_at_offset(tok, ids, 5) == 4
    rewards, index, mask = step_arrays(tok, [[(3, 1.0), (5, 0.0)], None], [ids, ids])
    assert np.array(index).tolist() == [[2, 4], [0, 0]] and np.array(mask).tolist() == [[1, 1], [0, 0]]


# ------------------------------------------------------------------ advantages


def test_leave_one_out_baseline():
    # r = [1, 0, 0, 1]: r_i - mean of the other three = [1 - 1/3, -2/3, -2/3, 1 - 1/3]
    adv = group_advantages(mx.array([[1.0, 0.0, 0.0, 1.0]]), "none", baseline="leave_one_out")
    close(adv, [[2 / 3, -2 / 3, -2 / 3, 2 / 3]])


def test_rewards_combined_before_or_after_normalisation():
    r1 = [1.0, 0.0, 0.0]  # mean 1/3, sample std sqrt(1/3) = 0.57735 -> 1.1547, -0.57735, -0.57735
    r2 = [0.0, 0.0, 30.0]  # mean 10, sample std sqrt(300) = 17.3205 -> -0.57735, -0.57735, 1.1547
    rewards = mx.array([[r1], [r2]])  # (K=2, B=1, G=3)
    close(combined_advantages(rewards, [1.0, 1.0], "normalize_each", eps=0.0), [[0.57735, -1.1547, 0.57735]], 1e-4)
    # summed first: [1, 0, 30], mean 31/3, sample std sqrt(290.333) = 17.0392
    close(
        combined_advantages(rewards, [1.0, 1.0], "sum", eps=0.0),
        [[(1 - 31 / 3) / 17.0392, (0 - 31 / 3) / 17.0392, (30 - 31 / 3) / 17.0392]],
        1e-4,
    )
