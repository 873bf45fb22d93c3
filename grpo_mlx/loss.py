"""The GRPO-family loss: pure functions over mx.array.

Shapes: B prompts, G completions per prompt, N = B·G sequences, T completion tokens, V vocab.
Everything here is lazy: no I/O, no printing, no `.item()`; the trainer evaluates once per step.

Choices, stated once:
- Arithmetic is float32 whatever the input dtype; masks may be bool or float.
- Only `logp` carries gradient: `old_logp`, `ref_logp` and the advantages are stop_gradient'ed.
- The KL term (k3 estimator) is computed only when beta > 0, and the `kl` metric is reported
  only then, as TRL does: with beta == 0 the trainer need not run the reference pass at all.
- Every count used as a divisor is clamped to >= 1, so an all-padding sequence gives 0, not NaN.
- With one update per rollout (μ = 1) old_logp == logp, ρ == 1 and clipping never fires;
  the clip_ratio metrics then read 0, which is the truth, not a bug.
"""

import math

import mlx.core as mx

from grpo_mlx import metric_names as M
from grpo_mlx.config import IMPORTANCE_LEVELS, IMPORTANCE_SAMPLING_MODES, KL_ESTIMATORS, LOSS_TYPES


def masked_mean(x, mask, axis=None):
    """Mean of `x` over the positions where `mask` is set; empty slices give 0, not NaN."""
    x, mask = mx.broadcast_arrays(x, mask.astype(mx.float32))  # common shape, e.g. (N, T)
    total = (x * mask).sum(axis=axis)  # x reduced over axis
    count = mx.maximum(mask.sum(axis=axis), 1.0)  # x reduced over axis
    return total / count


def kl_divergence(logp, ref_logp, estimator="k3"):
    """Per-token estimate of KL(π || ref) from log-probabilities of tokens sampled from π."""
    x = ref_logp - logp  # (N, T) log(ref / π)
    if estimator == "k1":
        return -x  # (N, T) unbiased, can be negative
    if estimator == "k2":
        return 0.5 * x * x  # (N, T) biased, low variance
    if estimator == "k3":
        return mx.exp(x) - x - 1.0  # (N, T) unbiased, >= 0
    raise ValueError(f"unknown kl_estimator {estimator!r}; valid values: {', '.join(KL_ESTIMATORS)}")


def entropy_threshold(entropy, mask, quantile):
    """The `quantile` of the masked token entropies, linearly interpolated (torch.quantile's
    rule): position q·(n − 1) in the sorted values. The trainer calls it once over the whole
    batch (all micro-batches, all ranks' tokens gathered) and passes the scalar to every
    micro-batch's policy_loss, so the mask does not depend on how the batch is split.
    For top_entropy_quantile ρ, quantile = 1 − ρ. No token (n == 0) gives +inf: none kept.

    entropy, mask: (N, T) → () float32; lazy.
    """
    flat_h = mx.stop_gradient(entropy.astype(mx.float32)).reshape(-1)  # (N·T,)
    flat_m = mask.astype(mx.bool_).reshape(-1)  # (N·T,)
    ordered = mx.sort(mx.where(flat_m, flat_h, mx.inf))  # (N·T,) real entropies first
    n = flat_m.astype(mx.float32).sum()  # ()
    pos = quantile * mx.maximum(n - 1.0, 0.0)  # ()
    lo = mx.floor(pos)  # ()
    hi = mx.minimum(lo + 1.0, mx.maximum(n - 1.0, 0.0))  # ()
    a = ordered[lo.astype(mx.int32)]  # ()
    b = ordered[hi.astype(mx.int32)]  # () a real entropy whenever n >= 1
    return mx.where(n > 0, a + (pos - lo) * (b - a), mx.inf)  # ()


_batch_threshold = entropy_threshold  # policy_loss has a keyword of the same name


def entropy_mask(entropy, mask, threshold):
    """Tokens the policy loss keeps under top_entropy_quantile: entropy >= threshold (ties at the
    threshold are kept, as in TRL), never padding. (N, T) bool."""
    return (mx.stop_gradient(entropy.astype(mx.float32)) >= threshold) & mask.astype(mx.bool_)  # (N, T)


