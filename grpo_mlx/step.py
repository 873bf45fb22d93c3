"""The stages of one GRPO step, each a function of what it needs, over typed records.

    collect_groups      sample G completions per prompt and score them (dynamic sampling refills)
    make_batch          grpo_mlx.batch: the kept groups as one padded batch             -> Batch
    reference_logprobs  the reference policy's log-probs (adapters off), for the KL       -> (N, T)
    sequence_kl         classic RLHF shaping: each completion's KL, subtracted from reward -> (N,)
    compute_advantages  grpo_mlx.advantages: group-relative advantages               -> (N,) | (N, T)
    update_policy       μ passes x micro-batches of loss + gradients, clip, AdamW       -> Update
    step_metrics        TRL-named figures of the global batch                          -> dict
    sample_groups       what samples.jsonl and the TUI show of each group              -> list[dict]

Determinism: the data order is a function of (seed, epoch) and each prompt's samples of (seed,
its place in the data stream), so a resumed run, or several ranks, repeat what one
uninterrupted process would have done.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from grpo_mlx import metric_names as M
from grpo_mlx.batch import Batch, Group
from grpo_mlx.logprobs import completion_logprobs
from grpo_mlx.loss import kl_divergence, mismatch_weights, policy_loss
from grpo_mlx.rewards import RewardResult
from grpo_mlx.sampler import Rollout
from grpo_mlx.world import World

PHASES = ("rollout", "rewards", "reference", "update")  # reported as time/<phase>, in seconds


# ------------------------------------------------------------------ data order and seeds


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7919) % (2**31)


def prompt_seed(seed: int, position: int) -> int:
    return (seed * 2_654_435_761 + position * 40_503 + 12_345) % (2**31)


def batch_at(n_examples: int, seed: int, position: int, count: int) -> list[int]:
    """Indices `position .. position+count-1` of an endless stream of per-epoch shuffles."""
    out = []
    while len(out) < count:
        epoch, offset = divmod(position + len(out), n_examples)
        order = np.random.default_rng([seed, epoch]).permutation(n_examples)
        out.extend(order[offset : offset + count - len(out)].tolist())
    return out


class Timing(dict):
    """Seconds per phase of one step; every phase is reported, 0 when it did not run."""

    def __init__(self):
        super().__init__(dict.fromkeys(PHASES, 0.0))

    @contextlib.contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[name] += time.perf_counter() - t0


# ------------------------------------------------------------------ 1. collect scored groups


@dataclass
class Collected:
    groups: list[Group]  # the groups kept for training, in data order
    position: int  # the data stream's position after this step's draws
    resample_rounds: int  # extra rounds dynamic sampling drew
    frac_reward_zero_std: float  # share of the sampled groups whose rewards were all equal


def collect_groups(
    examples: list[dict],
    position: int,
    *,
    batch_size: int,
    group_size: int,
    seed: int,
    world: World,
    sample: Callable[[list[dict], list[int]], Rollout],
    score: Callable[[list[dict], Rollout], RewardResult],
    timing: Timing,
    dynamic_sampling: bool = False,
    max_resample_rounds: int = 0,
) -> Collected:
    """Draw `batch_size` prompts from `position` of the data stream (this rank samples its share),
    sample and score G completions of each. With dynamic sampling (DAPO), groups whose rewards
    are all equal (no learning signal) are replaced by fresh prompts, at most N extra rounds."""
    G = group_size
    kept: list[Group] = []
    rounds = n_sampled = n_zero_std = 0
    while True:
        need = batch_size - len(kept)
        chosen = [examples[i] for i in world.share(batch_at(len(examples), seed, position, need))]
        places = world.share(list(range(position, position + need)))
        position += need
        with timing.phase("rollout"):  # a prompt's samples depend on its place, not on the rank
            rollout = sample(chosen, [prompt_seed(seed, p) for p in places])
        with timing.phase("rewards"):
            scored = score(chosen, rollout)
        zero_std = np.ptp(scored.total.reshape(len(chosen), G), axis=1) == 0  # (b,)
        n_sampled += len(chosen)
        n_zero_std += int(zero_std.sum())
        drawn = [
            Group(
                ex,
                rollout.select(slice(b * G, (b + 1) * G), len(ex["prompt_ids"])),
                scored.select(slice(b * G, (b + 1) * G)),
                bool(zero_std[b]),
            )
            for b, ex in enumerate(chosen)
        ]
        kept += [g for g in drawn if not (dynamic_sampling and g.zero_std)]
        if not dynamic_sampling or len(kept) >= batch_size or rounds >= max_resample_rounds:
            break
        rounds += 1
    if not kept:  # every group was flat even after resampling: train on the last round
        kept = drawn
    return Collected(kept, position, rounds, n_zero_std / max(n_sampled, 1))


# ------------------------------------------------------------------ 3. the reference policy


def reference_logprobs(model: nn.Module, reference: Callable, batch: Batch, temperature: float) -> mx.array:
    """(N, T) log-probabilities under `reference()` (a context that switches the model to the
    reference policy), evaluated, without gradient."""
    model.eval()  # no adapter dropout in the reference pass
    try:
        with reference():  # the graph is built inside: adapter scales are read when it is built
            ref_logp = mx.stop_gradient(
                completion_logprobs(model, batch.tokens, batch.prompt_lens, batch.mask.shape[1], temperature)
            )  # (N, T)
        mx.eval(ref_logp)
    finally:
        model.train()
    return ref_logp


def sequence_kl(model: nn.Module, batch: Batch, ref_logp: mx.array, temperature: float, estimator: str):
    """Each completion's summed KL to the reference, (N,) numpy, and the mean KL per token."""
    model.eval()
    try:
        now = completion_logprobs(model, batch.tokens, batch.prompt_lens, batch.mask.shape[1], temperature)  # (N, T)
        kl_tok = kl_divergence(now, ref_logp, estimator) * batch.mask  # (N, T)
        kl_seq = np.array(kl_tok.sum(axis=1))  # (N,)
        kl_mean = float(kl_tok.sum().item() / max(batch.mask.sum().item(), 1.0))
    finally:
        model.train()
    return kl_seq, kl_mean


