"""grpo_mlx.loss (the GRPO-family loss, KL estimators) against numbers worked out by hand
(derivations in the comments)."""

import math

import mlx.core as mx
import numpy as np
import pytest

from grpo_mlx.loss import (
    applied_entropy_coef,
    entropy_mask,
    entropy_threshold,
    gamma_weights,
    masked_mean,
    mismatch_weights,
    mix_reference,
    next_entropy_coef,
    off_policy_mask,
    policy_loss,
)

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
    # TRL's five clip figures: the token fractions and the per-sequence extremes
    assert set(metrics) == {
        "clip_ratio/low_mean",
        "clip_ratio/high_mean",
        "clip_ratio/region_mean",
        "clip_ratio/low_min",
        "clip_ratio/high_max",
    }
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


# =========================================================================== the 2025-26 toolbox
# Each loss type and option: a tiny case worked by hand (in the comment), then an independent
# float64 numpy implementation (np_loss below) for the loss and its gradient w.r.t. logp
# (central finite differences, with the detached quantities held at the base point).


def np_loss(  # noqa: C901 -- one independent float64 reference of every loss type, kept in one piece
    x,
    x0,
    old,
    ref,
    adv,
    mask,
    loss_type="grpo",
    eps=0.2,
    eps_high=None,
    beta=0.0,
    level="token",
    n_items=None,
    delta=None,
    truncated=None,
    entropy=None,
    thr=None,
    coef=0.0,
    sampling=None,
    opm=None,
    isr=None,
    bias=False,
    L=None,
):
    """float64 reference of policy_loss; `x` varies, `x0` is the point the detached terms use."""
    eh = eps if eps_high is None else eps_high
    mask = mask.astype(np.float64)
    if truncated is not None:
        mask = mask * (1 - truncated.astype(np.float64))[:, None]
    n_tok = mask.sum(1)  # (N,)
    A = adv[:, None] if adv.ndim == 1 else adv
    keep_h = None if thr is None else ((entropy >= thr) & (mask > 0)).astype(np.float64)
    keep_pi = None
    if opm is not None:
        s = old if sampling is None else sampling
        kl_seq = ((s - x0) * mask).sum(1) / np.maximum(n_tok, 1)
        keep_pi = ((A >= 0) | (kl_seq[:, None] <= opm)).astype(np.float64)

    def ratio_of(v):
        lr = v - old
        if level == "sequence":
            lr = ((lr * mask).sum(1) / np.maximum(n_tok, 1))[:, None]
        return np.exp(lr)

    rho, rho0 = ratio_of(x), ratio_of(x0)
    kl = None
    if beta:
        d = ref - x
        kl = np.exp(d) - d - 1
        if bias:
            kl = kl * rho
    if loss_type == "gmpo":
        lr = x - old
        cl = np.clip(lr, -eps, eh)
        cl = np.where(A > 0, np.minimum(lr, cl), np.maximum(lr, cl))
        sm = mask if keep_h is None else mask * keep_h
        per_seq = -np.exp((cl * sm).sum(1) / np.maximum(sm.sum(1), 1)) * adv
        if keep_pi is not None:
            per_seq = per_seq * keep_pi[:, 0]
        if kl is not None:
            per_seq = per_seq + beta * (kl * mask).sum(1) / np.maximum(n_tok, 1)
        loss = per_seq.mean()
    else:
        if loss_type == "cispo":
            pt = -np.minimum(rho0, 5.0 if eps_high is None else eps_high) * A * x
        elif loss_type == "sapo":
            tau = np.where(A > 0, 1.0, 1.05)
            pt = -4 / tau / (1 + np.exp(-tau * (rho - 1))) * A * np.ones_like(x)
        elif loss_type == "vespo":
            s = ((x0 - old) * mask).sum(1, keepdims=True)
            if isr is not None:
                s = s + (np.log(isr) * mask).sum(1, keepdims=True)
            k, lam = np.where(A >= 0, 2.0, 3.0), np.where(A >= 0, 3.0, 2.0)
            pt = -np.exp(lam + k * s - lam * np.exp(s)) * A * x
        else:
            un = rho if delta is None else np.minimum(rho, delta)
            pt = -np.minimum(un * A, np.clip(rho, 1 - eps, 1 + eh) * A) * np.ones_like(x)
        for w in (keep_pi, keep_h):
            if w is not None:
                pt = pt * w
        if isr is not None and loss_type != "vespo":
            pt = pt * isr
        if kl is not None:
            pt = pt + beta * kl
        count = None
        if loss_type in ("grpo", "sapo"):
            loss = ((pt * mask).sum(1) / np.maximum(n_tok, 1)).mean()
        elif loss_type == "bnpo":
            loss = (pt * mask).sum() / max(mask.sum(), 1)
        elif loss_type == "dr_grpo":
            loss = (pt * mask).sum() / (mask.shape[0] * (mask.shape[1] if L is None else L))
        elif loss_type == "luspo":
            loss = (pt * mask).sum(1).mean()
        else:
            count = max(mask.sum() if n_items is None else n_items, 1)
            loss = (pt * mask).sum() / count
    if coef:
        eff = mask if keep_h is None else mask * keep_h
        bonus = (entropy * eff).sum() / (count if loss_type in ("dapo", "cispo", "vespo") else max(eff.sum(), 1))
        loss = loss - coef * bonus
    return loss