def off_policy_mask(advantages, logp, sampling_logp, mask, threshold):
    """DeepSeek-V3.2's off-policy sequence mask, as TRL's get_off_policy_mask: keep a sequence
    unless its advantage is negative and the masked mean over its tokens of
    sampling_logp − logp (the k1 estimate of KL(sampler || current policy), where the current
    policy is the one being trained, `logp`, detached) exceeds `threshold`.

    advantages (N, 1) or (N, T), logp, sampling_logp, mask (N, T) → keep (N, 1) or (N, T) float.
    """
    kl = mx.stop_gradient(sampling_logp.astype(mx.float32) - logp.astype(mx.float32))  # (N, T)
    mean_kl = masked_mean(kl, mask, axis=1)[:, None]  # (N, 1)
    return ((advantages >= 0) | (mean_kl <= threshold)).astype(mx.float32)  # (N, 1) or (N, T)


def mismatch_weights(train_logp_old, sampling_logp, mask, mode="sequence_mask", clip_max=3.0, clip_min=None):
    """Importance weights correcting for a sampler whose log-probabilities differ from the
    trainer's (kernels, quantisation, batching), as TRL's vLLM importance-sampling correction.

    train_logp_old: the training forward pass's log-probs of the sampled tokens under the
    policy that sampled them (the old_logp of the step, computed even when μ = 1);
    sampling_logp: those the sampler recorded. ratio = exp(train − sampling), per token, or per
    sequence as the exp of the masked sum over its tokens. *_truncate clips the ratio to
    [clip_min, clip_max]; *_mask sets ratios outside it to 0. Either bound may be None.
    Returns (weights (N, T) or (N, 1), no gradient, for policy_loss's importance_sampling_ratio;
    metrics with TRL's names).
    """
    if mode not in IMPORTANCE_SAMPLING_MODES:
        raise ValueError(
            f"unknown importance sampling mode {mode!r}; valid values: {', '.join(IMPORTANCE_SAMPLING_MODES)}"
        )
    mask = mask.astype(mx.float32)  # (N, T)
    diff = mx.stop_gradient(train_logp_old.astype(mx.float32) - sampling_logp.astype(mx.float32)) * mask  # (N, T)
    per_sequence = mode.startswith("sequence")
    ratio = mx.exp(diff.sum(axis=1, keepdims=True) if per_sequence else diff)  # (N, 1) or (N, T)
    lo = -math.inf if clip_min is None else clip_min
    hi = math.inf if clip_max is None else clip_max
    if mode.endswith("truncate"):
        ratio = mx.clip(ratio, lo, hi)  # (N, 1) or (N, T)
    else:
        ratio = mx.where((ratio < lo) | (ratio > hi), 0.0, ratio)  # (N, 1) or (N, T)
    valid = mx.ones(ratio.shape, dtype=mx.bool_) if per_sequence else mask.astype(mx.bool_)  # like ratio
    count = valid.astype(mx.float32).sum()  # ()
    some = count > 0  # () empty batches report 0, as TRL
    delta = mx.abs(diff)  # (N, T) 0 on padding
    metrics = {
        M.SAMPLING_LOGP_DIFF: masked_mean(delta, mask),
        "sampling/sampling_logp_difference/max": delta.max(),
        "sampling/importance_sampling_ratio/min": mx.where(some, mx.where(valid, ratio, mx.inf).min(), 0.0),
        M.IS_RATIO_MEAN: masked_mean(ratio, valid),
        "sampling/importance_sampling_ratio/max": mx.where(some, mx.where(valid, ratio, -mx.inf).max(), 0.0),
    }
    return ratio, metrics


def gamma_weights(
    advantages, log_ratio, mask, importance_sampling_ratio=None, k_pos=2.0, lambda_pos=3.0, k_neg=3.0, lambda_neg=2.0
):
    """VESPO's weight φ(w) = e^λ · w^k · e^(−λw) (so φ(1) = 1) of the sequence ratio
    w = exp(Σ_t log ρ_t), with (k, λ) chosen by the sign of A (A >= 0: the _pos pair), computed
    in log space with TRL's clamps (token log-ratios to ±20, log w to [log 1e-8, 20]); a
    mismatch weight enters w as its log. No gradient. (N, 1), or (N, T) for per-token A.
    """
    floor = math.log(1e-8)
    log_ratio = mx.stop_gradient(log_ratio)  # (N, T)
    log_w = (mx.clip(log_ratio, -20.0, 20.0) * mask).sum(axis=1, keepdims=True)  # (N, 1) a sum, not a mean
    if importance_sampling_ratio is not None:
        log_is = mx.clip(mx.log(importance_sampling_ratio), floor, 20.0)  # (N, T)
        log_w = log_w + (log_is * mask).sum(axis=1, keepdims=True)  # (N, 1)
    log_w = mx.clip(log_w, floor, 20.0)  # (N, 1)
    nonneg = advantages >= 0  # (N, 1) or (N, T)
    k = mx.where(nonneg, k_pos, k_neg)  # like advantages
    lam = mx.maximum(mx.where(nonneg, lambda_pos, lambda_neg), 1e-4)  # like advantages
    phi = mx.exp(lam + k * log_w - lam * mx.exp(log_w))  # like advantages
    return mx.stop_gradient(mx.nan_to_num(phi, nan=0.0, posinf=0.0, neginf=0.0))