# ------------------------------------------------------------------ 5. update the adapters


@dataclass(frozen=True)
class Objective:
    """What the update needs besides policy_loss's keywords (TRL's options that act on the
    whole batch, not one micro-batch): with the defaults the update is plain GRPO."""

    mask_truncated: bool = False  # mask_truncated_completions: cut completions leave the loss
    top_entropy_quantile: float = 1.0  # < 1: the loss acts on the batch's high-entropy tokens
    entropy_bonus: bool = False  # entropy_coef (fixed or adaptive) may be non-zero
    off_policy_mask: bool = False  # off_policy_mask_threshold is set: the sampler's log-probs go in
    mismatch: dict | None = None  # importance-sampling correction: mode, clip_max, clip_min

    @property
    def entropy(self) -> str | None:
        """What the training pass computes besides the log-probs."""
        if self.entropy_bonus:
            return "grad"
        return "value" if self.top_entropy_quantile < 1.0 else None


def make_loss_and_grad(model: nn.Module, temperature: float, entropy: str | None = None, **loss_options):
    """The compiled (loss, metrics, logp, gradients) of one micro-batch, with the model's state
    and the random state as the compiled function's state. `loss_options` go to policy_loss;
    `entropy` ("value" or "grad") adds the per-token entropy to the pass (Objective.entropy).
    The per-step inputs that are not always present travel in `extra`, a dict of arrays."""

    def loss_fn(tokens, prompt_lens, mask, advantages, old_logp, ref_logp, n_items, extra):
        out = completion_logprobs(model, tokens, prompt_lens, mask.shape[1], temperature, entropy=entropy)
        logp, ent, ent_value = (out, None, None) if entropy is None else (*out, None)[:3]  # (n, T) each
        old = mx.stop_gradient(logp) if old_logp is None else old_logp  # (n, T)
        loss, metrics = policy_loss(logp, old, ref_logp, advantages, mask, num_items_in_batch=n_items, entropy=ent,
                                    entropy_value=ent_value, **extra, **loss_options)  # fmt: skip
        return loss, metrics, logp

    value_and_grad = nn.value_and_grad(model, loss_fn)

    def step(*args):
        (loss, metrics, logp), grads = value_and_grad(*args)
        return loss, metrics, logp, grads

    state = [model.state, mx.random.state]
    return mx.compile(step, inputs=state, outputs=state)