def np_grad(x0, h=1e-6, **kw):
    g = np.zeros_like(x0)
    for idx in np.ndindex(x0.shape):
        step = np.zeros_like(x0)
        step[idx] = h
        g[idx] = (np_loss(x0 + step, x0, **kw) - np_loss(x0 - step, x0, **kw)) / (2 * h)
    return g


def random_batch(seed, n=4, t=5):
    rng = np.random.default_rng(seed)
    old = rng.normal(-1.5, 0.5, size=(n, t))
    logp = old + rng.normal(0, 0.3, size=(n, t))  # ratios ~ e^±0.3: some clip at ε = 0.2
    ref = logp + rng.normal(0, 0.3, size=(n, t))
    lens = rng.integers(2, t + 1, size=n)
    mask = (np.arange(t)[None] < lens[:, None]).astype(np.float64)
    adv = rng.normal(size=n)
    entropy = rng.uniform(0, 3, size=(n, t))
    sampling = old + rng.normal(0, 0.4, size=(n, t))
    f64 = {"x": logp, "old": old, "ref": ref, "adv": adv, "entropy": entropy, "sampling": sampling}
    out = {k: v.astype(np.float32).astype(np.float64) for k, v in f64.items()}  # float32-representable
    out["mask"] = mask
    return out


def mx32(a):
    return None if a is None else mx.array(np.asarray(a, dtype=np.float32))


CASES = [
    ("grpo", {}),
    ("bnpo", {}),
    ("dr_grpo", {}),
    ("dapo", {"n_items": 30}),
    ("luspo", {"level": "sequence"}),
    ("cispo", {"eps_high": 1.1}),
    ("cispo", {}),
    ("sapo", {}),
    ("vespo", {"n_items": 30}),
    ("gmpo", {"eps": 0.1}),
    ("grpo", {"beta": 0.1, "bias": True}),
    ("gmpo", {"eps": 0.1, "beta": 0.2}),
    ("dapo", {"beta": 0.1, "bias": True, "level": "sequence"}),
    ("grpo", {"truncated": np.array([False, True, False, False])}),
    ("dapo", {"thr": 1.0, "coef": 0.3}),
    ("grpo", {"thr": 1.0, "coef": 0.3}),
    ("gmpo", {"thr": 1.0, "eps": 0.1}),
    ("grpo", {"opm": 0.05}),
    ("gmpo", {"opm": 0.05, "eps": 0.1}),
    ("vespo", {"isr": "token"}),
    ("dapo", {"isr": "token"}),
    ("sapo", {"isr": "sequence", "opm": 0.0, "thr": 0.8}),
    ("grpo", {"delta": 1.25}),
]


def call_policy_loss(logp, b, loss_type, o):
    """policy_loss with the np_loss options `o`, translated to its keywords."""
    kw = {
        "loss_type": loss_type,
        "epsilon": o.get("eps", 0.2),
        "epsilon_high": o.get("eps_high"),
        "beta": o.get("beta", 0.0),
        "importance_sampling_level": o.get("level", "token"),
        "num_items_in_batch": o.get("n_items"),
        "delta": o.get("delta"),
        "use_bias_correction_kl": o.get("bias", False),
        "entropy_coef": o.get("coef", 0.0),
    }
    if o.get("truncated") is not None:
        kw["truncated"] = mx.array(o["truncated"])
    if "thr" in o or o.get("coef"):
        kw.update(entropy=mx32(b["entropy"]))
    if "thr" in o:
        kw.update(top_entropy_quantile=0.5, entropy_threshold=mx.array(o["thr"], dtype=mx.float32))
    if "opm" in o:
        kw.update(off_policy_mask_threshold=o["opm"], sampling_logp=mx32(b["sampling"]))
    if "isr" in o:
        kw["importance_sampling_ratio"] = mx32(o["isr_value"])
    return policy_loss(logp, mx32(b["old"]), mx32(b["ref"]), mx32(b["adv"]), mx32(b["mask"]), **kw)


