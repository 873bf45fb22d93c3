"""Issue 8: process supervision, iterative GRPO and the loss variants, against hand-computed values."""

import json
import math

import mlx.core as mx
import numpy as np
import pytest

from grpo_mlx.config import build_config
from grpo_mlx.events import read_jsonl
from grpo_mlx.loss import kl_divergence, policy_loss
from grpo_mlx.rewards import compute_rewards, resolve_reward
from grpo_mlx.trainer import Trainer


def close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.array(a), np.array(b, dtype=np.float32), atol=tol, rtol=0)


# ------------------------------------------------------------------ process supervision


def test_step_rewards_from_a_reward_function():
    def steps(prompts, completions, **kw):
        return [[1.0, 0.0], [(3, 0.5)], 0.25]  # by delimiter, by offset, outcome-only

    result = compute_rewards([("steps", steps)], None, ["p"] * 3, ["a\nbc", "xyz", "q"], {})
    assert result.steps["steps"] == [[(2, 1.0), (4, 0.0)], [(3, 0.5)], [(1, 0.25)]]
    assert list(result.total) == [0.0, 0.0, 0.0], "step rewards enter the advantages, not the outcome total"
    assert result.per_function["steps"].tolist() == [0.5, 0.5, 0.25]


def test_digit_steps_reward():
    _, fn = resolve_reward("digit_steps")
    out = fn(prompts=["12+34"] * 3, completions=["46", "47", "460"], answer=["46"] * 3)
    assert out == [[(1, 1.0), (2, 1.0)], [(1, 1.0), (2, 0.0)], [(1, 1.0), (2, 1.0), (3, 0.0)]]


# ------------------------------------------------------------------ loss variants


def test_kl_estimators():
    logp, ref = mx.array([[-1.0]]), mx.array([[-1.5]])  # x = ref - logp = -0.5
    close(kl_divergence(logp, ref, "k1"), [[0.5]])
    close(kl_divergence(logp, ref, "k2"), [[0.125]])
    close(kl_divergence(logp, ref, "k3"), [[math.exp(-0.5) + 0.5 - 1.0]])


def test_two_sided_clipping_caps_negative_advantages():
    logp, old = mx.array([[math.log(3.0)]]), mx.array([[0.0]])  # ratio 3
    mask, adv = mx.ones((1, 1)), mx.array([-1.0])
    plain, _ = policy_loss(logp, old, None, adv, mask)  # -min(3 * -1, 1.2 * -1) = 3
    capped, metrics = policy_loss(logp, old, None, adv, mask, delta=2.0)  # -min(2 * -1, -1.2) = 2
    close(plain, 3.0)
    close(capped, 2.0)
    close(metrics["clip_ratio/delta_mean"], 1.0)


def test_cispo_keeps_gradient_of_clipped_tokens():
    # epsilon_high is the ABSOLUTE cap of the ratio for cispo (TRL, ScaleRL's ε_max); it used to
    # be 1 + epsilon_high, so the old epsilon_high 0.2 is 1.2 now and the numbers are unchanged.
    old = mx.array([[0.0, 0.0]])
    mask, adv = mx.ones((1, 2)), mx.array([2.0])

    def loss(lp):
        return policy_loss(lp, old, None, adv, mask, loss_type="cispo", epsilon_high=1.2)[0]

    logp = mx.array([[0.5, -0.05]])  # ratios e^0.5 = 1.6487 (capped at 1.2) and e^-0.05 = 0.9512
    # loss = -(1.2 * 2 * 0.5 + 0.9512 * 2 * -0.05) / 2 tokens
    close(loss(logp), -(1.2 * 2 * 0.5 + math.exp(-0.05) * 2 * -0.05) / 2)
    grad = mx.grad(loss)(logp)  # d/dlogp = -w * A / 2: the capped token still gets -1.2
    close(grad, [[-1.2, -math.exp(-0.05)]])
    _, metrics = policy_loss(logp, old, None, adv, mask, loss_type="cispo", epsilon_high=1.2)
    close(metrics["cispo_clip_ratio"], 0.5)  # TRL's name: ρ > cap with A > 0, 1 token of 2
    # the same token under PPO clipping gets no gradient at all
    ppo_grad = mx.grad(lambda lp: policy_loss(lp, old, None, adv, mask)[0])(logp)
    close(ppo_grad[0, 0], 0.0)


# ------------------------------------------------------------------ in the trainer


