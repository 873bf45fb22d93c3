"""Advantages, token log-probabilities and the GRPO-family loss: pure functions over mx.array.

Shapes: B prompts, G completions per prompt, N = B·G sequences, T completion tokens, V vocab.
Everything here is lazy: no I/O, no printing, no `.item()`; the trainer evaluates once per step.

Choices, stated once (see DESIGN.md §5):
- Advantages use the group mean and a sample std (n−1 denominator, like torch.std). A group of
  one completion has no spread: its std is taken as 0, so its advantage is 0 rather than NaN.
- Arithmetic is float32 whatever the input dtype; masks may be bool or float.
- Only `logp` carries gradient: `old_logp`, `ref_logp` and the advantages are stop_gradient'ed.
- The KL term (k3 estimator) is computed only when beta > 0, and the `kl` metric is reported
  only then, as TRL does: with beta == 0 the trainer need not run the reference pass at all.
- Every count used as a divisor is clamped to >= 1, so an all-padding sequence gives 0, not NaN.
- With one update per rollout (μ = 1) old_logp == logp, ρ == 1 and clipping never fires;
  the clip_ratio metrics then read 0, which is the truth, not a bug.
"""

import mlx.core as mx

SCALES = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


def masked_mean(x, mask, axis=None):
    """Mean of `x` over the positions where `mask` is set; empty slices give 0, not NaN."""
    x, mask = mx.broadcast_arrays(x, mask.astype(mx.float32))  # common shape, e.g. (N, T)
    total = (x * mask).sum(axis=axis)  # x reduced over axis
    count = mx.maximum(mask.sum(axis=axis), 1.0)  # x reduced over axis
    return total / count


def _sample_std(x, axis=None, keepdims=False):
    """Standard deviation with the n−1 denominator (torch.std's default); n == 1 gives 0."""
    n = x.size if axis is None else x.shape[axis]
    mean = x.mean(axis=axis, keepdims=True)  # x reduced over axis, kept
    var = ((x - mean) ** 2).sum(axis=axis, keepdims=keepdims) / max(n - 1, 1)  # reduced
    return mx.sqrt(var)


def group_advantages(rewards, scale="group", eps=1e-4):
    """Advantage of each completion relative to its group: (r − group mean) / (std + eps).

    `scale` picks the std: "group" (each group's own), "batch" (over all B·G rewards, which
    damps the boost that near-constant groups get from a tiny std, as in Dr. GRPO/TRL), or
    "none" (no division: the mean-centred reward).
    """
    if scale not in SCALES:
        raise ValueError(f"unknown advantage scale {scale!r}; valid values: {', '.join(SCALES)}")
    if rewards.ndim != 2:
        raise ValueError(f"rewards must have shape (B, G), got {tuple(rewards.shape)}")
    rewards = rewards.astype(mx.float32)  # (B, G)
    centred = rewards - rewards.mean(axis=1, keepdims=True)  # (B, G)
    if scale == "none":
        return centred  # (B, G)
    if scale == "group":
        std = _sample_std(rewards, axis=1, keepdims=True)  # (B, 1)
    else:
        std = _sample_std(rewards)  # ()
    return centred / (std + eps)  # (B, G)


def token_logprobs_from_logits(logits, targets, temperature=1.0):
    """log_softmax(logits / temperature) at `targets`, in float32, never building the
    full (N, T, V) log-softmax.

    logits (N, T, V), targets (N, T) int → (N, T). The sampler draws from logits / temperature,
    so the training log-probabilities must use the same tempered distribution.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    scaled = logits.astype(mx.float32)  # (N, T, V)
    if temperature != 1.0:
        scaled = scaled / temperature  # (N, T, V)
    log_norm = mx.logsumexp(scaled, axis=-1)  # (N, T)
    picked = mx.take_along_axis(scaled, targets[..., None], axis=-1).squeeze(-1)  # (N, T)
    return picked - log_norm  # (N, T)


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
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(
            f"unknown importance_sampling_level {importance_sampling_level!r}; "
            f"valid values: {', '.join(IMPORTANCE_SAMPLING_LEVELS)}"
        )
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
    per_token = -mx.minimum(ratio * advantages, clipped_ratio * advantages)  # (N, T)

    metrics = {}
    if beta > 0:
        ref_minus_logp = mx.stop_gradient(ref_logp.astype(mx.float32)) - logp  # (N, T)
        kl = mx.exp(ref_minus_logp) - ref_minus_logp - 1.0  # (N, T) k3, >= 0, unbiased
        per_token = per_token + beta * kl  # (N, T)
        metrics["kl"] = masked_mean(mx.stop_gradient(kl), mask)  # ()

    masked_sum = (per_token * mask).sum()  # ()
    if loss_type == "grpo":
        per_sequence = masked_mean(per_token, mask, axis=1)  # (N,)
        loss = per_sequence.mean()  # ()
    elif loss_type == "bnpo":
        loss = masked_sum / mx.maximum(mask.sum(), 1.0)  # ()
    elif loss_type == "dr_grpo":
        length = mask.shape[1] if max_completion_length is None else max_completion_length
        loss = masked_sum / max(mask.shape[0] * length, 1)  # ()
    else:  # dapo
        count = mask.sum() if num_items_in_batch is None else num_items_in_batch  # ()
        loss = masked_sum / mx.maximum(count, 1.0)  # ()

    ratio = mx.stop_gradient(ratio)  # (N, T) or (N, 1)
    low = (ratio < 1.0 - eps_low) & (advantages < 0)  # (N, T)
    high = (ratio > 1.0 + eps_high) & (advantages > 0)  # (N, T)
    metrics["clip_ratio/low_mean"] = masked_mean(low.astype(mx.float32), mask)  # ()
    metrics["clip_ratio/high_mean"] = masked_mean(high.astype(mx.float32), mask)  # ()
    metrics["clip_ratio/region_mean"] = masked_mean((low | high).astype(mx.float32), mask)  # ()
    return loss, metrics
