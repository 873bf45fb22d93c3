"""grpo_mlx.entropy against hand-worked values and a float64 full-softmax reference (value and
gradient), across several chunks."""

import math

import mlx.core as mx
import numpy as np
import pytest
from mlx import nn

from grpo_mlx.entropy import chunked_token_entropy


def reference(hidden, weight, temperature):
    """Entropy (N, T) and its gradient d Σ c·H / d hidden, float64, from the full softmax."""
    x = hidden @ weight.T / temperature  # (N, T, V)
    x = x - x.max(-1, keepdims=True)
    log_p = x - np.log(np.exp(x).sum(-1, keepdims=True))  # (N, T, V)
    p = np.exp(log_p)
    h = -(p * log_p).sum(-1)  # (N, T)
    dx = -p * (log_p + h[..., None])  # (N, T, V) dH/dx
    return h, dx / temperature @ weight  # (N, T), (N, T, D) per unit cotangent


def head_and_hidden(seed, n=3, t=7, d=5, v=11):
    rng = np.random.default_rng(seed)
    weight = rng.normal(scale=1.5, size=(v, d))  # (V, D)
    hidden = rng.normal(size=(n, t, d))  # (N, T, D)
    head = nn.Linear(d, v, bias=False)
    head.weight = mx.array(weight.astype(np.float32))
    return head, weight.astype(np.float32).astype(np.float64), hidden.astype(np.float32)


def test_hand_values():
    # one row with logits [0, ln 3]: p = [1/4, 3/4],
    #   H = −(¼ ln ¼ + ¾ ln ¾) = 0.3465735903 + 0.2157615543 = 0.5623351446
    # a row of equal logits over V = 2: H = ln 2
    head = nn.Linear(1, 2, bias=False)
    head.weight = mx.array([[0.0], [math.log(3.0)]])  # (V=2, D=1)
    hidden = mx.array([[[1.0], [0.0]]])  # (1, 2, 1): logits [0, ln 3] and [0, 0]
    got = chunked_token_entropy(head, hidden, vocab_size=2)
    np.testing.assert_allclose(np.array(got), [[0.5623351446, math.log(2.0)]], rtol=1e-6)
    # temperature 2 on the first row: logits [0, ln 3 / 2] → p = [1/(1+√3), √3/(1+√3)]
    q = math.sqrt(3.0) / (1 + math.sqrt(3.0))
    expected = -(q * math.log(q) + (1 - q) * math.log(1 - q))
    np.testing.assert_allclose(np.array(chunked_token_entropy(head, hidden[:, :1], 2.0, 2)), [[expected]], rtol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_bytes", [1, 2**20])  # 1 → 16-row chunks: 21 rows take two
def test_value_and_gradient_match_full_softmax(temperature, chunk_bytes):
    head, weight, hidden = head_and_hidden(0)
    cot = np.random.default_rng(1).normal(size=hidden.shape[:2])  # (N, T) an arbitrary cotangent
    want_h, dh_unit = reference(hidden.astype(np.float64), weight, temperature)
    want_grad = dh_unit * cot[..., None]  # (N, T, D)

    def f(h):
        ent, value = chunked_token_entropy(head, h, temperature, 11, chunk_bytes, differentiable=True)  # (N, T)
        return (ent * mx.array(cot.astype(np.float32))).sum(), ent, value

    _, ent, value = f(mx.array(hidden))
    grad = mx.grad(lambda h: f(h)[0])(mx.array(hidden))  # (N, T, D)
    np.testing.assert_allclose(np.array(ent), want_h, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.array(value), np.array(ent))
    np.testing.assert_allclose(np.array(grad), want_grad, rtol=1e-4, atol=1e-5)


def test_reference_gradient_formula_by_finite_differences():
    # the float64 reference's analytic dH/dhidden, checked on its own against central differences
    _, weight, hidden = head_and_hidden(2, n=1, t=2, d=3, v=4)
    hidden = hidden.astype(np.float64)
    _, analytic = reference(hidden, weight, 0.9)
    numeric = np.zeros_like(hidden)
    for idx in np.ndindex(hidden.shape):
        step = np.zeros_like(hidden)
        step[idx] = 1e-6
        hp, _ = reference(hidden + step, weight, 0.9)
        hm, _ = reference(hidden - step, weight, 0.9)
        numeric[idx] = (hp - hm)[idx[:2]] / 2e-6
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


def test_mask_only_entropy_carries_no_gradient():
    head, weight, hidden = head_and_hidden(3)
    x = mx.array(hidden)
    want, _ = reference(hidden.astype(np.float64), weight, 1.0)
    got = chunked_token_entropy(head, x, 1.0, 11, 1)
    np.testing.assert_allclose(np.array(got), want, rtol=1e-5, atol=1e-5)
    grad = mx.grad(lambda h: chunked_token_entropy(head, h, 1.0, 11, 1).sum())(x)
    assert not np.array(grad).any()


def test_bad_temperature():
    head, _, hidden = head_and_hidden(4)
    with pytest.raises(ValueError, match="temperature"):
        chunked_token_entropy(head, mx.array(hidden), 0.0)