@pytest.mark.parametrize("loss_type, opts", CASES)
def test_matches_float64_reference_loss_and_gradient(loss_type, opts):
    b = random_batch(7)
    o = dict(opts)
    if "isr" in o:  # a mismatch weight from the sampler's log-probs, token or sequence
        w, _ = mismatch_weights(mx32(b["old"]), mx32(b["sampling"]), mx32(b["mask"]), f"{o['isr']}_truncate", 2.0, 0.5)
        o["isr_value"] = np.array(w, dtype=np.float64)
        if o["isr_value"].shape[1] == 1:
            o["isr_value"] = np.broadcast_to(o["isr_value"], b["x"].shape)
    ref_kw = dict(
        old=b["old"],
        ref=b["ref"],
        adv=b["adv"],
        mask=b["mask"],
        loss_type=loss_type,
        entropy=b["entropy"],
        sampling=b["sampling"] if "opm" in o else None,
        **{k: v for k, v in o.items() if k not in ("isr", "isr_value")},
        isr=o.get("isr_value"),
    )
    want = np_loss(b["x"], b["x"], **ref_kw)
    want_grad = np_grad(b["x"], **ref_kw)
    got, metrics = call_policy_loss(mx32(b["x"]), b, loss_type, o)
    grad = mx.grad(lambda lp: call_policy_loss(lp, b, loss_type, o)[0])(mx32(b["x"]))
    np.testing.assert_allclose(np.array(got), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.array(grad), want_grad, rtol=1e-4, atol=1e-6)
    assert np.abs(want_grad).sum() > 0  # the case exercises a gradient
    assert all(np.isfinite(np.array(v)) for v in metrics.values())


# --------------------------------------------------------------------------- sapo


def test_sapo_hand_values():
    # A = [1, −0.5] (τ = 1 and 1.05), logp − old: row 0 [0.5, 0, −0.5], row 1 [0.5, −0.5, pad]
    # per token −σ(τ(ρ − 1))·4/τ·A:
    #   row 0 (τ 1):    ρ = e^.5: −4σ(0.6487) = −2.6268889845; ρ = 1: −2; ρ = e^−.5: −1.6115296295
    #                   mean −2.0794728713
    #   row 1 (τ 1.05): ρ = e^.5: 1.2647561018; ρ = e^−.5: 0.7583976664; mean 1.0115768841
    #   grpo: (−2.0794728713 + 1.0115768841) / 2 = −0.5339479936
    # gradient −4σ(1 − σ)·ρ·A/(n_i·N): row 0 [−0.2477897684, −1/6, −0.0972746485],
    #   row 1 [0.1839189789, 0.0726709751]: at ρ = 1 it is GRPO's −A/(n_i·N)
    old = mx.zeros((2, 3))
    logp = mx.array([[0.5, 0.0, -0.5], [0.5, -0.5, 3.0]])

    def f(lp):
        return policy_loss(lp, old, None, KL_ADV, MASK, loss_type="sapo")

    loss, m = f(logp)
    close(loss, -0.5339479936106228)
    close(
        mx.grad(lambda lp: f(lp)[0])(logp),
        [[-0.247789768426625, -1 / 6, -0.09727464853285554], [0.18391897894010048, 0.0726709751137486, 0.0]],
    )
    assert not any(k.startswith("clip_ratio") for k in m)  # TRL logs no clip figures for sapo


# --------------------------------------------------------------------------- vespo


def test_vespo_on_policy_is_reinforce_aggregated_as_dapo():
    # w = 1 → log φ = λ + k·0 − λ·1 = 0 → φ = 1: per token −A·logp
    #   row 0 (A = 1) logp [−1, −2, −0.5] → [1, 2, 0.5]; row 1 (A = −0.5) [−0.3, −1.2] → [−0.15, −0.6]
    #   sum 2.75 over 5 tokens = 0.55; with num_items_in_batch 10: 0.275
    # gradient −φ·A / count: row 0 −1/5, row 1 0.5/5
    def f(lp, **kw):
        return policy_loss(lp, mx.stop_gradient(lp), None, KL_ADV, MASK, loss_type="vespo", **kw)

    loss, m = f(KL_LOGP)
    close(loss, 0.55)
    close(f(KL_LOGP, num_items_in_batch=10)[0], 0.275)
    close(m["vespo/phi_seq_mean"], 1.0)
    close(mx.grad(lambda lp: f(lp)[0])(KL_LOGP), [[-0.2, -0.2, -0.2], [0.1, 0.1, 0.0]])


