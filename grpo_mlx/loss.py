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
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")
KL_ESTIMATORS = ("k1", "k2", "k3")
BASELINES = ("mean", "leave_one_out")
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


def group_advantages(rewards, scale="group", eps=1e-4, *, baseline="mean"):
    """Advantage of each completion relative to its group: (r − group mean) / (std + eps).

    `scale` picks the std: "group" (each group's own), "batch" (over all B·G rewards, which
    damps the boost that near-constant groups get from a tiny std, as in Dr. GRPO/TRL), or
    "none" (no division: the mean-centred reward).
    `baseline` "leave_one_out" (RLOO) subtracts the mean of the *other* G−1 rewards instead,
    which equals G/(G−1) · (r − group mean); the std scaling then applies as chosen.
    """
    if scale not in SCALES:
        raise ValueError(f"unknown advantage scale {scale!r}; valid values: {', '.join(SCALES)}")
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; valid values: {', '.join(BASELINES)}")
    if rewards.ndim != 2:
        raise ValueError(f"rewards must have shape (B, G), got {tuple(rewards.shape)}")
    rewards = rewards.astype(mx.float32)  # (B, G)
    centred = rewards - rewards.mean(axis=1, keepdims=True)  # (B, G)
    G = rewards.shape[1]
    if baseline == "leave_one_out" and G > 1:
        centred = centred * (G / (G - 1))  # (B, G) r_i − mean of the others
    if scale == "none":
        return centred  # (B, G)
    if scale == "group":
        std = _sample_std(rewards, axis=1, keepdims=True)  # (B, 1)
    else:
        std = _sample_std(rewards)  # ()
    return centred / (std + eps)  # (B, G)


def combined_advantages(rewards, weights, combine="sum", scale="group", eps=1e-4, *, baseline="mean"):
    """Advantages from K reward functions, rewards (K, B, G), weights (K,).

    combine "sum": weighted sum of the rewards, then one normalisation (GRPO as published).
    combine "normalize_each": each function's rewards normalised in its group first, then the
    weighted sum, so a reward with a large range cannot drown the others (as in GDPO).
    """
    weights = mx.array(weights, dtype=mx.float32)[:, None, None]  # (K, 1, 1)
    rewards = rewards.astype(mx.float32)  # (K, B, G)
    if combine == "sum":
        return group_advantages((weights * rewards).sum(axis=0), scale, eps, baseline=baseline)  # (B, G)
    if combine == "normalize_each":
        per_fn = [group_advantages(r, scale, eps, baseline=baseline) for r in rewards]  # K x (B, G)
        return (weights * mx.stack(per_fn)).sum(axis=0)  # (B, G)
    raise ValueError(f"unknown reward combination {combine!r}; valid values: sum, normalize_each")


def process_advantages(step_rewards, step_index, step_mask, group_size, num_tokens, eps=1e-4):
    """Process supervision (DeepSeekMath §4.1.3): per-token advantages from step rewards.

    step_rewards, step_mask (N, S): the rewards of each completion's steps (padded, mask 1 for
    real steps); step_index (N, S) int: the token at which each step ends. Rewards are normalised
    over all steps of all G completions of a group: r̃ = (r − mean) / (std + eps). The advantage
    of token t is the sum of r̃ over the steps that end at or after t. Returns (N, T).
    """
    n, s = step_rewards.shape
    rewards = step_rewards.astype(mx.float32).reshape(n // group_size, group_size * s)  # (B, G·S)
    mask = step_mask.astype(mx.float32).reshape(rewards.shape)  # (B, G·S)
    count = mx.maximum(mask.sum(axis=1, keepdims=True), 1.0)  # (B, 1)
    mean = (rewards * mask).sum(axis=1, keepdims=True) / count  # (B, 1)
    var = (((rewards - mean) ** 2) * mask).sum(axis=1, keepdims=True) / mx.maximum(count - 1, 1.0)  # (B, 1)
    normed = ((rewards - mean) / (mx.sqrt(var) + eps) * mask).reshape(n, s)  # (N, S)
    at_token = mx.arange(num_tokens)[None, None, :] == step_index[..., None]  # (N, S, T)
    ends = (normed[..., None] * at_token).sum(axis=1)  # (N, T) r̃ placed at each step's last token
    return mx.cumsum(ends[:, ::-1], axis=1)[:, ::-1]  # (N, T) sum over steps ending at or after t


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
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(
            f"unknown importance_sampling_level {importance_sampling_level!r}; "
            f"valid values: {', '.join(IMPORTANCE_SAMPLING_LEVELS)}"
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
            metrics["clip_ratio/delta_mean"] = masked_mean(capped.astype(mx.float32), mask)  # ()

    if beta > 0:
        kl = kl_divergence(logp, mx.stop_gradient(ref_logp.astype(mx.float32)), kl_estimator)  # (N, T)
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
    metrics["clip_ratio/low_mean"] = masked_mean(low.astype(mx.float32), mask)  # ()
    metrics["clip_ratio/high_mean"] = masked_mean(high.astype(mx.float32), mask)  # ()
    metrics["clip_ratio/region_mean"] = masked_mean((low | high).astype(mx.float32), mask)  # ()
    return loss, metrics