def small(tmp_path, **kw):
    flags = dict(
        adapter_path=str(tmp_path / "run"),
        batch_size=4,
        group_size=4,
        iters=3,
        eval_limit=0,
        save_every=100,
        learning_rate=2e-2,
    )
    flags.update(kw)
    return build_config(flags)


def step_metrics(trainer):
    return [e["metrics"] for e in read_jsonl(str(trainer.run_dir / "metrics.jsonl")) if e["type"] == "step"]


@pytest.mark.parametrize(
    "overrides",
    [
        dict(reward_functions=["accuracy", "digit_steps"]),
        dict(reward_functions=["digit_steps"]),
        dict(loss_type="cispo"),
        dict(loss_type="sapo", num_iterations=2),
        dict(loss_type="vespo", num_iterations=2),
        dict(loss_type="luspo", importance_sampling_level="sequence"),
        dict(loss_type="gmpo", epsilon=0.4, num_iterations=2),
        dict(delta=2.0, num_iterations=2),
        dict(mask_truncated_completions=True, max_completion_length=3),
        dict(top_entropy_quantile=0.2, gradient_accumulation_steps=2, loss_type="dapo"),
        dict(entropy_coef=0.01),
        dict(off_policy_mask_threshold=0.5, num_iterations=2),
        dict(importance_sampling_correction=True, importance_sampling_mode="token_truncate"),
        dict(beta=0.1, use_bias_correction_kl=True, num_iterations=2),
        dict(beta=0.1, sync_ref_model=True, ref_model_sync_steps=2),
        dict(beta=0.1, kl_estimator="k2"),
        dict(beta=0.1, kl_in_reward=True),
        dict(
            advantage_baseline="leave_one_out",
            reward_functions=["accuracy", "length"],
            reward_combination="normalize_each",
        ),
    ],
)
def test_variants_train(tmp_path, overrides):
    t = Trainer(small(tmp_path, **overrides))
    assert t.run()["steps"] == 3
    m = step_metrics(t)
    assert all(math.isfinite(x["loss"]) for x in m)
    assert any(x["grad_norm"] > 0 for x in m)
    if "beta" in overrides:
        assert m[-1]["kl"] > 0
    first = next(iter(overrides))
    for key in OPTION_METRICS.get(overrides[first] if first == "loss_type" else first, ()):
        assert all(math.isfinite(x[key]) for x in m), key
    assert all(math.isfinite(x["sampling/sampling_logp_difference/mean"]) for x in m)


OPTION_METRICS = {  # what each option (or loss type) reports, by the override's first key
    "top_entropy_quantile": ("entropy_mask/kept_mean", "entropy"),
    "entropy_coef": ("entropy", "entropy_coef", "policy_loss"),
    "off_policy_mask_threshold": ("off_policy_mask/dropped_mean",),
    "importance_sampling_correction": (
        "sampling/importance_sampling_ratio/min",
        "sampling/importance_sampling_ratio/mean",
        "sampling/importance_sampling_ratio/max",
        "sampling/sampling_logp_difference/max",
    ),
    "cispo": ("cispo_clip_ratio",),
    "vespo": ("vespo/phi_seq_mean",),
    "luspo": ("clip_ratio/low_min", "clip_ratio/high_max", "clip_ratio/region_mean"),
    "gmpo": ("clip_ratio/low_min", "clip_ratio/high_max"),
}


def test_truncated_completions_are_masked_through_the_trainer(tmp_path):
    """Every completion cut at 2 tokens: with the option the loss has no token left."""
    t = Trainer(small(tmp_path, mask_truncated_completions=True, max_completion_length=2))
    t.run()
    m = step_metrics(t)
    assert all(x["completions/clipped_ratio"] == 1.0 for x in m)
    assert all(x["loss"] == 0.0 and x["grad_norm"] == 0.0 for x in m)


def test_adaptive_entropy_moves_the_coefficient_and_resumes_exactly(tmp_path):
    # a target above any entropy of the demo: the coefficient rises by delta every step, and the
    # bonus acts from step 2 on (TRL's controller starts from an infinite last entropy)
    opts = dict(iters=4, use_adaptive_entropy=True, entropy_coef=0.01, entropy_coef_delta=0.02, entropy_target=50.0)
    straight = Trainer(small(tmp_path / "a", **opts))
    straight.run()
    coefs = [x["entropy_coef"] for x in step_metrics(straight)]
    assert coefs == pytest.approx([0.0, 0.03, 0.05, 0.07])
    first = Trainer(small(tmp_path / "b", **opts))
    first.bus.subscribe(lambda e: e["type"] == "step" and e["step"] == 2 and first.control.stop.set())
    first.run()
    base = json.loads((tmp_path / "b" / "run" / "config.json").read_text())
    resumed = Trainer(build_config({"resume": str(tmp_path / "b" / "run")}, base=base))
    resumed.run()
    assert [x["entropy_coef"] for x in step_metrics(resumed)] == pytest.approx(coefs)
    a = mx.load(str(tmp_path / "a" / "run" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "b" / "run" / "adapters.safetensors"))
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), atol=1e-6, err_msg=k)


