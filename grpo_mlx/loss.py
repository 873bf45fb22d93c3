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

import mlx.core as mx

from grpo_mlx import metric_names as M
from grpo_mlx.config import IMPORTANCE_LEVELS, KL_ESTIMATORS, LOSS_TYPES


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
):
    """Clipped surrogate + β·KL over completion tokens, aggregated by `loss_type`.

    logp, old_logp, ref_logp, mask: (N, T); advantages: (N,) per sequence or (N, T) per token.
    ref_logp may be None when beta == 0. Returns (scalar loss, dict of scalar metrics).

    loss_type:
      grpo     mean over each sequence's tokens, then mean over sequences (favours short answers)
      bnpo     sum over all masked tokens / masked tokens in this batch
      dr_grpo  sum / (N · max_completion_length); max_completion_length None → T
      dapo     sum / num_items_in_batch, the completion-token count of the whole generation
               batch (for gradient accumulation over micro-batches); None → this batch's count
      cispo    MiniMax-M1's objective, aggregated as dapo: −sg(min(ρ, 1 + ε_high)) · A · logp.
               The importance weight is capped and held constant, so every token keeps a
               gradient (PPO-style clipping drops the clipped tokens' gradients instead).
    kl_estimator (for KL = KL(π || ref), with x = ref − logp):  k1 = −x,  k2 = x²/2,
      k3 = exp(x) − x − 1 (Schulman; non-negative, unbiased). Added to the loss as β·KL_it.
    delta: two-sided clipping: for A < 0 the unclipped ratio is also capped at δ (> 1 + ε), so
      one very unlikely token cannot produce an unbounded negative update.
    importance_sampling_level:
      token     ρ_it = exp(logp_it − old_logp_it)
      sequence  GSPO: ρ_i = exp(masked mean_t (logp_it − old_logp_it)), shared by all tokens;
                its gradient flows through the mean of the sequence's log-probabilities.

    Metrics (fractions of masked tokens; sequence-level ρ is counted per token):
      clip_ratio/low_mean     ρ < 1 − ε_low  and A < 0   (the lower clip is selected by the min)
      clip_ratio/high_mean    ρ > 1 + ε_high and A > 0   (the upper clip is selected by the min)
      clip_ratio/region_mean  either of the two: tokens whose gradient the clip cuts off
      kl                      masked mean over tokens of KL_it; only when beta > 0
    """
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
    eps_low = epsilon
    eps_high = epsilon if epsilon_high is None else epsilon_high

    logp = logp.astype(mx.float32)  # (N, T)
    old_logp = mx.stop_gradient(old_logp.astype(mx.float32))  # (N, T)
    mask = mask.astype(mx.float32)  # (N, T)
    advantages = mx.stop_gradient(advantages.astype(mx.float32))  # (N,) or (N, T)
    if advantages.ndim == 1:
        advantages = advantages[:, None]  # (N, 1)

    log_ratio = logp - old_logp  # (N, T)
    if importance_sampling_level == "sequence":
        log_ratio = masked_mean(log_ratio, mask, axis=1)[:, None]  # (N, 1)
    ratio = mx.exp(log_ratio)  # (N, T) or (N, 1)
    clipped_ratio = mx.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)  # (N, T) or (N, 1)
    metrics = {}
    if loss_type == "cispo":
        weight = mx.stop_gradient(mx.minimum(ratio, 1.0 + eps_high))  # (N, T) or (N, 1)
        per_token = -weight * advantages * logp  # (N, T)
    else:
        unclipped = ratio if delta is None else mx.minimum(ratio, delta)  # (N, T) or (N, 1)
        per_token = -mx.minimum(unclipped * advantages, clipped_ratio * advantages)  # (N, T)
        if delta is not None:
            capped = (mx.stop_gradient(ratio) > delta) & (advantages < 0)  # (N, T)
            metrics[M.CLIP_DELTA] = masked_mean(capped.astype(mx.float32), mask)  # ()

    if beta > 0:
        kl = kl_divergence(logp, mx.stop_gradient(ref_logp.astype(mx.float32)), kl_estimator)  # (N, T)
        per_token = per_token + beta * kl  # (N, T)
        metrics[M.KL] = masked_mean(mx.stop_gradient(kl), mask)  # ()

    masked_sum = (per_token * mask).sum()  # ()
    if loss_type == "grpo":
        per_sequence = masked_mean(per_token, mask, axis=1)  # (N,)
        loss = per_sequence.mean()  # ()
    elif loss_type == "bnpo":
        loss = masked_sum / mx.maximum(mask.sum(), 1.0)  # ()
    elif loss_type == "dr_grpo":
        length = mask.shape[1] if max_completion_length is None else max_completion_length
        loss = masked_sum / max(mask.shape[0] * length, 1)  # ()
    else:  # dapo, cispo
        count = mask.sum() if num_items_in_batch is None else num_items_in_batch  # ()
        loss = masked_sum / mx.maximum(count, 1.0)  # ()

    ratio = mx.stop_gradient(ratio)  # (N, T) or (N, 1)
    if loss_type == "cispo":  # the weight is capped whatever the sign of A; no lower clip
        low = mx.zeros(per_token.shape, dtype=mx.bool_)  # (N, T)
        high = mx.broadcast_to(ratio > 1.0 + eps_high, per_token.shape)  # (N, T)
    else:
        low = (ratio < 1.0 - eps_low) & (advantages < 0)  # (N, T)
        high = (ratio > 1.0 + eps_high) & (advantages > 0)  # (N, T)
    metrics[M.CLIP_LOW] = masked_mean(low.astype(mx.float32), mask)  # ()
    metrics[M.CLIP_HIGH] = masked_mean(high.astype(mx.float32), mask)  # ()
    metrics[M.CLIP_REGION] = masked_mean((low | high).astype(mx.float32), mask)  # ()
    return loss, metrics