def policy_pass(model: nn.Module, batch: Batch, temperature: float, micro: list, entropy: bool):
    """The current policy's log-probs (and entropies) of the whole batch, without gradient, in
    eval mode, micro-batch by micro-batch: for what must be known over the whole batch before
    the first gradient pass. Returns (logp (N, T), entropy (N, T) | None), evaluated."""
    model.eval()
    try:
        logps, ents = [], []
        for rows in micro:
            out = completion_logprobs(
                model,
                batch.tokens[rows],
                batch.prompt_lens[rows],
                batch.mask.shape[1],
                temperature,
                entropy="value" if entropy else None,
            )
            logp, ent = out if entropy else (out, None)
            mx.eval(logp, ent)
            logps.append(logp)
            ents.append(ent)
    finally:
        model.train()
    return mx.concatenate(logps), mx.concatenate(ents) if entropy else None


def training_mask(batch: Batch, mask_truncated: bool):
    """(N, T) completion-token mask of the loss: DAPO's overlong filtering takes the
    completions cut at the length limit out of it (their tokens, the KL, the token count)."""
    if not mask_truncated:
        return batch.mask
    cut = np.array([r == "length" for r in batch.rollout.finish_reasons])  # (N,)
    return batch.mask * mx.array(1.0 - cut.astype(np.float32))[:, None]  # (N, T)


def sampling_logprobs(batch: Batch):
    """(N, T) the log-probs the sampler recorded, padded to the training width."""
    lp = batch.rollout.logprobs  # (N, t)
    T = batch.mask.shape[1]
    return mx.array(np.pad(lp, ((0, 0), (0, T - lp.shape[1]))))  # (N, T)


def entropy_threshold_over(entropy, mask, top_entropy_quantile: float, world: World) -> mx.array:
    """The top_entropy_quantile threshold over every completion token of the global batch (all
    micro-batches, all ranks): torch.quantile's linear rule, the one policy_loss uses within a
    call. No token: +inf (none kept)."""
    values = np.array(entropy)[np.array(mask) > 0]  # this rank's completion tokens
    values = world.gather_ragged(values.astype(np.float32))
    if values.size == 0:
        return mx.array(np.inf, dtype=mx.float32)
    return mx.array(np.quantile(values.astype(np.float64), 1.0 - top_entropy_quantile), dtype=mx.float32)


@dataclass
class Update:
    losses: list  # () mx.array per micro-batch pass
    grad_norms: list  # () mx.array per optimizer update
    metrics: dict  # name -> list of () mx.array, one per micro-batch pass
    skipped: bool = False  # a non-finite loss or gradient norm: nothing more was applied