def test_sync_ref_model_mixes_the_reference_every_n_steps(tmp_path):
    from grpo_mlx.loss import mix_reference
    from grpo_mlx.policy import snapshot_adapters

    t = Trainer(small(tmp_path, iters=5, beta=0.1, sync_ref_model=True, ref_model_sync_steps=2,
                      ref_model_mixup_alpha=0.25))  # fmt: skip
    seen = {}
    real_step = t.train_step

    def train_step(step):
        seen[step] = snapshot_adapters(t.model)  # the policy as the step begins
        return real_step(step)

    t.train_step = train_step
    t.run()
    expected = seen[0]  # the reference starts as the policy at step 0 (LoRA's B = 0: the base model)
    for step in (2, 4):
        expected = mix_reference(expected, seen[step], 0.25)
    for k in expected:
        np.testing.assert_allclose(np.array(t.ref_adapters[k]), np.array(expected[k]), atol=1e-7, err_msg=k)
    saved = mx.load(str(t.run_dir / "checkpoints" / "step_0000005" / "reference.safetensors"))
    assert saved.keys() == expected.keys()


def test_iterative_reference_resets_kl(tmp_path):
    """With --ref-update-every 2, at step 3 the reference is the policy after step 2: the KL
    measured on step 3's samples is against it, not against the base model."""
    moving = Trainer(small(tmp_path / "moving", iters=4, beta=0.1, ref_update_every=2))
    moving.run()
    fixed = Trainer(small(tmp_path / "fixed", iters=4, beta=0.1))
    fixed.run()
    km, kf = [x["kl"] for x in step_metrics(moving)], [x["kl"] for x in step_metrics(fixed)]
    assert km[:2] == pytest.approx(kf[:2], rel=1e-5), "same run until the first reference update"
    assert km[2] < kf[2], "right after the update the policy is close to its new reference"
    ckpt = moving.run_dir / "checkpoints" / "step_0000004"
    assert (ckpt / "reference.safetensors").exists(), "the moving reference is part of the checkpoint"


def test_iterative_reference_resume_is_exact(tmp_path):
    straight = Trainer(small(tmp_path / "a", iters=6, beta=0.1, ref_update_every=2))
    straight.run()
    first = Trainer(small(tmp_path / "b", iters=6, beta=0.1, ref_update_every=2))
    first.bus.subscribe(lambda e: e["type"] == "step" and e["step"] == 3 and first.control.stop.set())
    first.run()
    base = json.loads((tmp_path / "b" / "run" / "config.json").read_text())
    Trainer(build_config({"resume": str(tmp_path / "b" / "run")}, base=base)).run()
    a = mx.load(str(tmp_path / "a" / "run" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "b" / "run" / "adapters.safetensors"))
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), atol=1e-6, err_msg=k)


def test_sampler_records_the_entropy_of_its_distribution():
    from grpo_mlx.sampler import host_pick, make_device_picker

    logits = mx.random.normal((3, 50)) * 3  # (3, V)
    x = np.array(logits, dtype=np.float64)
    p = np.exp(x - x.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    expected = -(p * np.log(p)).sum(axis=1)  # (3,)
    u = np.array([0.1, 0.5, 0.9])
    tok_h, _, ent_h = host_pick(logits, 1.0, u)
    tok_d, _, ent_d = make_device_picker(1.0, keyed=True)(logits, mx.array(u)[:, None])
    close(ent_h, expected, 1e-4)
    close(ent_d, expected, 1e-4)
    assert np.array(tok_d).tolist() == tok_h.tolist(), "both samplers pick the same token for the same u"


def test_trainer_logs_entropy(tmp_path):
    t = Trainer(small(tmp_path, iters=1))
    t.run()
    m = step_metrics(t)[0]
    assert 0 < m["entropy"] < math.log(100)
