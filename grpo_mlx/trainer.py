"""The GRPO training loop: sample groups, score them, update the adapters.

One step:  prompts -> group sampler -> rewards -> group advantages -> [reference pass]
           -> mu x (loss + gradients over micro-batches -> clip -> AdamW) -> events, checkpoint

The trainer reports only through the event bus (grpo_mlx.events); the headless progress bar,
the JSONL files and the TUI are subscribers. Determinism: the random state is re-seeded from
(seed, step) at the start of every step and the data order is a function of (seed, epoch), so a
resumed run repeats exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from grpo_mlx import checkpoint, data, rewards
from grpo_mlx.blas import blas_name
from grpo_mlx.config import ConfigError, TrainConfig, default_run_dir, to_dict
from grpo_mlx.events import Control, EventBus, JsonlSink  # noqa: F401  (Control is re-exported)
from grpo_mlx.advantages import compute_advantages
from grpo_mlx.loss import kl_divergence, policy_loss
from grpo_mlx.policy import adapters_disabled, adapters_replaced, add_adapters, completion_logprobs, load_model
from grpo_mlx.sampler import Rollout, generate_groups
from grpo_mlx.errors import UserError

# Sequence lengths are padded to shape buckets so that the compiled step is traced once per bucket,
# not once per length: multiples of BUCKET up to 8 * BUCKET, then four sizes per octave (at most 25%
# padding): 16, 32, ..., 128, 160, 192, 224, 256, 320, ...
BUCKET = 16


class TrainingStopped(UserError, RuntimeError):
    """The run ended early on purpose (a reward function failed); a checkpoint was saved."""


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


def make_optimizer(cfg: TrainConfig) -> optim.Optimizer:
    total = max(cfg.iters * cfg.num_iterations, 1)
    decay = optim.cosine_decay(cfg.learning_rate, max(total - cfg.warmup_steps, 1), cfg.learning_rate * cfg.min_lr_ratio)
    schedule = decay
    if cfg.warmup_steps > 0:
        warmup = optim.linear_schedule(cfg.learning_rate / cfg.warmup_steps, cfg.learning_rate, cfg.warmup_steps)
        schedule = optim.join_schedules([warmup, decay], [cfg.warmup_steps])
    return optim.AdamW(learning_rate=schedule, weight_decay=cfg.weight_decay)


def _round_up(n: int, k: int) -> int:
    return max(k, -(-n // k) * k)


def training_arrays(prompt_ids: list[list[int]], rollout: Rollout, group_size: int, pad_id: int):
    """Right-padded [prompt | completion] rows for the teacher-forced pass.
    Returns tokens (N, L), prompt_lens (N,), completion mask (N, T) as mx arrays."""
    def bucket(size: int) -> int:
        granule = BUCKET
        while size > 8 * granule:
            granule *= 2
        return _round_up(size, granule)

    n, t = rollout.tokens.shape
    t_pad = bucket(t)
    lens = np.repeat([len(p) for p in prompt_ids], group_size)  # (N,)
    L = bucket(int(lens.max()) + t_pad)
    tokens = np.full((n, L), pad_id, dtype=np.int32)  # (N, L)
    for row in range(n):
        p = prompt_ids[row // group_size]
        tokens[row, : len(p)] = p
        tokens[row, len(p) : len(p) + t] = rollout.tokens[row]
    mask = np.zeros((n, t_pad), dtype=np.float32)  # (N, T)
    mask[:, :t] = rollout.mask
    return mx.array(tokens), mx.array(lens.astype(np.int32)), mx.array(mask)


class Trainer:
    def __init__(self, cfg: TrainConfig, bus: EventBus | None = None, control: Control | None = None):
        self.cfg = cfg
        self.bus = bus or EventBus()
        self.control = control or Control()
        self.run_dir = Path(cfg.resume or cfg.adapter_path or default_run_dir())
        self.cfg.adapter_path = str(self.run_dir)

    # ----------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        self.reward_fns = [
            rewards.resolve_reward(spec, max_completion_length=cfg.max_completion_length)
            for spec in cfg.reward_functions
        ]
        self.train_examples = data.load_split(cfg.data, "train", prompt_key=cfg.prompt_key, answer_key=cfg.answer_key)
        self.eval_examples = []
        if cfg.eval_limit > 0:
            for split in dict.fromkeys([cfg.eval_split, "valid", "test"]):
                found = data.load_split(cfg.data, split, prompt_key=cfg.prompt_key, answer_key=cfg.answer_key, required=False)
                if found:
                    self.eval_examples, self.eval_split_used = found[: cfg.eval_limit], split
                    break
        self.world = mx.distributed.init()  # a group of size 1 unless started by mlx.launch
        self.rank, self.size = self.world.rank(), self.world.size()
        if self.size > 1:
            self._check_ranks()
        mx.random.seed(cfg.seed)
        self.model, self.tokenizer = load_model(cfg.model)
        self.adapter_config = add_adapters(self.model, cfg)
        self.train_examples = data.prepare_examples(self.train_examples, self.tokenizer, cfg.system_prompt, cfg.max_prompt_length)
        self.eval_examples = data.prepare_examples(self.eval_examples, self.tokenizer, cfg.system_prompt, cfg.max_prompt_length)
        self._check_context()
        if not data.has_chat_template(self.tokenizer):
            self.bus.emit("message", level="warning", text=f"{cfg.model} has no chat template: prompts are used as plain text")
        eos = sorted(self.tokenizer.eos_token_ids)
        self.pad_id = eos[0] if eos else 0
        self.optimizer = make_optimizer(cfg)
        self.state = {"step": 0, "data_position": 0, "skipped_steps": 0}
        self.ref_adapters = None  # iterative GRPO: the adapters the reference was last reset to
        if cfg.resume:
            ckpt = checkpoint.latest_checkpoint(self.run_dir)
            if ckpt is None:
                raise FileNotFoundError(f"--resume {self.run_dir}: no complete checkpoint in {self.run_dir / 'checkpoints'}")
            self.state.update(checkpoint.load_checkpoint(ckpt, self.model, self.optimizer))
            if (ckpt / "reference.safetensors").exists():
                self.ref_adapters = mx.load(str(ckpt / "reference.safetensors"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:  # with several ranks only rank 0 writes the run directory
            with open(self.run_dir / "config.json", "w", encoding="utf-8") as f:
                json.dump(to_dict(cfg), f, indent=2)
        self._loss_and_grad = self._build_step()

    def _check_ranks(self) -> None:
        """Data parallelism needs each rank to take an equal share of whole groups and every rank
        to run the same configuration: refuse early, naming what differs."""
        cfg = self.cfg
        if cfg.batch_size % self.size:
            raise ConfigError(f"'batch_size' = {cfg.batch_size} prompts do not divide across {self.size} ranks; "
                              f"use a multiple of {self.size}")
        if cfg.dynamic_sampling:
            raise ConfigError("'dynamic_sampling' is not supported across several ranks yet (each rank would refill differently)")
        import hashlib

        shared = {k: v for k, v in to_dict(cfg).items() if k not in ("adapter_path", "resume")}
        digest = hashlib.sha256(json.dumps(shared, sort_keys=True).encode()).digest()
        mine = mx.array(list(digest[:16]), dtype=mx.float32)  # (16,) bytes, exact in float32
        total = mx.distributed.all_sum(mine, group=self.world)
        if not mx.array_equal(total, mine * self.size).item():
            raise ConfigError(f"rank {self.rank}: the ranks were started with different configurations "
                              f"(compare their flags and config files)")

    def _gather(self, x: np.ndarray) -> np.ndarray:
        """Concatenate every rank's rows, in rank order (the global batch's order)."""
        if self.size == 1:
            return x
        return np.array(mx.distributed.all_gather(mx.array(x), group=self.world))

    def _mean_over_ranks(self, value):
        if self.size == 1:
            return value
        return mx.distributed.all_sum(value, group=self.world) / self.size

    def _should_stop(self) -> bool:
        """A stop asked on any rank (Ctrl-C reaches them at different moments) stops all of them
        at the same step, so none waits forever in a collective."""
        stop = self.control.stop.is_set()
        if self.size == 1:
            return stop
        return mx.distributed.all_sum(mx.array(float(stop)), group=self.world).item() > 0

    def _check_context(self) -> None:
        """Refuse before training when a prompt plus a full completion cannot fit the model."""
        context = getattr(getattr(self.model, "args", None), "max_position_embeddings", None)
        if not context:
            return
        for split, examples in (("train", self.train_examples), ("held-out", self.eval_examples)):
            for i, ex in enumerate(examples):
                n = len(ex["prompt_ids"])
                if n + self.cfg.max_completion_length > context:
                    raise data.DataError(
                        f"{self.cfg.data}: {split} example {i} has {n} prompt tokens; with max_completion_length "
                        f"{self.cfg.max_completion_length} that exceeds the model's context of {context} tokens "
                        f"(shorten the prompt, lower --max-completion-length, or drop long prompts with --max-prompt-length)"
                    )

    def reference(self):
        """The reference policy: the base model (adapters off), or with --ref-update-every the
        adapters as they were at the last reference update."""
        if self.ref_adapters is None:
            return adapters_disabled(self.model)
        return adapters_replaced(self.model, self.ref_adapters)

    def _build_step(self):
        cfg = self.cfg
        model = self.model

        def loss_fn(tokens, prompt_lens, mask, advantages, old_logp, ref_logp, n_items):
            logp = completion_logprobs(model, tokens, prompt_lens, mask.shape[1], cfg.temperature)  # (n, T)
            old = mx.stop_gradient(logp) if old_logp is None else old_logp
            loss, metrics = policy_loss(
                logp, old, ref_logp, advantages, mask,
                loss_type=cfg.loss_type, epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high,
                beta=0.0 if cfg.kl_in_reward else cfg.beta, importance_sampling_level=cfg.importance_sampling_level,
                max_completion_length=cfg.max_completion_length, num_items_in_batch=n_items,
                kl_estimator=cfg.kl_estimator, delta=cfg.delta,
            )
            return loss, metrics, logp

        value_and_grad = nn.value_and_grad(model, loss_fn)

        def step(*args):
            (loss, metrics, logp), grads = value_and_grad(*args)
            return loss, metrics, logp, grads

        state = [model.state, mx.random.state]
        if os.environ.get("GRPO_MLX_NO_COMPILE"):
            return step
        return mx.compile(step, inputs=state, outputs=state)

    # ----------------------------------------------------------------- pieces
    def _prompts_for(self, examples):
        return [ex["prompt"] for ex in examples]

    def rollout(self, examples) -> Rollout:
        cfg = self.cfg
        return generate_groups(
            self.model, self.tokenizer, [ex["prompt_ids"] for ex in examples], cfg.group_size,
            cfg.max_completion_length, cfg.temperature, cfg.top_p, cfg.top_k, cfg.min_p, cfg.stop,
            seeds=self._prompt_keys,
        )

    def score(self, examples, roll: Rollout, group_size: int):
        """Rewards of every completion, TRL-style: prompts and completions repeated per row,
        every extra dataset column passed by name."""
        rows = [ex for ex in examples for _ in range(group_size)]
        conversational = [isinstance(ex["prompt"], list) for ex in rows]
        prompts = [ex["prompt"] for ex in rows]
        completions = [
            [{"role": "assistant", "content": text}] if conv else text
            for text, conv in zip(roll.texts, conversational)
        ]
        skip = {"prompt", "prompt_text", "prompt_ids"}
        keys = [k for k in rows[0] if k not in skip] if rows else []
        columns = {k: [ex.get(k) for ex in rows] for k in keys}
        columns["completion_ids"] = [roll.tokens[i, : roll.lengths[i]].tolist() for i in range(len(rows))]
        return rewards.compute_rewards(self.reward_fns, self.cfg.reward_weights, prompts, completions, columns,
                                       timeout=self.cfg.reward_timeout)

    def collect(self):
        """Sample and score one step's batch; with dynamic sampling, replace groups whose
        rewards are all equal (no learning signal) by fresh prompts, at most N extra rounds."""
        cfg = self.cfg
        G = cfg.group_size
        kept = []  # (example, rollout rows slice data)
        rounds = 0
        n_sampled_groups = n_zero_std = 0
        while True:
            need = cfg.batch_size - len(kept)
            idx = batch_at(len(self.train_examples), cfg.seed, self.state["data_position"], need)
            self.state["data_position"] += need
            share = need // self.size  # with several ranks each samples its slice of the global batch
            first = self.state["data_position"] - need  # global index of idx[0]
            positions = list(range(first, first + need))[self.rank * share : (self.rank + 1) * share]
            idx = idx[self.rank * share : (self.rank + 1) * share]
            examples = [self.train_examples[i] for i in idx]
            # a prompt's samples depend on (seed, its place in the data stream), not on the rank
            self._prompt_keys = [prompt_seed(cfg.seed, p) for p in positions]
            t0 = time.perf_counter()
            roll = self.rollout(examples)
            self.timing["rollout"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            scored = self.score(examples, roll, G)
            self.timing["rewards"] += time.perf_counter() - t0
            totals = scored.total.reshape(len(examples), G)  # (b, G)
            zero_std = np.ptp(totals, axis=1) == 0  # (b,)
            n_sampled_groups += len(examples)
            n_zero_std += int(zero_std.sum())
            for b, ex in enumerate(examples):
                rows = slice(b * G, (b + 1) * G)
                group = dict(example=ex, rows=rows, roll=roll, scored=scored, zero_std=bool(zero_std[b]))
                if not (cfg.dynamic_sampling and zero_std[b]):
                    kept.append(group)
            if not cfg.dynamic_sampling or len(kept) >= cfg.batch_size or rounds >= cfg.max_resample_rounds:
                break
            rounds += 1
        if not kept:  # every group was flat even after resampling: train on the last round
            kept = [dict(example=ex, rows=slice(b * G, (b + 1) * G), roll=roll, scored=scored, zero_std=True)
                    for b, ex in enumerate(examples)]
        return kept, dict(resample_rounds=rounds, frac_reward_zero_std=n_zero_std / max(n_sampled_groups, 1))

    # ----------------------------------------------------------------- one step
    def train_step(self, step: int) -> dict:
        cfg = self.cfg
        G = cfg.group_size
        self.timing = {"rollout": 0.0, "rewards": 0.0, "reference": 0.0, "update": 0.0}
        t_step = time.perf_counter()
        mx.random.seed(step_seed(cfg.seed, step))
        mx.reset_peak_memory()
        groups, sample_stats = self.collect()
        examples = [g["example"] for g in groups]

        # gather the kept groups' rows into one batch
        roll = _concat_rollouts([_slice_rollout(g["roll"], g["rows"]) for g in groups])
        totals = np.concatenate([g["scored"].total[g["rows"]] for g in groups])  # (N,)
        per_fn = {name: np.concatenate([g["scored"].per_function[name][g["rows"]] for g in groups])
                  for name in groups[0]["scored"].per_function}
        steps = {name: [s for g in groups for s in g["scored"].steps[name][g["rows"]]]
                 for name in groups[0]["scored"].steps}
        B = len(groups)
        tokens, prompt_lens, mask = training_arrays([ex["prompt_ids"] for ex in examples], roll, G, self.pad_id)

        t0 = time.perf_counter()
        if cfg.ref_update_every and step > 0 and step % cfg.ref_update_every == 0:
            # iterative GRPO: the reference becomes the current policy (a copy of the adapters)
            self.ref_adapters = {k: mx.array(v) for k, v in tree_flatten(self.model.trainable_parameters())}
            mx.eval(self.ref_adapters)
        ref_logp = kl_seq = None
        if cfg.beta > 0:
            self.model.eval()  # no adapter dropout in the reference pass
            with self.reference():
                ref_logp = mx.stop_gradient(completion_logprobs(self.model, tokens, prompt_lens, mask.shape[1], cfg.temperature))
            if cfg.kl_in_reward:  # classic RLHF shaping: r - beta * KL(sequence), no KL in the loss
                now = completion_logprobs(self.model, tokens, prompt_lens, mask.shape[1], cfg.temperature)  # (N, T)
                kl_tok = kl_divergence(now, ref_logp, cfg.kl_estimator) * mask  # (N, T)
                kl_seq = np.array(kl_tok.sum(axis=1))  # (N,)
                totals = totals - cfg.beta * kl_seq
                kl_mean = float(kl_tok.sum().item() / max(mask.sum().item(), 1.0))
            mx.eval(ref_logp)
            self.model.train()
        self.timing["reference"] = time.perf_counter() - t0
        completion_ids = [roll.tokens[i, : roll.lengths[i]].tolist() for i in range(len(roll.texts))]
        # outcome advantages over the global batch (equal to one process's), then this rank's rows
        own = slice(self.rank * len(totals), (self.rank + 1) * len(totals))
        adv = compute_advantages(cfg, {k: self._gather(v) for k, v in per_fn.items()}, self._gather(totals), steps,
                                 groups[0]["scored"].step_weights, self.tokenizer, completion_ids, mask.shape[1],
                                 rows=own)  # (N,) or (N, T)

        t0 = time.perf_counter()
        k = cfg.gradient_accumulation_steps
        n = tokens.shape[0]
        micro = [slice(i * n // k, (i + 1) * n // k) for i in range(k)]
        n_items = self._mean_over_ranks(mask.sum()) / k  # dapo: normalised by the whole batch's tokens
        old_logps = [None] * k
        losses, metric_sums, grad_norms = [], {}, []
        self.model.train()
        for it in range(cfg.num_iterations):
            acc = None
            for j, sl in enumerate(micro):
                loss, metrics, logp, grads = self._loss_and_grad(
                    tokens[sl], prompt_lens[sl], mask[sl], adv[sl], old_logps[j],
                    None if ref_logp is None else ref_logp[sl], n_items,
                )
                if it == 0 and cfg.num_iterations > 1:
                    old_logps[j] = mx.stop_gradient(logp)  # "old" policy = the first pass
                acc = grads if acc is None else tree_map(mx.add, acc, grads)
                losses.append(loss)
                for key, v in metrics.items():
                    metric_sums.setdefault(key, []).append(v)
            if k > 1:
                acc = tree_map(lambda g: g / k, acc)
            if self.size > 1:
                acc = nn.average_gradients(acc, group=self.world)  # data parallel: the global batch's gradient
            if cfg.max_grad_norm > 0:
                acc, norm = optim.clip_grad_norm(acc, cfg.max_grad_norm)
            else:
                norm = mx.sqrt(sum((g * g).sum() for g in _leaves(acc)))
            grad_norms.append(norm)
            finite = mx.isfinite(norm) & mx.all(mx.isfinite(mx.stack(losses)))
            if self.size > 1:  # every rank takes the same decision
                finite = mx.distributed.all_sum(finite.astype(mx.float32), group=self.world) == self.size
            if not finite.item():
                # never apply a non-finite update: skip the rest of this step, count it
                self.state["skipped_steps"] += 1
                self.bus.emit("message", level="warning", text=f"step {step + 1}: non-finite loss or gradient norm; update skipped")
                return {"skipped": 1, "loss": float("nan"), "grad_norm": float(norm.item())}
            self.optimizer.update(self.model, acc)
            mx.eval(self.model.trainable_parameters(), self.optimizer.state, metric_sums)
        self.timing["update"] = time.perf_counter() - t0

        step_weights = groups[0]["scored"].step_weights
        # what is reported as "reward" includes process rewards at their mean step reward
        shown = totals + sum(w * np.nan_to_num(per_fn[name]) for name, w in step_weights.items())  # (N,)
        sample_view = (shown, np.array(adv if adv.ndim == 1 else (adv * mask).sum(axis=1) / mx.maximum(mask.sum(axis=1), 1)))
        # metrics describe the global batch: gather what is per completion, average what is per rank
        shown, lengths = self._gather(shown), self._gather(roll.lengths)
        clipped = self._gather(np.array([r == "length" for r in roll.finish_reasons], dtype=np.float32))
        entropy = None if roll.entropy is None else self._gather(roll.entropy.sum(axis=1))  # (N,) per completion
        per_fn = {k: self._gather(v) for k, v in per_fn.items()}
        B = len(shown) // G
        n_gen = int(lengths.sum())
        step_time = time.perf_counter() - t_step
        metrics = {
            "reward": float(shown.mean()),
            "reward_std": float(shown.reshape(B, G).std(axis=1, ddof=1).mean()),
            "frac_reward_zero_std": float(self._mean_over_ranks(mx.array(sample_stats["frac_reward_zero_std"])).item()),
            "loss": float(self._mean_over_ranks(mx.mean(mx.stack(losses))).item()),
            "grad_norm": float(mx.mean(mx.stack(grad_norms)).item()),
            "learning_rate": float(self.optimizer.learning_rate.item()),
            "completions/mean_length": float(lengths.mean()),
            "completions/min_length": int(lengths.min()),
            "completions/max_length": int(lengths.max()),
            "completions/clipped_ratio": float(clipped.mean()),
            **({} if entropy is None else {"entropy": float(entropy.sum() / max(lengths.sum(), 1))}),
            "num_tokens": n_gen,
            "step_time": step_time,
            "tokens_per_second": n_gen / max(self.timing["rollout"], 1e-9),
            "peak_memory_gb": mx.get_peak_memory() / 1e9,
            **{f"time/{k_}": v for k_, v in self.timing.items()},
        }
        if cfg.dynamic_sampling:
            metrics["resample_rounds"] = sample_stats["resample_rounds"]
        if kl_seq is not None:
            metrics["kl"] = kl_mean
        for key, vals in metric_sums.items():
            metrics[key] = float(self._mean_over_ranks(mx.mean(mx.stack(vals))).item())
        for name, vals in per_fn.items():
            finite = vals[~np.isnan(vals)]
            metrics[f"rewards/{name}/mean"] = float(finite.mean()) if finite.size else float("nan")
            metrics[f"rewards/{name}/std"] = float(finite.std(ddof=1)) if finite.size > 1 else 0.0
        if self.rank == 0:
            own_fn = {k: v[: len(roll.texts)] for k, v in per_fn.items()}  # rank 0's rows come first
            self._emit_samples(step, examples, roll, own_fn, *sample_view)
        return metrics

    def _emit_samples(self, step, examples, roll, per_fn, totals, adv):
        G = self.cfg.group_size
        limit = len(examples) if self.cfg.samples_per_step < 0 else min(self.cfg.samples_per_step, len(examples))
        groups = []
        for b in range(limit):
            ex = examples[b]
            comps = []
            for g in range(G):
                i = b * G + g
                comps.append(dict(
                    text=roll.texts[i],
                    rewards={name: (None if math.isnan(v[i]) else float(v[i])) for name, v in per_fn.items()},
                    reward=float(totals[i]), advantage=float(adv[i]),
                    length=int(roll.lengths[i]), finish_reason=roll.finish_reasons[i],
                ))
            groups.append(dict(prompt=ex["prompt"], prompt_text=ex["prompt_text"], answer=ex.get("answer"), completions=comps))
        self.bus.emit("samples", step=step + 1, groups=groups)  # numbered like the step event

    # ----------------------------------------------------------------- evaluation
    def evaluate(self, examples, batch: int = 64) -> dict:
        """Greedy held-out score: exact-answer accuracy (when answers exist) and mean reward."""
        if not examples:
            return {}
        self.model.eval()
        hits, totals = [], []
        for i in range(0, len(examples), batch):
            chunk = examples[i : i + batch]
            roll = generate_groups(self.model, self.tokenizer, [ex["prompt_ids"] for ex in chunk], 1,
                                   self.cfg.max_completion_length, temperature=0.0, stop=self.cfg.stop)
            for ex, text in zip(chunk, roll.texts):
                if ex.get("answer") is not None:
                    hits.append(rewards.answers_match(rewards.extract_answer(text), ex["answer"]))
            scored = self.score(chunk, roll, 1)
            total = scored.total + sum(w * np.nan_to_num(scored.per_function[name]) for name, w in scored.step_weights.items())
            totals.extend(np.asarray(total).tolist())  # process rewards count with their mean step reward
        self.model.train()
        out = {"n": len(examples), "mean_reward": float(np.mean(totals))}
        if hits:
            out["accuracy"] = float(np.mean(hits))
        return out

    # ----------------------------------------------------------------- the loop
    def save(self, step: int) -> None:
        if self.rank != 0:  # every rank holds the same adapters; one writes them
            return
        try:
            path = checkpoint.save_checkpoint(self.run_dir, step, self.model, self.adapter_config, self.optimizer,
                                              {k: v for k, v in self.state.items() if k != "step"},
                                              extra={"reference": self.ref_adapters} if self.ref_adapters else None)
        except OSError as e:
            last = checkpoint.latest_checkpoint(self.run_dir)
            kept = f"the previous checkpoint {last} is intact" if last else "no earlier checkpoint exists"
            raise checkpoint.CheckpointError(f"cannot save the checkpoint of step {step} in {self.run_dir}: "
                                             f"{e.strerror or e}; {kept}") from e
        self.bus.emit("checkpoint", step=step, path=str(path))

    def run(self) -> dict:
        cfg = self.cfg
        self.setup()
        start = int(self.state["step"])
        sink = JsonlSink(str(self.run_dir)) if self.rank == 0 else None
        if sink:
            self.bus.subscribe(sink)
        try:
            return self._loop(start)
        except Exception as e:
            self.bus.emit("end", step=int(self.state["step"]), summary={"run_dir": str(self.run_dir), "error": str(e)},
                          status="failed")
            raise
        finally:
            if sink:
                sink.close()

    def _loop(self, start: int) -> dict:
        cfg = self.cfg
        self.bus.emit("start", run_dir=str(self.run_dir), config=to_dict(cfg), total_steps=cfg.iters,
                      start_step=start, blas=blas_name(), model=cfg.model,
                      train_examples=len(self.train_examples), eval_examples=len(self.eval_examples))
        if cfg.ref_update_every and cfg.beta == 0:
            self.bus.emit("message", level="warning", text="--ref-update-every has no effect with beta = 0 (there is no KL term)")
        if cfg.num_iterations == 1:
            self.bus.emit("message", level="info", text="num_iterations = 1: the importance ratio is exactly 1, so clipping never acts (clip_ratio reads 0).")
        summary: dict = {"run_dir": str(self.run_dir)}
        evaluating = self.rank == 0 and self.eval_examples
        before = self.evaluate(self.eval_examples) if evaluating and (start == 0 or cfg.resume is None) else {}
        if before:
            self.bus.emit("eval", step=start, name="before", metrics=before)
        status = "finished"
        bad_in_a_row = 0
        for step in range(start, cfg.iters):
            while self.control.pause.is_set() and not self.control.stop.is_set():
                if self.control.save_now.is_set():  # "save now" also works while paused
                    self.control.save_now.clear()
                    self.save(step)
                time.sleep(0.1)
            if self._should_stop():
                status = "stopped"
                break
            position = self.state["data_position"]
            try:
                metrics = self.train_step(step)
            except rewards.RewardFunctionError as e:
                if cfg.reward_error_policy == "skip":
                    self.state["skipped_steps"] += 1
                    self.bus.emit("message", level="warning", text=f"step {step + 1} skipped: {e}")
                    metrics = {"skipped": 1}
                else:
                    # nothing of this step was applied: save as it was when the step began
                    self.state["data_position"] = position
                    self.save(step)
                    raise TrainingStopped(f"{e}. Checkpoint saved at step {step}; resume with --resume {self.run_dir}") from e
            except BaseException:
                self.state["data_position"] = position  # an abandoned step leaves no trace
                raise
            bad_in_a_row = bad_in_a_row + 1 if metrics.get("skipped") else 0
            self.state["step"] = step + 1
            self.bus.emit("step", step=step + 1, metrics=metrics)
            if bad_in_a_row >= cfg.max_bad_steps:
                self.save(step + 1)
                raise TrainingStopped(
                    f"{bad_in_a_row} steps in a row were skipped (non-finite loss or gradients, or failing rewards); "
                    f"stopped with the last good adapters saved at step {step + 1} in {self.run_dir}"
                )
            if (step + 1) % cfg.save_every == 0 or self.control.save_now.is_set():
                self.control.save_now.clear()
                self.save(step + 1)
            if cfg.eval_every and evaluating and (step + 1) % cfg.eval_every == 0:
                self.bus.emit("eval", step=step + 1, name="periodic", metrics=self.evaluate(self.eval_examples))
        if self.state["step"] > start or cfg.iters == start:
            self.save(int(self.state["step"]))
        if status == "stopped":
            self.bus.emit("message", level="info", text=f"stopped at step {self.state['step']}; continue with: grpo-mlx train --resume {self.run_dir}")
            summary.update(steps=int(self.state["step"]), status=status)
            self.bus.emit("end", step=int(self.state["step"]), summary=summary, status=status)
            return summary
        after = self.evaluate(self.eval_examples) if evaluating else {}
        if after:
            self.bus.emit("eval", step=int(self.state["step"]), name="after", metrics=after)
        summary.update(steps=int(self.state["step"]), status=status)
        if before:
            summary.update({f"{k}_before": v for k, v in before.items() if k != "n"})
        if after:
            summary.update({f"{k}_after": v for k, v in after.items() if k != "n"})
            summary["eval_examples"] = after["n"]
        if self.rank == 0:
            with open(self.run_dir / "summary.json", "w", encoding="utf-8") as f:
                json.dump(summary, f, indent=2)
        self.bus.emit("end", step=int(self.state["step"]), summary=summary, status=status)
        return summary


def _leaves(tree):
    from mlx.utils import tree_flatten

    return [v for _, v in tree_flatten(tree)]


def _slice_rollout(roll: Rollout, rows: slice) -> Rollout:
    return Rollout(roll.tokens[rows], roll.logprobs[rows], roll.lengths[rows], roll.finish_reasons[rows],
                   roll.texts[rows], roll.prompt_tokens, entropy=None if roll.entropy is None else roll.entropy[rows])


def _concat_rollouts(parts: list[Rollout]) -> Rollout:
    t = max(p.tokens.shape[1] for p in parts)

    def pad(a, value):
        return np.pad(a, ((0, 0), (0, t - a.shape[1])), constant_values=value)

    return Rollout(
        np.concatenate([pad(p.tokens, 0) for p in parts]),
        np.concatenate([pad(p.logprobs, 0.0) for p in parts]),
        np.concatenate([p.lengths for p in parts]),
        [r for p in parts for r in p.finish_reasons],
        [s for p in parts for s in p.texts],
        sum({id(p.tokens.base): p.prompt_tokens for p in parts}.values()),
        entropy=None if any(p.entropy is None for p in parts) else np.concatenate([pad(p.entropy, 0.0) for p in parts]),
    )
