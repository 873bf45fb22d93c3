"""grpo_mlx.loss (the GRPO-family loss, KL estimators) against numbers worked out by hand
(derivations in the comments)."""

import mlx.core as mx
import numpy as np
import pytest

from grpo_mlx.loss import masked_mean, policy_loss

TOL = dict(rtol=1e-5, atol=1e-6)


def close(actual, expected):
    np.testing.assert_allclose(np.array(actual), np.array(expected, dtype=np.float64), **TOL)


# A (N=2, T=3) batch whose second sequence has one padding token. The padding position holds
# junk values that would change every number below if the mask leaked.
MASK = mx.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # (2, 3)


# --------------------------------------------------------------------------- loss types + KL

# Ratio 1 (logp == old_logp), beta = 0.1, A = [1, -0.5].
#   ref − logp:  row 0 [0, 0.5, -0.2], row 1 [0, 0.2, pad]
#   k3(d) = e^d − d − 1:  k3(0.5) = 0.1487212707, k3(-0.2) = 0.0187307531,
#                         k3(0.2) = 0.0214027582
#   per token −A + 0.1·k3:  row 0 [-1, -0.9851278729, -0.9981269247]  sum -2.9832547976
#                           row 1 [0.5, 0.5021402758]                 sum  1.0021402758
#   all-token sum -1.9811145218 over 5 tokens
KL_LOGP = mx.array([[-1.0, -2.0, -0.5], [-0.3, -1.2, -9.0]])  # (2, 3)
KL_REF = mx.array([[-1.0, -1.5, -0.7], [-0.3, -1.0, 0.0]])  # (2, 3)
KL_ADV = mx.array([1.0, -0.5])  # (2,)


def kl_loss(loss_type, **kw):
    return policy_loss(KL_LOGP, KL_LOGP, KL_REF, KL_ADV, MASK, loss_type=loss_type, beta=0.1, **kw)


@pytest.mark.parametrize(
    "loss_type, kw, expected",
    [
        # mean of the sequence means: (-2.9832547976/3 + 1.0021402758/2) / 2
        ("grpo", {}, -0.24667406398302733),
        ("bnpo", {}, -0.3962229043612345),  # -1.9811145218 / 5
        ("dr_grpo", {"max_completion_length": 4}, -0.24763931522577154),  # / (2·4)
        ("dr_grpo", {}, -0.33018575363436203),  # max_completion_length None → T: / (2·3)
        ("dapo", {"num_items_in_batch": 10}, -0.19811145218061724),  # / 10
        ("dapo", {}, -0.3962229043612345),  # None → this batch's 5 tokens, = bnpo
    ],
)
def test_loss_types_with_kl(loss_type, kw, expected):
    loss, metrics = kl_loss(loss_type, **kw)
    assert loss.shape == ()
    close(loss, expected)
    # kl: (0 + 0.1487212707 + 0.0187307531 + 0 + 0.0214027582) / 5 masked tokens
    close(metrics["kl"], 0.037770956387656)


def test_metrics_are_lazy_scalars_and_kl_only_with_beta():
    _, metrics = policy_loss(KL_LOGP, KL_LOGP, KL_REF, KL_ADV, MASK)
    assert "kl" not in metrics
    assert set(metrics) == {"clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"}
    assert all(isinstance(v, mx.array) and v.shape == () for v in metrics.values())
    _, metrics = kl_loss("grpo")
    assert isinstance(metrics["kl"], mx.array) and metrics["kl"].shape == ()


def test_bool_mask_equals_float_mask():
    loss_f, _ = kl_loss("grpo")
    loss_b, _ = policy_loss(KL_LOGP, KL_LOGP, KL_REF, KL_ADV, MASK.astype(mx.bool_), beta=0.1)
    close(loss_b, np.array(loss_f))


# --------------------------------------------------------------------------- clipping (μ > 1)

# old_logp = [[-1]*3, [-2]*3], logp = old + log ρ. ε_low = 0.2, A = [1, -2].
#   ρ row 0 [1.5, 0.5, 1.25] with A = +1, row 1 [0.5, 1.5, pad 0.1] with A = −2.
# With ε_high = 0.28 (clip range [0.8, 1.28]):
#   row 0: 1.5 → high clip, −1.28; 0.5 (A > 0: unclipped 0.5 < 0.8 is the min) → −0.5;
#          1.25 → −1.25
#   row 1: 0.5 → low clip, −min(−1, −1.6) = 1.6; 1.5 (A<0: unclipped −3 < −2.56) → 3.0
#   grpo: (−3.03/3 + 4.6/2) / 2 = (−1.01 + 2.3) / 2 = 0.645
#   low 1/5, high 1/5, region 2/5 (the padding token, ρ = 0.1 with A < 0, must not count)
# With ε_high = ε_low = 0.2 (range [0.8, 1.2]): row 0 token 2 now clips too, −1.2;
#   grpo: (−2.9/3 + 2.3) / 2 = 0.6666667; low 1/5, high 2/5, region 3/5
CLIP_OLD = mx.array([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])  # (2, 3)
CLIP_RATIO = np.array([[1.5, 0.5, 1.25], [0.5, 1.5, 0.1]])
CLIP_LOGP = CLIP_OLD + mx.array(np.log(CLIP_RATIO).astype(np.float32))  # (2, 3)
CLIP_ADV = mx.array([1.0, -2.0])  # (2,)