def test_gamma_weights_hand_values():
    # A >= 0 (k 2, λ 3), Σ log ρ = ln 2: φ = e^3 · 2^2 · e^(−3·2) = 4e^−3 = 0.1991482735
    # A < 0 (k 3, λ 2), Σ log ρ = ln ½: φ = e^2 · ⅛ · e^(−1) = e/8 = 0.3397852286
    # A = 0 counts as non-negative; padding's log-ratio (junk 9) must not enter the sum
    lr = mx.array([[math.log(2.0) / 2, math.log(2.0) / 2, 9.0], [math.log(0.5), 0.0, 9.0], [0.0, 0.0, 0.0]])
    mask = mx.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    phi = gamma_weights(mx.array([[1.0], [-1.0], [0.0]]), lr, mask)
    close(phi, [[0.19914827347145578], [0.33978522855738064], [1.0]])
    # a mismatch weight enters w: ratio ½ on one token of the first row brings w back to 1
    isr = mx.array([[0.5, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    close(gamma_weights(mx.array([[1.0], [-1.0], [0.0]]), lr, mask, isr)[0, 0], 1.0)


# --------------------------------------------------------------------------- luspo


def test_luspo_sums_each_sequence_then_averages():
    # GSPO's case above: per-token terms row 0 −ρ0 = −1.1051709181 (3 tokens), row 1 0.8 (2 tokens,
    # low-clipped). luspo: (3·(−1.1051709181) + 2·0.8) / 2 = −0.8577563772
    # gradient: row 0 is −3ρ0/2 with ρ0 = exp(mean of 3 log-ratios) → −ρ0/2 = −0.5525854590 each
    old = mx.zeros((2, 3))
    logp = mx.array([[0.3, -0.1, 0.1], [0.2, -0.8, 5.0]])
    adv = mx.array([1.0, -1.0])

    def f(lp):
        return policy_loss(lp, old, None, adv, MASK, loss_type="luspo", importance_sampling_level="sequence")

    loss, m = f(logp)
    close(loss, (3 * -1.1051709180756477 + 1.6) / 2)
    close(mx.grad(lambda lp: f(lp)[0])(logp), [[-1.1051709180756477 / 2] * 3, [0.0, 0.0, 0.0]])
    close(m["clip_ratio/low_mean"], 0.4)
    with pytest.raises(ValueError, match="sequence-level"):
        policy_loss(logp, old, None, adv, MASK, loss_type="luspo")


# --------------------------------------------------------------------------- gmpo


def test_gmpo_hand_values():
    # ε = ε_high = 0.4 in log space. A = [1, −1].
    #   row 0 log ρ [0.3, 0.6, −0.5], A > 0 → min(lr, clip) = [0.3, 0.4, −0.5]: mean 1/15,
    #     ρ̄ = e^(1/15) = 1.0689391057, term −1.0689391057
    #   row 1 log ρ [−0.6, 0.5, pad], A < 0 → max(lr, clip) = [−0.4, 0.5]: mean 0.05,
    #     ρ̄ = e^0.05 = 1.0512710964, term +1.0512710964
    #   loss (−1.0689391057 + 1.0512710964) / 2 = −0.0088340047
    # gradient: only unclipped-selected tokens: row 0 t0, t2: −ρ̄0/(3·2) = −0.1781565176;
    #   row 1 t1: ρ̄1/(2·2) = 0.2628177741
    # clip (log space): low = row 1 t0, high = row 0 t1 → 1/5 each; per sequence high [1/3, 0]
    old = mx.zeros((2, 3))
    logp = mx.array([[0.3, 0.6, -0.5], [-0.6, 0.5, 7.0]])
    adv = mx.array([1.0, -1.0])

    def f(lp):
        return policy_loss(lp, old, None, adv, MASK, loss_type="gmpo", epsilon=0.4)

    loss, m = f(logp)
    close(loss, -0.00883400468561113)
    close(
        mx.grad(lambda lp: f(lp)[0])(logp),
        [[-0.17815651762454107, 0.0, -0.17815651762454107], [0.0, 0.26281777409400603, 0.0]],
    )
    close(m["clip_ratio/low_mean"], 0.2)
    close(m["clip_ratio/high_mean"], 0.2)
    close(m["clip_ratio/region_mean"], 0.4)
    close(m["clip_ratio/low_min"], 0.0)
    close(m["clip_ratio/high_max"], 1 / 3)
    with pytest.raises(ValueError, match="one advantage per sequence"):
        policy_loss(logp, old, None, mx.ones((2, 3)), MASK, loss_type="gmpo")


# --------------------------------------------------------------------------- cispo's cap


def test_cispo_cap_is_absolute_and_defaults_to_five():
    # ρ = [e^2 = 7.389, e^1 = 2.718], A = 1: default cap 5 → weights [5, e]; loss −(5·0 + e·0)...
    # with logp = old + [2, 1] and old = 0: −(5·2 + e·1)/2 = −6.3591409142
    old, mask, adv = mx.zeros((1, 2)), mx.ones((1, 2)), mx.array([1.0])
    logp = mx.array([[2.0, 1.0]])
    loss, m = policy_loss(logp, old, None, adv, mask, loss_type="cispo")
    close(loss, -(5 * 2 + math.e) / 2)
    close(m["cispo_clip_ratio"], 0.5)
    loss, m = policy_loss(logp, old, None, adv, mask, loss_type="cispo", epsilon_high=2.0)
    close(loss, -(2 * 2 + 2 * 1) / 2)  # both capped at 2 (the old semantics would cap at 3)
    close(m["cispo_clip_ratio"], 1.0)


# --------------------------------------------------------------------------- truncated completions


def test_truncated_completions_get_zero_gradient_and_leave_the_counts():
    # row 1 truncated: the loss is row 0's alone; bnpo divides by row 0's 3 tokens
    trunc = mx.array([False, True])
    for loss_type in ("grpo", "bnpo", "dapo"):

        def f(lp, t=None, lt=loss_type):
            return policy_loss(lp, mx.stop_gradient(lp), None, KL_ADV, MASK, loss_type=lt, truncated=t)[0]

        close(f(KL_LOGP, trunc), -1.0 if loss_type != "grpo" else -0.5)  # grpo: mean over N = 2 rows
        g = mx.grad(lambda lp, lt=loss_type: f(lp, trunc, lt))(KL_LOGP)
        close(g[1], [0.0, 0.0, 0.0])
        assert float(mx.abs(g[0]).sum()) > 0


# --------------------------------------------------------------------------- entropy mask

ENT = mx.array([[0.1, 0.9, 0.5], [0.3, 0.7, 5.0]])  # (2, 3) padding holds a junk 5.0


def test_entropy_threshold_follows_torch_quantile():
    # valid entropies sorted [0.1, 0.3, 0.5, 0.7, 0.9]; q = 1 − ρ, position q·(n − 1):
    #   ρ 0.4 → q 0.6 → 2.4 → 0.5 + 0.4·0.2 = 0.58;  ρ 0.5 → q 0.5 → 2 → 0.5 exactly
    close(entropy_threshold(ENT, MASK, 0.6), 0.58)
    close(entropy_threshold(ENT, MASK, 0.5), 0.5)
    close(entropy_threshold(ENT, MASK, 0.0), 0.1)
    close(entropy_threshold(ENT, MASK, 1.0), 0.9)
    rng = np.random.default_rng(5)
    h, m = rng.uniform(0, 4, size=(6, 9)), rng.random((6, 9)) < 0.7
    for q in (0.0, 0.13, 0.5, 0.8, 0.999, 1.0):
        close(entropy_threshold(mx32(h), mx.array(m), q), np.quantile(h[m], q))  # numpy's linear = torch's
    assert float(entropy_threshold(ENT, mx.zeros((2, 3)), 0.5)) == math.inf  # no token: keep none
    close(entropy_threshold(ENT, mx.array([[0, 1, 0], [0, 0, 0]]), 0.7), 0.9)  # one token: itself


def test_entropy_mask_keeps_ties_and_zeroes_low_entropy_gradients():
    # ρ = 0.5: threshold 0.5 → keep 0.9, 0.5 (the tie), 0.7; drop 0.1, 0.3 and the padding
    keep = entropy_mask(ENT, MASK, entropy_threshold(ENT, MASK, 0.5))
    assert np.array(keep).tolist() == [[False, True, True], [False, True, False]]

    def f(lp):
        return policy_loss(lp, mx.stop_gradient(lp), None, KL_ADV, MASK, entropy=ENT, top_entropy_quantile=0.5)

    loss, m = f(KL_LOGP)
    # grpo with ρ = 1: row 0 −(0 + 1 + 1)/3, row 1 (0.5·0 + 0.5)/2 (masked tokens still count
    # in n_i, as TRL's mask multiplies the per-token loss) → (−2/3 + 0.25)/2 = −0.2083333
    close(loss, (-2 / 3 + 0.25) / 2)
    close(mx.grad(lambda lp: f(lp)[0])(KL_LOGP), [[0.0, -1 / 6, -1 / 6], [0.0, 0.125, 0.0]])
    close(m["entropy_mask/kept_mean"], 3 / 5)
    close(m["entropy"], 2.5 / 5)  # mean over all masked tokens, as TRL


@pytest.mark.parametrize("loss_type", ["dapo", "vespo", "cispo", "grpo"])
def test_entropy_threshold_over_whole_batch_gives_the_same_gradient_in_micro_batches(loss_type):
    b = random_batch(11, n=4, t=5)
    # the first micro-batch's tokens are the more uncertain: a per-micro-batch threshold would
    # keep 40% of each, the batch's keeps mostly the first's
    mask, h = mx32(b["mask"]), mx32(b["entropy"] + np.array([[2.0], [2.0], [0.0], [0.0]]))
    thr = entropy_threshold(h, mask, 0.6)  # over the whole batch, once
    n_items = mask.sum()  # the whole batch's token count (TRL's num_items_in_batch)

    def loss(lp, rows):
        out, _ = policy_loss(
            lp[rows],
            mx32(b["old"])[rows],
            None,
            mx32(b["adv"])[rows],
            mask[rows],
            loss_type=loss_type,
            entropy=h[rows],
            top_entropy_quantile=0.4,
            entropy_threshold=thr,
            num_items_in_batch=n_items,
            entropy_coef=coef,
        )
        return out

    # the bonus of a token-sum type divides by the batch's count, so it adds up exactly; grpo's
    # is each micro-batch's own mean (as TRL), exact only for equal kept counts: left out here
    coef = 0.0 if loss_type == "grpo" else 0.1

    whole = slice(0, 4)
    micro = [slice(0, 2), slice(2, 4)]
    # token-sum types add the micro-batch losses; grpo averages them (equal micro-batch sizes)
    k = 1.0 if loss_type != "grpo" else 1.0 / len(micro)
    x = mx32(b["x"])
    g_whole = mx.grad(lambda lp: loss(lp, whole))(x)
    g_micro = mx.grad(lambda lp: sum(k * loss(lp, sl) for sl in micro))(x)
    np.testing.assert_allclose(np.array(g_micro), np.array(g_whole), rtol=1e-5, atol=1e-7)
    close(sum(k * loss(x, sl) for sl in micro), np.array(loss(x, whole)))
    # a threshold taken per micro-batch instead would not give the whole batch's answer
    per_micro = sum(
        k
        * policy_loss(
            x[sl],
            mx32(b["old"])[sl],
            None,
            mx32(b["adv"])[sl],
            mask[sl],
            loss_type=loss_type,
            entropy=h[sl],
            top_entropy_quantile=0.4,
            num_items_in_batch=n_items,
        )[0]
        for sl in micro
    )
    assert (
        abs(
            float(per_micro)
            - float(
                policy_loss(
                    x,
                    mx32(b["old"]),
                    None,
                    mx32(b["adv"]),
                    mask,
                    loss_type=loss_type,
                    entropy=h,
                    top_entropy_quantile=0.4,
                    entropy_threshold=thr,
                    num_items_in_batch=n_items,
                )[0]
            )
        )
        > 1e-3
    )


# --------------------------------------------------------------------------- entropy bonus


def test_entropy_bonus_value_and_gradient():
    # entropy_coef 0.5, entropies over the 5 masked tokens sum to 2.5:
    #   grpo: loss − 0.5 · 2.5/5 = −0.25 − 0.25;  d/dH = −0.5/5 on each masked token
    #   dapo with num_items_in_batch 10: ρ = 1 loss 0.5/… = (−3 + 1)/10 = −0.2, bonus 0.5·2.5/10
    def f(h, lt="grpo", **kw):
        return policy_loss(KL_LOGP, KL_LOGP, None, KL_ADV, MASK, loss_type=lt, entropy=h, entropy_coef=0.5, **kw)

    loss, m = f(ENT)
    close(loss, -0.25 - 0.25)
    close(m["policy_loss"], -0.25)
    close(mx.grad(lambda h: f(h)[0])(ENT), [[-0.1, -0.1, -0.1], [-0.1, -0.1, 0.0]])
    close(f(ENT, "dapo", num_items_in_batch=10)[0], -0.2 - 0.5 * 2.5 / 10)
    # with the entropy mask the bonus covers the kept tokens only: 0.9 + 0.5 + 0.7 over 3
    close(f(ENT, top_entropy_quantile=0.5)[0], (-2 / 3 + 0.25) / 2 - 0.5 * 2.1 / 3)


def test_adaptive_entropy_controller():
    # at or below the target: + delta, capped at hi; above: − delta, floored at lo
    assert next_entropy_coef(0.1, 0.2, 0.2, 0.005, 0.0, 1.0) == pytest.approx(0.105)
    assert next_entropy_coef(0.998, 0.1, 0.2, 0.005, 0.0, 1.0) == 1.0
    assert next_entropy_coef(0.1, 0.3, 0.2, 0.005, 0.0, 1.0) == pytest.approx(0.095)
    assert next_entropy_coef(0.003, 0.3, 0.2, 0.005, 0.0, 1.0) == 0.0
    # applied only while the last entropy is at or below the target; the first step (inf) gets 0
    assert applied_entropy_coef(0.1, math.inf, 0.2) == 0.0
    assert applied_entropy_coef(0.1, 0.2, 0.2) == 0.1
    assert applied_entropy_coef(0.1, 0.25, 0.2) == 0.0


# --------------------------------------------------------------------------- off-policy mask


def test_off_policy_mask_drops_exactly_the_negative_far_sequences():
    # mean over tokens of sampling − logp: row 0 0.6 (A = +1: kept whatever the KL),
    #   row 1 0.6 > 0.5 with A = −1: dropped, row 2 0.2 with A = −1: kept, row 3 exactly 0.5: kept
    logp = mx.zeros((4, 2))
    sampling = mx.array([[0.6, 0.6], [0.2, 1.0], [0.2, 0.2], [0.5, 0.5]])
    adv = mx.array([1.0, -1.0, -1.0, -1.0])
    mask = mx.ones((4, 2))
    keep = off_policy_mask(adv[:, None], logp, sampling, mask, 0.5)
    close(keep, [[1.0], [0.0], [1.0], [1.0]])

    def f(lp):
        return policy_loss(
            lp, mx.stop_gradient(lp), None, adv, mask, off_policy_mask_threshold=0.5, sampling_logp=sampling
        )

    loss, m = f(logp)
    close(loss, (-1 + 0 + 1 + 1) / 4)
    g = mx.grad(lambda lp: f(lp)[0])(logp)
    close(g, [[-0.125, -0.125], [0.0, 0.0], [0.125, 0.125], [0.125, 0.125]])
    close(m["off_policy_mask/dropped_mean"], 0.25)
    # without sampling_logp, old_logp stands in (TRL): with old == logp the KL is 0, nothing drops
    _, m = policy_loss(logp, logp, None, adv, mask, off_policy_mask_threshold=0.0)
    close(m["off_policy_mask/dropped_mean"], 0.0)


# --------------------------------------------------------------------------- bias-corrected KL


def test_bias_corrected_kl_value_and_gradient():
    # one token, A = 0, β = 1: logp −1, old −1.2 (ρ = e^0.2), ref −0.5 (x = ref − logp = 0.5)
    #   k3 = e^0.5 − 1.5 = 0.1487212707;  corrected ρ·k3 = 0.1816481...
    #   d/dlogp (ρ·k3) = ρ·k3 + ρ·(1 − e^x) = −ρ·x = −0.5·e^0.2 = −0.6107013791
    #   plain k3: d/dlogp = 1 − e^0.5 = −0.6487212707
    logp, old, ref = mx.array([[-1.0]]), mx.array([[-1.2]]), mx.array([[-0.5]])

    def f(lp, bias):
        return policy_loss(
            lp, old, ref, mx.zeros((1,)), mx.ones((1, 1)), beta=1.0, use_bias_correction_kl=bias, epsilon=10.0
        )

    k3 = math.exp(0.5) - 1.5
    close(f(logp, True)[0], math.exp(0.2) * k3)
    close(f(logp, True)[1]["kl"], math.exp(0.2) * k3)
    close(f(logp, False)[0], k3)
    close(mx.grad(lambda lp: f(lp, True)[0])(logp), [[-0.5 * math.exp(0.2)]])
    close(mx.grad(lambda lp: f(lp, False)[0])(logp), [[1 - math.exp(0.5)]])


# --------------------------------------------------------------------------- mismatch weights


def test_mismatch_weights_each_mode():
    # train − sampling: row 0 [0.1, −0.2, −1.5], row 1 [2.0, 0, pad]
    #   token ratios [e^.1, e^−.2, e^−1.5 = 0.2231], [e^2 = 7.389, 1]
    #   sequence ratios: e^−1.6 = 0.2019, e^2 = 7.389
    old = mx.zeros((2, 3))
    sampling = mx.array([[-0.1, 0.2, 1.5], [-2.0, 0.0, 9.0]])
    e = math.exp
    w, m = mismatch_weights(old, sampling, MASK, "token_truncate", 3.0, None)
    close(w[0], [e(0.1), e(-0.2), e(-1.5)])
    close(w[1, :2], [3.0, 1.0])
    close(m["sampling/sampling_logp_difference/mean"], (0.1 + 0.2 + 1.5 + 2.0) / 5)
    close(m["sampling/sampling_logp_difference/max"], 2.0)
    close(m["sampling/importance_sampling_ratio/min"], e(-1.5))
    close(m["sampling/importance_sampling_ratio/max"], 3.0)
    close(m["sampling/importance_sampling_ratio/mean"], (e(0.1) + e(-0.2) + e(-1.5) + 3 + 1) / 5)
    w, _ = mismatch_weights(old, sampling, MASK, "token_mask", 3.0, 0.5)
    close(w[0], [e(0.1), e(-0.2), 0.0])
    close(w[1, :2], [0.0, 1.0])
    w, m = mismatch_weights(old, sampling, MASK, "sequence_truncate", 3.0, 0.25)
    close(w, [[0.25], [3.0]])
    close(m["sampling/importance_sampling_ratio/mean"], 1.625)
    w, _ = mismatch_weights(old, sampling, MASK, "sequence_mask", 3.0, 0.1)
    close(w, [[e(-1.6)], [0.0]])
    with pytest.raises(ValueError, match="token_truncate"):
        mismatch_weights(old, sampling, MASK, "token_clip")


def test_mismatch_weights_scale_the_policy_term_not_the_kl():
    # dapo, ρ = 1: per-token −A·w; w = [[2, 1, 1], [0.5, 1, 1]] → −(2 + 1 + 1) + 0.5·(0.5 + 1) = −3.25, / 5
    w = mx.array([[2.0, 1.0, 1.0], [0.5, 1.0, 1.0]])
    loss, _ = policy_loss(KL_LOGP, KL_LOGP, None, KL_ADV, MASK, loss_type="dapo", importance_sampling_ratio=w)
    close(loss, -3.25 / 5)
    loss_kl, _ = policy_loss(
        KL_LOGP, KL_LOGP, KL_REF, KL_ADV, MASK, loss_type="dapo", importance_sampling_ratio=w, beta=0.1
    )
    close(loss_kl, (-3.25 + 0.1 * 0.188854782) / 5)  # the KL sum 0.1487 + 0.0187 + 0.0214, unweighted


# --------------------------------------------------------------------------- reference mixing


def test_mix_reference():
    ref = {"a": mx.array([1.0, 2.0]), "b": mx.array([[0.0]], dtype=mx.float16)}
    cur = {"a": mx.array([3.0, 6.0]), "b": mx.array([[1.0]], dtype=mx.float16)}
    mixed = mix_reference(ref, cur, 0.6)  # 0.6·cur + 0.4·ref
    close(mixed["a"], [2.2, 4.4])
    assert mixed["b"].dtype == mx.float16
    close(mixed["b"].astype(mx.float32), [[float(np.float16(0.6))]])  # rounded to float16 once
    close(mix_reference(ref, cur, 1.0)["a"], [3.0, 6.0])  # ref_update_every's reset
    with pytest.raises(ValueError, match="differ"):
        mix_reference(ref, {"a": cur["a"]}, 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mix_reference(ref, cur, 1.5)


def test_new_option_errors():
    args = (KL_LOGP, KL_LOGP, None, KL_ADV, MASK)
    for lt in ("vespo", "gmpo"):
        with pytest.raises(ValueError, match="token"):
            policy_loss(*args, loss_type=lt, importance_sampling_level="sequence")
    with pytest.raises(ValueError, match="entropy"):
        policy_loss(*args, top_entropy_quantile=0.2)
    with pytest.raises(ValueError, match="entropy"):
        policy_loss(*args, entropy_coef=0.1)
    with pytest.raises(ValueError, match="gmpo"):
        policy_loss(*args, loss_type="gmpo", importance_sampling_ratio=mx.ones((2, 3)))
    with pytest.raises(ValueError, match="token_"):
        policy_loss(*args, loss_type="vespo", importance_sampling_ratio=mx.ones((2, 1)))