def next_entropy_coef(coef, entropy, target, delta, lo, hi):
    """Skywork-OR1's adaptive entropy controller, as TRL: after each optimizer step, with the
    step's mean token entropy (over the tokens the policy loss acts on, all micro-batches and
    ranks): at or below the target the coefficient rises by delta, above it falls, kept in
    [lo, hi]. Python floats."""
    if entropy <= target:
        return min(coef + delta, hi)
    return max(coef - delta, lo)


def applied_entropy_coef(coef, last_entropy, target):
    """The coefficient a step applies under adaptive control: the bonus acts only while the
    previous step's entropy was at or below the target (TRL starts from +inf, so the first step
    applies 0)."""
    return coef if last_entropy <= target else 0.0


def mix_reference(ref: dict, current: dict, alpha: float) -> dict:
    """TR-DPO's soft reference update over flat adapter-weight dicts:
    ref ← α · current + (1 − α) · ref, key by key, in the reference's dtype. For LoRA this mixes
    the factors A and B, not their product: the reference's ΔW is (αB + (1−α)B')(αA + (1−α)A'),
    not αBA + (1−α)B'A' (exact for α = 0 or 1, the latter being ref_update_every's reset)."""
    if set(ref) != set(current):
        missing = sorted(set(ref) ^ set(current))
        raise ValueError(f"reference and policy adapters differ in their weights: {', '.join(missing[:3])}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"ref_model_mixup_alpha must be in [0, 1], got {alpha}")
    return {
        k: (alpha * current[k].astype(mx.float32) + (1.0 - alpha) * ref[k].astype(mx.float32)).astype(ref[k].dtype)
        for k in ref
    }


def _is_zero(coef) -> bool:
    """A Python 0; an mx.array coefficient (adaptive control moves it each step without
    recompiling the step) is never taken for zero."""
    return not isinstance(coef, mx.array) and coef == 0.0


def _check_options(
    loss_type,
    importance_sampling_level,
    kl_estimator,
    beta,
    ref_logp,
    advantages,
    entropy,
    top_entropy_quantile,
    entropy_coef,
    importance_sampling_ratio,
):
    """Refuse argument combinations that have no meaning, with one sentence each."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid values: {', '.join(LOSS_TYPES)}")
    if importance_sampling_level not in IMPORTANCE_LEVELS:
        raise ValueError(
            f"unknown importance_sampling_level {importance_sampling_level!r}; "
            f"valid values: {', '.join(IMPORTANCE_LEVELS)}"
        )
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown kl_estimator {kl_estimator!r}; valid values: {', '.join(KL_ESTIMATORS)}")
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp (reference-model log-probabilities)")
    if loss_type in ("vespo", "gmpo") and importance_sampling_level != "token":
        raise ValueError(
            f"loss_type {loss_type!r} builds its own sequence weight from token ratios: use "
            f"importance_sampling_level 'token'"
        )
    if loss_type == "luspo" and importance_sampling_level != "sequence":
        raise ValueError(
            "loss_type 'luspo' is defined with sequence-level ratios: use importance_sampling_level 'sequence'"
        )
    if loss_type == "gmpo" and advantages.ndim != 1:
        raise ValueError("loss_type 'gmpo' needs one advantage per sequence, shape (N,), not per-token advantages")
    if loss_type == "vespo" and importance_sampling_ratio is not None and importance_sampling_ratio.shape[-1] == 1:
        raise ValueError(
            "loss_type 'vespo' folds the mismatch weight into its sequence weight token by token: use a token_* mode"
        )
    if loss_type == "gmpo" and importance_sampling_ratio is not None:
        raise ValueError("loss_type 'gmpo' has no per-token loss for importance_sampling_ratio to weight")
    if (top_entropy_quantile < 1.0 or not _is_zero(entropy_coef)) and entropy is None:
        raise ValueError("top_entropy_quantile < 1 and entropy_coef need the per-token entropy (entropy=)")


def policy_loss(
    logp,
    old_logp,
    ref_logp,
    advantages,
    mask,
    *,
    loss_type="grpo",
    epsilon=0.2,
    epsilon_high=None,
    beta=0.0,
    importance_sampling_level="token",
    max_completion_length=None,
    num_items_in_batch=None,
    kl_estimator="k3",
    delta=None,
    sapo_temperature_pos=1.0,
    sapo_temperature_neg=1.05,
    vespo_k_pos=2.0,
    vespo_lambda_pos=3.0,
    vespo_k_neg=3.0,
    vespo_lambda_neg=2.0,
    truncated=None,
    entropy=None,
    entropy_value=None,
    top_entropy_quantile=1.0,
    entropy_threshold=None,
    entropy_coef=0.0,
    sampling_logp=None,
    off_policy_mask_threshold=None,
    importance_sampling_ratio=None,
    use_bias_correction_kl=False,
):
    """Clipped surrogate (or another objective) + β·KL over completion tokens, aggregated by
    `loss_type`. Keyword names and meanings are TRL's GRPOConfig's.

    logp, old_logp, ref_logp, mask: (N, T); advantages: (N,) per sequence or (N, T) per token.
    ref_logp may be None when beta == 0. Returns (scalar loss, dict of scalar metrics).

    loss_type:
      grpo     mean over each sequence's tokens, then mean over sequences (favours short answers)
      bnpo     sum over all masked tokens / masked tokens in this batch
      dr_grpo  sum / (N · max_completion_length); max_completion_length None → T
      dapo     sum / num_items_in_batch, the completion-token count of the whole generation
               batch (for gradient accumulation over micro-batches); None → this batch's count
      luspo    the clipped objective with sequence-level ratios (importance_sampling_level
               'sequence'), summed over each sequence's tokens, then mean over sequences: each
               sequence weighs by its length (LUSPO)
      cispo    MiniMax-M1's objective, aggregated as dapo: −sg(min(ρ, ε_high)) · A · logp, with
               ε_high the ABSOLUTE cap of the ratio (TRL, ScaleRL's ε_max; None → 5). Every
               token keeps a gradient (PPO-style clipping drops the clipped tokens' instead).
      sapo     soft gate instead of the clip, aggregated as grpo: −σ(τ(ρ − 1)) · 4/τ · A, τ =
               sapo_temperature_pos for A > 0, sapo_temperature_neg otherwise; at ρ = 1 its
               gradient equals GRPO's and it decays smoothly as ρ leaves 1
      vespo    −sg(φ(w)) · A · logp aggregated as dapo, φ = gamma_weights of the sequence ratio w
      gmpo     geometric mean: token log-ratios clipped to [−ε, ε_high] in LOG space (sign-aware:
               min for A > 0, max otherwise), averaged over the sequence's tokens (the entropy
               mask, if any, also selects these), ρ̄ = exp(that); per sequence −ρ̄·A + β·(mean
               KL over its tokens); mean over sequences
    kl_estimator (for KL = KL(π || ref), with x = ref − logp):  k1 = −x,  k2 = x²/2,
      k3 = exp(x) − x − 1 (Schulman; non-negative, unbiased). Added to the loss as β·KL_it.
      use_bias_correction_kl multiplies KL_it by the ratio ρ (with its gradient, as TRL): the
      unbiased estimate under samples from π_old, whose gradient is that of KL(π || ref).
    delta: two-sided clipping (clipped types only): for A < 0 the unclipped ratio is also
      capped at δ (> 1 + ε), so one very unlikely token cannot produce an unbounded update.
    importance_sampling_level:
      token     ρ_it = exp(logp_it − old_logp_it)
      sequence  GSPO: ρ_i = exp(masked mean_t (logp_it − old_logp_it)), shared by all tokens;
                its gradient flows through the mean of the sequence's log-probabilities.

    Masks and corrections, applied to the per-token policy term (not to the KL) in TRL's order:
      truncated (N,) bool: with it, truncated completions leave the mask altogether (loss, KL,
        metrics); num_items_in_batch must then count the remaining tokens.
      off_policy_mask_threshold: off_policy_mask against sampling_logp (None → old_logp).
      top_entropy_quantile < 1 with entropy (N, T): only tokens with entropy >= the threshold
        act; entropy_threshold (a scalar, computed over the whole batch) → that threshold,
        None → computed over this call's tokens.
      importance_sampling_ratio (N, T) or (N, 1): mismatch_weights' output; multiplies the
        per-token policy term (vespo: enters w instead, as TRL).
      entropy_value (N, T): the entropies without gradient, for the mask and the metric when
        `entropy` carries one (MLX cannot compile an auxiliary output of it); None → entropy.
      entropy_coef: subtract coef · mean entropy over the kept tokens (for dapo/cispo/vespo:
        sum / the same token count as the policy term, as TRL); its gradient flows through
        `entropy` if that carries one.

    Metrics (fractions of masked tokens; sequence-level ρ is counted per token), TRL's names:
      clip_ratio/low_mean     ρ < 1 − ε_low  and A < 0   (the lower clip is selected by the min)
      clip_ratio/high_mean    ρ > 1 + ε_high and A > 0   (the upper clip is selected by the min)
      clip_ratio/region_mean  either of the two: tokens whose gradient the clip cuts off
      clip_ratio/low_min, clip_ratio/high_max  the extremes of the per-sequence fractions
        (clipped types and gmpo, whose bounds are in log space)
      cispo_clip_ratio        cispo: ρ > ε_high and A > 0
      vespo/phi_seq_mean      vespo: mean of φ over sequences
      kl                      masked mean over tokens of KL_it; only when beta > 0
      entropy                 masked mean token entropy, when entropy is given
      policy_loss             the loss before the entropy bonus, when entropy_coef != 0
      entropy_mask/kept_mean, off_policy_mask/dropped_mean  fractions of masked tokens
    """
    _check_options(
        loss_type,
        importance_sampling_level,
        kl_estimator,
        beta,
        ref_logp,
        advantages,
        entropy,
        top_entropy_quantile,
        entropy_coef,
        importance_sampling_ratio,
    )
    eps_low = epsilon
    eps_high = epsilon if epsilon_high is None else epsilon_high

    logp = logp.astype(mx.float32)  # (N, T)
    old_logp = mx.stop_gradient(old_logp.astype(mx.float32))  # (N, T)
    mask = mask.astype(mx.float32)  # (N, T)
    if truncated is not None:
        mask = mask * (1.0 - truncated.astype(mx.float32))[:, None]  # (N, T) truncated rows leave
    seq_advantages = mx.stop_gradient(advantages.astype(mx.float32))  # (N,) or (N, T)
    advantages = seq_advantages[:, None] if seq_advantages.ndim == 1 else seq_advantages  # (N, 1) or (N, T)
    metrics = {}
    keep_h, keep_pi = _token_masks(
        metrics, mask, advantages, logp, old_logp, entropy if entropy_value is None else entropy_value,
        top_entropy_quantile, entropy_threshold, sampling_logp, off_policy_mask_threshold,
    )  # fmt: skip

    token_log_ratio = logp - old_logp  # (N, T)
    log_ratio = token_log_ratio  # (N, T)
    if importance_sampling_level == "sequence":
        log_ratio = masked_mean(log_ratio, mask, axis=1)[:, None]  # (N, 1)
    ratio = mx.exp(log_ratio)  # (N, T) or (N, 1)

    kl = None
    if beta > 0:
        kl = kl_divergence(logp, mx.stop_gradient(ref_logp.astype(mx.float32)), kl_estimator)  # (N, T)
        if use_bias_correction_kl:
            kl = kl * ratio  # (N, T) the ratio keeps its gradient, as in TRL
        metrics[M.KL] = masked_mean(mx.stop_gradient(kl), mask)  # ()

    if loss_type == "gmpo":
        loss, gm_metrics = _gmpo(
            token_log_ratio, seq_advantages, advantages, mask, keep_h, keep_pi, kl, beta, eps_low, eps_high
        )
        metrics.update(gm_metrics)
        return _with_entropy_bonus(loss, metrics, loss_type, entropy, entropy_coef, mask, keep_h, None)

    shape = dict(
        sapo=(sapo_temperature_pos, sapo_temperature_neg),
        vespo=(vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg, importance_sampling_ratio),
    )
    per_token = _surrogate(
        metrics, loss_type, ratio, token_log_ratio, logp, advantages, mask, eps_low, eps_high, epsilon_high, delta,
        shape,
    )  # fmt: skip  # (N, T)

    if keep_pi is not None:
        per_token = per_token * keep_pi  # (N, T)
    if keep_h is not None:
        per_token = per_token * keep_h  # (N, T)
    if importance_sampling_ratio is not None and loss_type != "vespo":
        per_token = per_token * mx.stop_gradient(importance_sampling_ratio.astype(mx.float32))  # (N, T)
    if kl is not None:
        per_token = per_token + beta * kl  # (N, T)
    loss, count = _aggregate(loss_type, per_token, mask, max_completion_length, num_items_in_batch)
    return _with_entropy_bonus(loss, metrics, loss_type, entropy, entropy_coef, mask, keep_h, count)


def _token_masks(
    metrics, mask, advantages, logp, old_logp, entropy, quantile, threshold, sampling_logp, off_policy_threshold
):
    """The entropy mask (N, T) and the off-policy mask (N, 1) or (N, T), each None when off;
    their metrics (and the entropy's) go into `metrics`."""
    keep_h = None
    if entropy is not None:
        metrics[M.ENTROPY] = masked_mean(mx.stop_gradient(entropy.astype(mx.float32)), mask)  # ()
        if quantile < 1.0:
            if threshold is None:
                threshold = _batch_threshold(entropy, mask, 1.0 - quantile)  # () this call's tokens only
            keep_h = entropy_mask(entropy, mask, threshold).astype(mx.float32)  # (N, T)
            metrics[M.ENTROPY_KEPT] = masked_mean(keep_h, mask)  # ()
    keep_pi = None
    if off_policy_threshold is not None:
        sampled = old_logp if sampling_logp is None else sampling_logp  # (N, T)
        keep_pi = off_policy_mask(advantages, logp, sampled, mask, off_policy_threshold)
        metrics[M.OFF_POLICY_DROPPED] = masked_mean(mx.broadcast_to(1.0 - keep_pi, mask.shape), mask)  # ()
    return keep_h, keep_pi


def _surrogate(
    metrics, loss_type, ratio, token_log_ratio, logp, advantages, mask, eps_low, eps_high, epsilon_high, delta, shape
):
    """The per-token policy term (N, T) of every loss type but gmpo; its metrics into `metrics`."""
    sg_ratio = mx.stop_gradient(ratio)  # (N, T) or (N, 1)
    if loss_type == "cispo":
        cap = 5.0 if epsilon_high is None else epsilon_high  # ScaleRL's ε_max; ε = 0.2 would shrink every token
        weight = mx.stop_gradient(mx.minimum(ratio, cap))  # (N, T) or (N, 1)
        capped = mx.broadcast_to((sg_ratio > cap) & (advantages > 0), mask.shape)  # (N, T)
        metrics[M.CISPO_CLIP] = masked_mean(capped.astype(mx.float32), mask)  # ()
        return -weight * advantages * logp  # (N, T)
    if loss_type == "sapo":
        tau_pos, tau_neg = shape["sapo"]
        tau = mx.where(advantages > 0, tau_pos, tau_neg)  # (N, 1) or (N, T)
        return -mx.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau) * advantages  # (N, T)
    if loss_type == "vespo":
        k_pos, lam_pos, k_neg, lam_neg, is_ratio = shape["vespo"]
        phi = gamma_weights(advantages, token_log_ratio, mask, is_ratio, k_pos, lam_pos, k_neg, lam_neg)
        metrics[M.VESPO_PHI] = phi.mean() if phi.shape[1] == 1 else masked_mean(phi, mask)  # ()
        return -phi * advantages * logp  # (N, T)
    # the clipped surrogate: grpo, bnpo, dr_grpo, dapo, luspo
    clipped_ratio = mx.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)  # (N, T) or (N, 1)
    unclipped = ratio if delta is None else mx.minimum(ratio, delta)  # (N, T) or (N, 1)
    per_token = -mx.minimum(unclipped * advantages, clipped_ratio * advantages)  # (N, T)
    if delta is not None:
        capped = (sg_ratio > delta) & (advantages < 0)  # (N, T)
        metrics[M.CLIP_DELTA] = masked_mean(capped.astype(mx.float32), mask)  # ()
    low = mx.broadcast_to((sg_ratio < 1.0 - eps_low) & (advantages < 0), mask.shape)  # (N, T)
    high = mx.broadcast_to((sg_ratio > 1.0 + eps_high) & (advantages > 0), mask.shape)  # (N, T)
    metrics.update(_clip_metrics(low, high, mask))
    return per_token


def _aggregate(loss_type, per_token, mask, max_completion_length, num_items_in_batch):
    """(loss, the token count it was divided by or None) as `loss_type` aggregates."""
    masked_sum = (per_token * mask).sum()  # ()
    if loss_type in ("grpo", "sapo"):
        return masked_mean(per_token, mask, axis=1).mean(), None  # ()
    if loss_type == "bnpo":
        return masked_sum / mx.maximum(mask.sum(), 1.0), None  # ()
    if loss_type == "dr_grpo":
        length = mask.shape[1] if max_completion_length is None else max_completion_length
        return masked_sum / max(mask.shape[0] * length, 1), None  # ()
    if loss_type == "luspo":
        return (per_token * mask).sum(axis=1).mean(), None  # () sum over each sequence, mean over sequences
    count = mx.maximum(mask.sum() if num_items_in_batch is None else num_items_in_batch, 1.0)  # () dapo, cispo, vespo
    return masked_sum / count, count


def _clip_metrics(low, high, mask):
    """TRL's clip fractions from the (N, T) bool arrays of low- and high-clipped tokens."""
    low, high = low.astype(mx.float32), high.astype(mx.float32)  # (N, T)
    has_tokens = mask.sum(axis=1) > 0  # (N,) TRL's per-sequence extremes skip empty rows (NaN there)
    low_seq = masked_mean(low, mask, axis=1)  # (N,)
    high_seq = masked_mean(high, mask, axis=1)  # (N,)
    any_seq = has_tokens.any()  # ()
    return {
        M.CLIP_LOW: masked_mean(low, mask),
        M.CLIP_HIGH: masked_mean(high, mask),
        M.CLIP_REGION: masked_mean(mx.maximum(low, high), mask),
        M.CLIP_LOW_MIN: mx.where(any_seq, mx.where(has_tokens, low_seq, mx.inf).min(), 0.0),
        M.CLIP_HIGH_MAX: mx.where(any_seq, mx.where(has_tokens, high_seq, -mx.inf).max(), 0.0),
    }


def _gmpo(log_ratio, seq_advantages, advantages, mask, keep_h, keep_pi, kl, beta, eps_low, eps_high):
    """GMPO as TRL's experimental GMPOTrainer: see policy_loss. Returns (loss, metrics)."""
    clamped = mx.clip(log_ratio, -eps_low, eps_high)  # (N, T) log space
    clipped = mx.where(advantages > 0, mx.minimum(log_ratio, clamped), mx.maximum(log_ratio, clamped))  # (N, T)
    seq_mask = mask if keep_h is None else mask * keep_h  # (N, T) low-entropy tokens leave the mean
    coef = mx.exp(masked_mean(clipped, seq_mask, axis=1))  # (N,) the geometric mean of the ratios
    per_sequence = -coef * seq_advantages  # (N,)
    if keep_pi is not None:
        per_sequence = per_sequence * keep_pi[:, 0]  # (N,) an extension: TRL's GMPO has no such mask
    if kl is not None:
        per_sequence = per_sequence + beta * masked_mean(kl, mask, axis=1)  # (N,)
    sg = mx.stop_gradient(log_ratio)  # (N, T)
    low = (sg < -eps_low) & (advantages < 0)  # (N, T)
    high = (sg > eps_high) & (advantages > 0)  # (N, T)
    return per_sequence.mean(), _clip_metrics(low, high, mask)


def _with_entropy_bonus(loss, metrics, loss_type, entropy, coef, mask, keep_h, count):
    """loss − coef · H̄, H̄ the mean entropy of the tokens the policy term acts on; for the
    token-sum types (count given) the sum over them / that same count, as TRL, so that summed
    over micro-batches it is the batch's mean."""
    if _is_zero(coef):
        return loss, metrics
    eff = mask if keep_h is None else mask * keep_h  # (N, T)
    h = entropy.astype(mx.float32)  # (N, T), may carry a gradient
    bonus = (h * eff).sum() / count if count is not None else masked_mean(h, eff)  # ()
    metrics[M.POLICY_LOSS] = mx.stop_gradient(loss)  # ()
    return loss - coef * bonus, metrics