def update_policy(
    model,
    optimizer,
    loss_and_grad,
    batch: Batch,
    advantages,
    ref_logp,
    *,
    num_iterations: int,
    micro_batches: int,
    max_grad_norm: float,
    world: World,
    objective: Objective = Objective(),
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
) -> Update:
    """μ = num_iterations optimizer updates on the batch; each accumulates the gradients of
    `micro_batches` slices. The first pass's log-probabilities are the "old" policy of the later
    ones. A non-finite update is never applied (every rank takes the same decision).
    `objective` adds TRL's batch-wide options; `temperature` is the sampling temperature (for
    the forward-only pass some of them need)."""
    k = micro_batches
    n = batch.tokens.shape[0]
    micro = [slice(i * n // k, (i + 1) * n // k) for i in range(k)]
    mask = training_mask(batch, objective.mask_truncated)  # (N, T)
    n_items = world.mean(mask.sum()) / k  # dapo: normalised by the whole batch's tokens
    sampled = sampling_logprobs(batch)  # (N, T)
    batch_wide_entropy = objective.top_entropy_quantile < 1.0 and (k > 1 or world.size > 1)
    extra, seen = _batch_inputs(model, batch, mask, sampled, micro, objective, entropy_coef, temperature,
                                batch_wide_entropy)  # fmt: skip
    old_logps, first_logps = [None] * k, []
    update = Update([], [], {key: [v] for key, v in seen.items()})
    model.train()
    for it in range(num_iterations):
        acc = None
        if batch_wide_entropy:  # the threshold over the batch as the policy is now
            if it > 0 or "entropy" not in extra:
                extra["entropy"] = policy_pass(model, batch, temperature, micro, entropy=True)[1]
            extra["entropy_threshold"] = entropy_threshold_over(
                extra.pop("entropy"), mask, objective.top_entropy_quantile, world
            )
        for j, rows in enumerate(micro):
            loss, metrics, logp, grads = loss_and_grad(
                batch.tokens[rows],
                batch.prompt_lens[rows],
                mask[rows],
                advantages[rows],
                old_logps[j],
                None if ref_logp is None else ref_logp[rows],
                n_items,
                {key: v if v.ndim == 0 else v[rows] for key, v in extra.items()},
            )
            if it == 0:
                first_logps.append(mx.stop_gradient(logp))
                if num_iterations > 1:
                    old_logps[j] = first_logps[-1]  # "old" policy = the first pass
            acc = grads if acc is None else tree_map(mx.add, acc, grads)
            update.losses.append(loss)
            for key, v in metrics.items():
                update.metrics.setdefault(key, []).append(v)
            if k > 1:  # free this slice's activations before the next: what micro-batches are for
                mx.eval(acc, loss, metrics, first_logps[-1] if it == 0 else [])
        if k > 1:
            acc = tree_map(lambda g: g / k, acc)
        acc = world.average_gradients(acc)  # data parallel: the global batch's gradient
        if max_grad_norm > 0:
            acc, norm = optim.clip_grad_norm(acc, max_grad_norm)
        else:
            norm = mx.sqrt(sum((g * g).sum() for _, g in tree_flatten(acc)))
        update.grad_norms.append(norm)
        if not world.all(mx.isfinite(norm) & mx.all(mx.isfinite(mx.stack(update.losses)))).item():
            update.skipped = True
            return update
        optimizer.update(model, acc)
        mx.eval(model.trainable_parameters(), optimizer.state, update.metrics)
    if objective.mismatch is None:  # the sampler/trainer mismatch, measured at no extra cost
        _, seen = mismatch_weights(mx.concatenate(first_logps), sampled, mask)
        update.metrics.update({key: [v] for key, v in seen.items() if "logp_difference" in key})
    return update


def _batch_inputs(model, batch, mask, sampled, micro, objective, entropy_coef, temperature, batch_wide_entropy):
    """The per-row inputs of the loss that need the whole batch first (sliced per micro-batch
    later; scalars as they are): the sampler's log-probs for the off-policy mask, the mismatch
    correction's weights (from one forward pass of the policy that sampled), the entropy
    coefficient. A forward pass made for the weights also gives the entropies of pass 1.
    Returns (extra, the mismatch metrics)."""
    extra, seen = {}, {}
    if objective.off_policy_mask:
        extra["sampling_logp"] = sampled
    if objective.entropy_bonus:
        extra["entropy_coef"] = mx.array(entropy_coef, dtype=mx.float32)
    if objective.mismatch is not None:
        old, ent = policy_pass(model, batch, temperature, micro, entropy=batch_wide_entropy)
        weights, seen = mismatch_weights(old, sampled, mask, **objective.mismatch)
        extra["importance_sampling_ratio"] = weights  # (N, T) or (N, 1)
        if ent is not None:
            extra["entropy"] = ent  # (N, T) taken out before the first pass
    return extra, seen


# ------------------------------------------------------------------ 6. report


def step_metrics(
    batch: Batch,
    shown: np.ndarray,
    collected: Collected,
    update: Update,
    *,
    group_size: int,
    learning_rate: float,
    timing: Timing,
    step_time: float,
    kl: float | None,
    dynamic_sampling: bool,
    world: World,
    logged: dict | None = None,
) -> dict:
    """The step's figures with TRL's names, over the global batch: per-completion values are
    gathered from every rank, per-rank figures averaged. `shown` (N,) is the reward reported;
    `logged`: what reward functions logged with log_metric (this rank's), under their names."""
    G = group_size
    shown, lengths = world.gather(shown), world.gather(batch.rollout.lengths)
    clipped = world.gather(np.array([r == "length" for r in batch.rollout.finish_reasons], dtype=np.float32))
    entropy = batch.rollout.entropy
    entropy = None if entropy is None else world.gather(entropy.sum(axis=1))  # (N,) per completion
    own_tokens = world.gather(batch.rollout.mask.sum(axis=1))  # (N,) the model's tokens (no tool results)
    per_fn = {k: world.gather(v) for k, v in batch.rewards.per_function.items()}
    B = len(shown) // G
    n_gen = int(lengths.sum())
    metrics = {
        M.REWARD: float(shown.mean()),
        M.REWARD_STD: float(shown.reshape(B, G).std(axis=1, ddof=1).mean()),
        M.FRAC_REWARD_ZERO_STD: float(world.mean(mx.array(collected.frac_reward_zero_std)).item()),
        M.LOSS: float(world.mean(mx.mean(mx.stack(update.losses))).item()),
        M.GRAD_NORM: float(mx.mean(mx.stack(update.grad_norms)).item()),
        M.LEARNING_RATE: learning_rate,
        M.MEAN_LENGTH: float(lengths.mean()),
        M.MIN_LENGTH: int(lengths.min()),
        M.MAX_LENGTH: int(lengths.max()),
        M.CLIPPED_RATIO: float(clipped.mean()),
        **({} if entropy is None else {M.ENTROPY: float(entropy.sum() / max(own_tokens.sum(), 1))}),
        M.NUM_TOKENS: n_gen,
        M.STEP_TIME: step_time,
        M.TOKENS_PER_SECOND: n_gen / max(timing["rollout"], 1e-9),
        M.PEAK_MEMORY_GB: mx.get_peak_memory() / 1e9,
        **{M.time_of(k): v for k, v in timing.items()},
    }
    if dynamic_sampling:
        metrics[M.RESAMPLE_ROUNDS] = collected.resample_rounds
    if kl is not None:
        metrics[M.KL] = kl
    for key, vals in update.metrics.items():  # the training pass's entropy replaces the sampler's
        metrics[key] = _over_passes(key, vals, world)
    for name, vals in per_fn.items():
        finite = vals[~np.isnan(vals)]
        metrics[M.reward_mean(name)] = float(finite.mean()) if finite.size else float("nan")
        metrics[M.reward_std(name)] = float(finite.std(ddof=1)) if finite.size > 1 else 0.0
    return {**(logged or {}), **metrics}  # a logged name never hides a built-in figure


def _over_passes(key: str, values: list, world: World) -> float:
    """One figure from a metric's per-pass values on every rank: extremes stay extremes (TRL's
    */min and *_max figures), the rest is the mean."""
    v = mx.stack(values)
    if key.endswith(("_min", "/min")):
        return float(world.min(v.min()).item())
    if key.endswith(("_max", "/max")):
        return float(world.max(v.max()).item())
    return float(world.mean(mx.mean(v)).item())


def sample_groups(batch: Batch, shown: np.ndarray, advantages: np.ndarray, group_size: int, limit: int) -> list[dict]:
    """The first `limit` groups (all when negative) as samples.jsonl holds them; shown and
    advantages (N,)."""
    G = group_size
    roll = batch.rollout
    per_fn = batch.rewards.per_function
    count = len(batch.examples) if limit < 0 else min(limit, len(batch.examples))
    groups = []
    for b, ex in enumerate(batch.examples[:count]):
        completions = []
        for i in range(b * G, (b + 1) * G):
            completions.append(
                dict(
                    text=roll.texts[i],
                    rewards={name: (None if math.isnan(v[i]) else float(v[i])) for name, v in per_fn.items()},
                    reward=float(shown[i]),
                    advantage=float(advantages[i]),
                    length=int(roll.lengths[i]),
                    finish_reason=roll.finish_reasons[i],
                    **({"extra": {c: v[i] for c, v in batch.rewards.extra.items()}} if batch.rewards.extra else {}),
                    **({"turns": roll.turns[i]} if roll.turns is not None and roll.turns[i] is not None else {}),
                )
            )
        groups.append(
            dict(prompt=ex["prompt"], prompt_text=ex["prompt_text"], answer=ex.get("answer"), completions=completions)
        )
    return groups