def test_clip_higher_asymmetric():
    loss, m = policy_loss(CLIP_LOGP, CLIP_OLD, None, CLIP_ADV, MASK, epsilon=0.2, epsilon_high=0.28)
    close(loss, 0.645)
    close(m["clip_ratio/low_mean"], 0.2)
    close(m["clip_ratio/high_mean"], 0.2)
    close(m["clip_ratio/region_mean"], 0.4)
    loss, _ = policy_loss(CLIP_LOGP, CLIP_OLD, None, CLIP_ADV, MASK, loss_type="bnpo", epsilon_high=0.28)
    close(loss, (-3.03 + 4.6) / 5)


def test_clip_symmetric_default():
    loss, m = policy_loss(CLIP_LOGP, CLIP_OLD, None, CLIP_ADV, MASK, epsilon=0.2)
    close(loss, (-2.9 / 3 + 2.3) / 2)
    close(m["clip_ratio/low_mean"], 0.2)
    close(m["clip_ratio/high_mean"], 0.4)
    close(m["clip_ratio/region_mean"], 0.6)


def test_zero_advantage_never_counts_as_clipped():
    # ρ row 0 = 1.5 (above 1.28), row 1 = 0.5 (below 0.8), but A = 0: the min picks neither side
    loss, m = policy_loss(CLIP_LOGP, CLIP_OLD, None, mx.zeros((2,)), MASK, epsilon_high=0.28)
    close(loss, 0.0)
    assert all(float(v) == 0.0 for v in m.values())


def test_clipped_tokens_get_no_gradient():
    def f(logp):
        return policy_loss(logp, CLIP_OLD, None, CLIP_ADV, MASK, epsilon_high=0.28)[0]

    # d/dlogp of −ρA/(n_i·N) is −A·ρ/(n_i·N); clipped tokens and padding give 0.
    #   row 0 (n=3): [0, −0.5/6, −1.25/6]; row 1 (n=2, A=−2): [0, 2·1.5/4, 0]
    close(mx.grad(f)(CLIP_LOGP), [[0.0, -0.5 / 6, -1.25 / 6], [0.0, 0.75, 0.0]])


def test_per_token_advantages_constant_along_t_match_per_sequence():
    per_token = mx.array([[1.0, 1.0, 1.0], [-2.0, -2.0, 7.0]])  # (2, 3), padding value is junk
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        a, ma = policy_loss(CLIP_LOGP, CLIP_OLD, None, CLIP_ADV, MASK, loss_type=loss_type)
        b, mb = policy_loss(CLIP_LOGP, CLIP_OLD, None, per_token, MASK, loss_type=loss_type)
        close(b, np.array(a))
        for k in ma:
            close(mb[k], np.array(ma[k]))


def test_per_token_advantages_varying():
    # ρ = 1, grpo: row 0 −(1+2+3)/3 = −2, row 1 −(−1−1)/2 = 1 → (−2 + 1) / 2 = −0.5
    adv = mx.array([[1.0, 2.0, 3.0], [-1.0, -1.0, 100.0]])  # (2, 3)
    loss, _ = policy_loss(KL_LOGP, KL_LOGP, None, adv, MASK)
    close(loss, -0.5)


# --------------------------------------------------------------------------- ratio 1 (μ = 1)


def test_ratio_one_gives_minus_mean_advantage_and_gradient_prop_to_minus_a():
    def f(logp):
        return policy_loss(logp, mx.stop_gradient(logp), None, KL_ADV, MASK)[0]

    loss, grad = mx.value_and_grad(f)(KL_LOGP)
    close(loss, -(1.0 - 0.5) / 2)  # −mean A
    # d/dlogp_it = −A_i / (n_i · N): row 0 −1/6, row 1 0.5/4, padding 0
    close(grad, [[-1 / 6, -1 / 6, -1 / 6], [0.125, 0.125, 0.0]])
    _, m = policy_loss(KL_LOGP, KL_LOGP, None, KL_ADV, MASK)
    assert all(float(v) == 0.0 for v in m.values())  # with ρ = 1 clipping never fires


# --------------------------------------------------------------------------- GSPO


def test_gspo_sequence_ratio_value_and_gradient():
    # log ρ per token: row 0 [0.3, −0.1, 0.1] → mean 0.1, ρ0 = e^0.1 = 1.1051709181
    #                  row 1 [0.2, −0.8, pad 5] → mean −0.3, ρ1 = e^−0.3 = 0.7408182207
    # A = [1, −1], ε = 0.2: row 0 unclipped, −1.1051709181 per token;
    #                       row 1 ρ < 0.8 with A < 0 → low clip, −min(−0.7408, −0.8) = 0.8
    # grpo: (−1.1051709181 + 0.8) / 2 = −0.1525854590; low clip on 2 of 5 tokens
    old = mx.zeros((2, 3))  # (2, 3)
    logp = mx.array([[0.3, -0.1, 0.1], [0.2, -0.8, 5.0]])  # (2, 3)
    adv = mx.array([1.0, -1.0])  # (2,)

    def f(lp):
        return policy_loss(lp, old, None, adv, MASK, importance_sampling_level="sequence")

    loss, m = f(logp)
    close(loss, -0.15258545903782383)
    close(m["clip_ratio/low_mean"], 0.4)
    close(m["clip_ratio/high_mean"], 0.0)
    close(m["clip_ratio/region_mean"], 0.4)
    # the gradient flows through the sequence mean: row 0 loss −ρ0/2, d/dlogp_0t = −ρ0/(2·3)
    grad = mx.grad(lambda lp: f(lp)[0])(logp)  # (2, 3)
    close(grad, [[-0.18419515301260794] * 3, [0.0, 0.0, 0.0]])


# --------------------------------------------------------------------------- gradient flow


def test_kl_gradient_zero_when_logp_equals_ref():
    def f(logp):
        return policy_loss(logp, KL_LOGP, KL_LOGP, mx.zeros((2,)), MASK, beta=0.5)[0]

    close(mx.grad(f)(KL_LOGP), np.zeros((2, 3)))


def test_kl_gradient_value():
    # one token, A = 0, β = 1, ref − logp = 0.5: d/dlogp [e^d − d − 1] = 1 − e^0.5
    logp, ref = mx.array([[-1.0]]), mx.array([[-0.5]])  # (1, 1)
    g = mx.grad(lambda lp: policy_loss(lp, lp, ref, mx.zeros((1,)), mx.ones((1, 1)), beta=1.0)[0])
    close(g(logp), [[-0.6487212707001282]])


def test_no_gradient_into_old_or_ref():
    def f(logp, old, ref):
        return policy_loss(logp, old, ref, CLIP_ADV, MASK, beta=0.1, loss_type="bnpo")[0]

    g_old, g_ref = mx.grad(f, argnums=(1, 2))(CLIP_LOGP, CLIP_OLD, KL_REF)
    close(g_old, np.zeros((2, 3)))
    close(g_ref, np.zeros((2, 3)))
    for level in ("token", "sequence"):

        def h(old, level=level):
            return policy_loss(CLIP_LOGP, old, None, CLIP_ADV, MASK, importance_sampling_level=level)[0]

        close(mx.grad(h)(CLIP_OLD), np.zeros((2, 3)))


# --------------------------------------------------------------------------- edge cases, errors


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_empty_sequences_give_no_nan(loss_type, level):
    mask = mx.array([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])  # (2, 3), second sequence is all padding
    loss, m = policy_loss(
        CLIP_LOGP,
        CLIP_OLD,
        KL_REF,
        CLIP_ADV,
        mask,
        loss_type=loss_type,
        importance_sampling_level=level,
        beta=0.1,
    )
    assert np.isfinite(np.array(loss))
    assert all(np.isfinite(np.array(v)) for v in m.values())
    loss, m = policy_loss(
        CLIP_LOGP,
        CLIP_OLD,
        KL_REF,
        CLIP_ADV,
        mx.zeros((2, 3)),
        beta=0.1,
        loss_type=loss_type,
        importance_sampling_level=level,
    )
    close(loss, 0.0)
    close(m["kl"], 0.0)


def test_masked_mean():
    x = mx.array([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])  # (2, 3)
    close(masked_mean(x, MASK), 15.0 / 5)
    close(masked_mean(x, MASK, axis=1), [2.0, 4.5])
    close(masked_mean(x, mx.zeros((2, 3)), axis=1), [0.0, 0.0])


def test_loss_errors():
    args = (KL_LOGP, KL_LOGP, None, KL_ADV, MASK)
    with pytest.raises(ValueError, match="grpo, bnpo, dr_grpo, dapo"):
        policy_loss(*args, loss_type="ppo")
    with pytest.raises(ValueError, match="token, sequence"):
        policy_loss(*args, importance_sampling_level="step")
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(*args, beta=0.04)


# --------------------------------------------------------------------------- log-probs
