"""The GRPO training loop: set a run up, repeat the step, checkpoint, evaluate, report.

`Trainer.train_step` reads as the step's pipeline: each phase is one call into the module that
implements it (grpo_mlx.step, batch, advantages, loss, sampler, rewards), over typed records
(Collected, Batch, Update). The trainer reports only through the event bus (grpo_mlx.events);
the headless progress bar, the JSONL files and the TUI are subscribers. Determinism: the random
state is re-seeded from (seed, step) at the start of every step and the data order is a function
of (seed, epoch), so a resumed run repeats exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

from grpo_mlx import checkpoint, data, episodes, events, judge, prompts, reward_worker, rewards, rundir, tracking
from grpo_mlx import metric_names as M
from grpo_mlx.advantages import compute_advantages, per_completion
from grpo_mlx.batch import make_batch
from grpo_mlx.blas import blas_hint, blas_name
from grpo_mlx.config import ConfigError, TrainConfig, default_run_dir, to_dict
from grpo_mlx.errors import UserError
from grpo_mlx.evaluate import held_out, progress_text
from grpo_mlx.events import Control, EventBus, JsonlSink
from grpo_mlx.loss import applied_entropy_coef, mix_reference, next_entropy_coef
from grpo_mlx.policy import (
    adapters_disabled,
    adapters_replaced,
    add_adapters,
    load_model,
    model_vocab_size,
    snapshot_adapters,
)
from grpo_mlx.rollout_cache import sampler_options
from grpo_mlx.sampler import Rollout, generate_groups, pad_id
from grpo_mlx.step import (
    Objective,
    Timing,
    collect_groups,
    make_loss_and_grad,
    reference_logprobs,
    sample_groups,
    sequence_kl,
    step_metrics,
    step_seed,
    update_policy,
)
from grpo_mlx.world import World

__all__ = ["Control", "Trainer", "TrainingStopped", "make_optimizer"]


class TrainingStopped(UserError, RuntimeError):
    """The run ended early on purpose (a reward function failed); a checkpoint was saved."""


def reward_functions(cfg: TrainConfig) -> list:
    """The run's (name, function) pairs; custom ones in worker processes with --reward-isolation process."""
    fns = [
        rewards.resolve_reward(spec, max_completion_length=cfg.max_completion_length, config=cfg)
        for spec in cfg.reward_functions
    ]
    if cfg.reward_isolation == "process":
        fns = reward_worker.isolate(cfg.reward_functions, fns, cfg.reward_timeout,
                                    max_completion_length=cfg.max_completion_length)  # fmt: skip
    return fns


def make_optimizer(cfg: TrainConfig) -> optim.Optimizer:
    total = max(cfg.iters * cfg.num_iterations, 1)
    decay = optim.cosine_decay(
        cfg.learning_rate, max(total - cfg.warmup_steps, 1), cfg.learning_rate * cfg.min_lr_ratio
    )
    schedule = decay
    if cfg.warmup_steps > 0:
        warmup = optim.linear_schedule(cfg.learning_rate / cfg.warmup_steps, cfg.learning_rate, cfg.warmup_steps)
        schedule = optim.join_schedules([warmup, decay], [cfg.warmup_steps])
    return optim.AdamW(learning_rate=schedule, weight_decay=cfg.weight_decay)


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
        self.reward_fns = reward_functions(cfg)
        self.train_examples = data.load_split(
            cfg.data, "train", prompt_key=cfg.prompt_key, answer_key=cfg.answer_key, config=cfg.data_config
        )
        rewards.check_columns(self.reward_fns, self.train_examples, f"{cfg.data} (train)")  # before any model loads
        judge.probe_endpoints(self.reward_fns)  # a judge server that is not up: now, not at step 1
        self.eval_examples, _ = data.held_out_examples(cfg)
        self.world = World()  # one process unless started by mlx.launch
        self._check_ranks()
        mx.random.seed(cfg.seed)
        model, tokenizer = load_model(cfg.model)
        adapter_config = add_adapters(model, cfg)
        self.agent = episodes.Agent.from_config(cfg, tokenizer)  # None without tools
        tools = self.agent.schemas if self.agent else None  # shown to the model by the template
        train = prompts.prepare_examples(self.train_examples, tokenizer, **prompts.options(cfg), tools=tools)
        held = prompts.prepare_examples(self.eval_examples, tokenizer, **prompts.options(cfg), tools=tools)
        self._assemble(model, tokenizer, train, held, adapter_config)
        self._check_context()
        data.check_token_ids(
            self.train_examples + self.eval_examples,
            model_vocab_size(self.model),
            self.tokenizer,
            str(cfg.data),
        )
        for note in prompts.notes(self.train_examples, self.tokenizer, cfg.ignore_chat_template, str(cfg.model)):
            self.bus.emit(events.Message(level="warning", text=note))  # once per run, before the first step
        if cfg.resume:
            ckpt = checkpoint.latest_checkpoint(self.run_dir)
            if ckpt is None:
                raise FileNotFoundError(
                    f"--resume {self.run_dir}: no complete checkpoint in {self.run_dir / 'checkpoints'}"
                )
            self.state.update(checkpoint.load_checkpoint(ckpt, self.model, self.optimizer))
            if (ckpt / "reference.safetensors").exists():
                self.ref_adapters = mx.load(str(ckpt / "reference.safetensors"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.world.is_main:  # with several ranks only rank 0 writes the run directory
            with open(self.run_dir / "config.json", "w", encoding="utf-8") as f:
                json.dump(to_dict(cfg), f, indent=2)

    @classmethod
    def from_parts(
        cls,
        cfg: TrainConfig,
        model,
        tokenizer,
        train_examples: list[dict],
        eval_examples=(),
        *,
        adapter_config: dict,
        bus: EventBus | None = None,
    ) -> Trainer:
        """A trainer over a model (adapters already added) and prepared examples held in memory,
        for the benchmark and tests: the same step, without loading anything or a run directory."""
        trainer = cls(cfg, bus)
        trainer.reward_fns = reward_functions(cfg)
        trainer.world = World()
        trainer._assemble(model, tokenizer, list(train_examples), list(eval_examples), adapter_config)
        return trainer

    def _assemble(self, model, tokenizer, train_examples, eval_examples, adapter_config) -> None:
        cfg = self.cfg
        self.model, self.tokenizer, self.adapter_config = model, tokenizer, adapter_config
        self.train_examples, self.eval_examples = train_examples, eval_examples
        self.pad_id = pad_id(tokenizer)
        judge.bind_judges(self.reward_fns, model, tokenizer, self.run_dir, cfg.group_size)  # the judge reward's model
        self.agent = getattr(self, "agent", None) or episodes.Agent.from_config(cfg, tokenizer)
        self.optimizer = make_optimizer(cfg)
        self.state = {"step": 0, "data_position": 0, "skipped_steps": 0}
        self._saved_step = None  # the step of the last checkpoint this process wrote
        if cfg.use_adaptive_entropy:  # the controller's state, checkpointed for an exact resume
            self.state.update(entropy_coef=cfg.entropy_coef, last_entropy=None)
        # iterative GRPO / TR-DPO: the adapters the reference was last set to (None = adapters off);
        # TR-DPO mixes into the reference, which starts as the policy at step 0
        self.ref_adapters = snapshot_adapters(model) if cfg.sync_ref_model and cfg.beta > 0 else None
        self.objective = objective(cfg)
        self._loss_and_grad = make_loss_and_grad(
            model,
            cfg.temperature,
            entropy=self.objective.entropy,
            beta=0.0 if cfg.kl_in_reward else cfg.beta,
            max_completion_length=cfg.max_completion_length,
            **{key: getattr(cfg, key) for key in LOSS_KEYS},
        )
        # what each stage takes from the configuration, gathered once
        self._sampling = dict(batch_size=cfg.batch_size, group_size=cfg.group_size, seed=cfg.seed,
                              dynamic_sampling=cfg.dynamic_sampling,
                              max_resample_rounds=cfg.max_resample_rounds)  # fmt: skip
        self._advantages = dict(group_size=cfg.group_size, weights=cfg.reward_weights, tokenizer=tokenizer,
                                combination=cfg.reward_combination, scale=cfg.scale_rewards,
                                baseline=cfg.advantage_baseline)  # fmt: skip
        self._update = dict(num_iterations=cfg.num_iterations, micro_batches=cfg.gradient_accumulation_steps,
                            max_grad_norm=cfg.max_grad_norm, objective=self.objective,
                            temperature=cfg.temperature)  # fmt: skip

    def _check_ranks(self) -> None:
        """Data parallelism needs each rank to take an equal share of whole groups and every rank
        to run the same configuration: refuse early, naming what differs."""
        cfg, size = self.cfg, self.world.size
        if size == 1:
            return
        if cfg.batch_size % size:
            raise ConfigError(
                f"'batch_size' = {cfg.batch_size} prompts do not divide across {size} ranks; use a multiple of {size}"
            )
        if cfg.dynamic_sampling:
            raise ConfigError(
                "'dynamic_sampling' is not supported across several ranks yet (each rank would refill differently)"
            )
        if not self.world.same_everywhere(
            {k: v for k, v in to_dict(cfg).items() if k not in ("adapter_path", "resume")}
        ):
            raise ConfigError(
                f"rank {self.world.rank}: the ranks were started with different configurations "
                f"(compare their flags and config files)"
            )

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
                        "(shorten the prompt, lower --max-completion-length, "
                        "or drop long prompts with --max-prompt-length)"
                    )

    def reference(self):
        """The reference policy: the base model (adapters off), or with --ref-update-every the
        adapters as they were at the last reference update."""
        if self.ref_adapters is None:
            return adapters_disabled(self.model)
        return adapters_replaced(self.model, self.ref_adapters)

    # ----------------------------------------------------------------- one step
    def train_step(self, step: int) -> dict:
        cfg, world, G = self.cfg, self.world, self.cfg.group_size
        timing, t_step = Timing(), time.perf_counter()
        mx.random.seed(step_seed(cfg.seed, step))
        mx.reset_peak_memory()

        # 1. draw prompts, sample G completions of each, score them        (step, sampler, rewards)
        self.reward_context = rewards.RewardContext(rewards.TrainerState(step, cfg.iters, self.epoch()))
        collected = collect_groups(self.train_examples, self.state["data_position"], world=world, sample=self.sample,
                                   score=self.score, timing=timing, **self._sampling)  # fmt: skip
        self.state["data_position"] = collected.position
        # 2. the kept groups as one padded batch                                            (batch)
        batch = make_batch(collected.groups, G, self.pad_id)

        # 3. the reference policy's log-probs, for the KL                            (step, policy)
        totals, kl = batch.rewards.total, None
        with timing.phase("reference"):
            if cfg.ref_update_every and step > 0 and step % cfg.ref_update_every == 0:
                self.ref_adapters = snapshot_adapters(self.model)  # iterative GRPO: reference = now
            if self.ref_adapters and cfg.sync_ref_model and step > 0 and step % cfg.ref_model_sync_steps == 0:
                now = snapshot_adapters(self.model)  # TR-DPO: reference <- alpha * policy + (1 - alpha) * reference
                self.ref_adapters = mix_reference(self.ref_adapters, now, cfg.ref_model_mixup_alpha)
            ref_logp = reference_logprobs(self.model, self.reference, batch, cfg.temperature) if cfg.beta > 0 else None
            if ref_logp is not None and cfg.kl_in_reward:  # RLHF shaping: r - beta * KL, none in the loss
                kl_seq, kl = sequence_kl(self.model, batch, ref_logp, cfg.temperature, cfg.kl_estimator)
                totals = totals - cfg.beta * kl_seq  # (N,)
        shown = totals + (batch.rewards.shown - batch.rewards.total)  # (N,) process rewards at their mean

        # 4. group-relative advantages over the global batch, this rank's rows          (advantages)
        per_function = {k: world.gather(v) for k, v in batch.rewards.per_function.items()}
        adv = compute_advantages(per_function, world.gather(totals), batch.rewards.steps, batch.rewards.step_weights,
                                 completion_ids=batch.completion_ids, num_tokens=batch.mask.shape[1],
                                 rows=world.own_rows(len(totals)), **self._advantages)  # fmt: skip  # (N,) | (N, T)

        # 5. μ passes of loss + gradients over micro-batches, clipped, applied           (step, loss)
        coef = self.entropy_coef()
        with timing.phase("update"):
            update = update_policy(self.model, self.optimizer, self._loss_and_grad, batch, adv, ref_logp,
                                   world=world, entropy_coef=coef, **self._update)  # fmt: skip
        if update.skipped:  # never apply a non-finite update: count it, go on
            self.state["skipped_steps"] += 1
            text = f"step {step + 1}: non-finite loss or gradient norm; update skipped"
            self.bus.emit(events.Message(level="warning", text=text))
            return {M.SKIPPED: 1, M.LOSS: float("nan"), M.GRAD_NORM: float(update.grad_norms[-1].item())}

        # 6. report: TRL-named metrics of the global batch, samples of rank 0's groups        (step)
        metrics = step_metrics(batch, shown, collected, update, group_size=G, timing=timing, kl=kl, world=world,
                               learning_rate=float(self.optimizer.learning_rate.item()),
                               step_time=time.perf_counter() - t_step, logged=self.reward_context.metrics(),
                               dynamic_sampling=cfg.dynamic_sampling)  # fmt: skip
        self._after_update(metrics, coef)
        if world.is_main:
            groups = sample_groups(batch, shown, np.array(per_completion(adv, batch.mask)), G, cfg.samples_per_step)
            self.bus.emit(events.Samples(step=step + 1, groups=groups))  # numbered like the step event
        return metrics

    def entropy_coef(self) -> float:
        """The entropy bonus coefficient of this step: fixed, or the adaptive controller's, which
        acts only while the last step's entropy was at or below the target."""
        if not self.cfg.use_adaptive_entropy:
            return self.cfg.entropy_coef
        last = self.state["last_entropy"]
        return applied_entropy_coef(self.state["entropy_coef"], math.inf if last is None else last,
                                    self.cfg.entropy_target)  # fmt: skip

    def _after_update(self, metrics: dict, coef: float) -> None:
        """Report the applied entropy coefficient; move the adaptive one by this step's entropy."""
        cfg = self.cfg
        if self.objective.entropy_bonus:
            metrics[M.ENTROPY_COEF] = coef
        if cfg.use_adaptive_entropy and M.ENTROPY in metrics:
            h = metrics[M.ENTROPY]
            self.state["entropy_coef"] = next_entropy_coef(self.state["entropy_coef"], h, cfg.entropy_target,
                                                           cfg.entropy_coef_delta, cfg.entropy_coef_min,
                                                           cfg.entropy_coef_max)  # fmt: skip
            self.state["last_entropy"] = h

    def sample(self, examples: list[dict], seeds: list[int]) -> Rollout:
        cfg = self.cfg
        if self.agent:  # tools: multi-turn episodes (grpo_mlx.episodes)
            context = getattr(self, "reward_context", None)  # the tool metrics are logged with the step's
            return self.agent.sample(self.model, self.tokenizer, cfg, examples, seeds, context)
        return generate_groups(
            self.model,
            self.tokenizer,
            [ex["prompt_ids"] for ex in examples],
            cfg.group_size,
            cfg.max_completion_length,
            cfg.temperature,
            cfg.top_p,
            cfg.top_k,
            cfg.min_p,
            cfg.stop,
            seeds=seeds,
            **sampler_options(cfg),  # quantized KV cache, waves (grpo_mlx.rollout_cache)
        )

    def epoch(self) -> float:
        """Passes over the training prompts so far (TrainerState.epoch)."""
        return self.state["data_position"] / max(len(self.train_examples), 1)

    def score(self, examples: list[dict], roll: Rollout, context=None) -> rewards.RewardResult:
        """Rewards of every completion, TRL-style: prompts and completions repeated per row,
        every extra dataset column passed by name; what the functions log goes to `context`
        (default: the step's)."""
        agent = getattr(self, "agent", None)
        try:  # an episode's environments (--environment) are passed to the rewards, then closed
            return rewards.score_examples(self.reward_fns, examples, roll.texts, roll.completion_ids,
                                          weights=self.cfg.reward_weights, timeout=self.cfg.reward_timeout,
                                          context=context or getattr(self, "reward_context", None),
                                          row_columns=agent.reward_columns(roll) if agent else None)  # fmt: skip
        finally:
            if agent:
                agent.release(roll)

    def evaluate(self, examples: list[dict]) -> dict:
        """Greedy held-out figures: exact-answer accuracy (when answers exist) and mean reward."""
        context = rewards.RewardContext(rewards.TrainerState(int(self.state["step"]), self.cfg.iters, self.epoch()))
        return held_out(self.model, self.tokenizer, examples, self.cfg.max_completion_length, self.cfg.stop,
                        score=lambda chunk, roll: self.score(chunk, roll, context),  # logs stay out of the steps
                        agent=self.agent,  # with tools: the same episodes, greedy
                        sampler_options=sampler_options(self.cfg),
                        progress=lambda done, total: self.bus.emit(events.Message(
                            level="info", text=progress_text(done, total))))  # fmt: skip

    # ----------------------------------------------------------------- the loop
    def save(self, step: int) -> None:
        if not self.world.is_main:  # every rank holds the same adapters; one writes them
            return
        if step == self._saved_step:  # the last step was a save_every step too: once is enough
            return
        try:
            path = checkpoint.save_checkpoint(
                self.run_dir,
                step,
                self.model,
                self.adapter_config,
                self.optimizer,
                {k: v for k, v in self.state.items() if k != "step"},
                extra={"reference": self.ref_adapters} if self.ref_adapters else None,
            )
        except OSError as e:
            last = checkpoint.latest_checkpoint(self.run_dir)
            kept = f"the previous checkpoint {last} is intact" if last else "no earlier checkpoint exists"
            raise checkpoint.CheckpointError(
                f"cannot save the checkpoint of step {step} in {self.run_dir}: {e.strerror or e}; {kept}"
            ) from e
        self._saved_step = step
        self.bus.emit(events.Checkpoint(step=step, path=str(path)))

    def run(self) -> dict:
        # one trainer per run directory, checked and locked before the model loads (and World)
        lock = rundir.claim(self.cfg, self.run_dir) if mx.distributed.init().rank() == 0 else None
        try:
            return self._run()
        finally:
            if lock:
                lock.release()
            reward_worker.close_all(getattr(self, "reward_fns", []))

    def _run(self) -> dict:
        tracking.attach(self.bus, self.cfg, self.run_dir, rank=mx.distributed.init().rank())  # packages checked first
        self.setup()
        start = int(self.state["step"])
        # a failed metrics/samples write stops the run after the step, with a checkpoint
        sink = JsonlSink(str(self.run_dir), on_error=self.control.stop.set) if self.world.is_main else None
        if sink:
            self.bus.subscribe(sink)
        try:
            summary = self._loop(start)
            if sink:
                sink.raise_if_failed()
            return summary
        except Exception as e:
            self.bus.emit(
                events.End(
                    step=int(self.state["step"]),
                    summary={"run_dir": str(self.run_dir), "error": str(e)},
                    status="failed",
                )
            )
            raise
        finally:
            if sink:
                sink.close()

    def _loop(self, start: int) -> dict:
        cfg = self.cfg
        self.bus.emit(
            events.Start(
                run_dir=str(self.run_dir),
                config=to_dict(cfg),
                total_steps=cfg.iters,
                start_step=start,
                blas=blas_name(),
                model=cfg.model,
                train_examples=len(self.train_examples),
                eval_examples=len(self.eval_examples),
            )
        )
        if hint := blas_hint():  # a new user's first run on the slow bundled BLAS says why, and the fix
            self.bus.emit(events.Message(level="warning", text=hint))
        if cfg.ref_update_every and cfg.beta == 0:
            self.bus.emit(
                events.Message(
                    level="warning", text="--ref-update-every has no effect with beta = 0 (there is no KL term)"
                )
            )
        if cfg.num_iterations == 1:
            self.bus.emit(
                events.Message(
                    level="info",
                    text="num_iterations = 1: the importance ratio is exactly 1, "
                    "so clipping never acts (clip_ratio reads 0).",
                )
            )
        evaluating = self.world.is_main and bool(self.eval_examples)
        before = self.evaluate(self.eval_examples) if evaluating and (start == 0 or cfg.resume is None) else {}
        if before:
            self.bus.emit(events.Eval(step=start, name="before", metrics=before))
        status, bad_in_a_row = "finished", 0
        skipped_before = self.state["skipped_steps"]
        self.control.training.set()  # from here Ctrl-C finishes the step and saves
        for step in range(start, cfg.iters):
            self._wait_while_paused(step)
            if self.world.any(self.control.stop.is_set()):
                status = "stopped"
                break
            metrics = self._guarded_step(step)
            bad_in_a_row = bad_in_a_row + 1 if metrics.get(M.SKIPPED) else 0
            self.state["step"] = step + 1
            self.bus.emit(events.Step(step=step + 1, metrics=metrics))
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
                self.bus.emit(events.Eval(step=step + 1, name="periodic", metrics=self.evaluate(self.eval_examples)))
        if self.state["step"] > start or cfg.iters == start:
            self.save(int(self.state["step"]))
        ran = int(self.state["step"]) - start
        if status == "finished" and ran and self.state["skipped_steps"] - skipped_before >= ran:
            raise TrainingStopped(all_skipped_message(ran, cfg, self.run_dir))
        return self._finish(status, before, evaluating)

    def _wait_while_paused(self, step: int) -> None:
        while self.control.pause.is_set() and not self.control.stop.is_set():
            if self.control.save_now.is_set():  # "save now" also works while paused
                self.control.save_now.clear()
                self.save(step)
            time.sleep(0.1)

    def _guarded_step(self, step: int) -> dict:
        """One step; a failing reward function skips it or stops the run with the state as it
        was when the step began saved, as the policy says."""
        position = self.state["data_position"]
        try:
            return self.train_step(step)
        except rewards.RewardFunctionError as e:
            if self.cfg.reward_error_policy == "skip":
                self.state["data_position"] = position + self.cfg.batch_size  # the failed prompts are not retried
                self.state["skipped_steps"] += 1
                self.bus.emit(events.Message(level="warning", text=f"step {step + 1} skipped: {e}"))
                return {M.SKIPPED: 1}
            self.state["data_position"] = position  # nothing of this step was applied
            self.save(step)
            raise TrainingStopped(f"{e}. Checkpoint saved at step {step}; resume with --resume {self.run_dir}") from e
        except BaseException:
            self.state["data_position"] = position  # an abandoned step leaves no trace
            raise

    def _finish(self, status: str, before: dict, evaluating: bool) -> dict:
        steps = int(self.state["step"])
        summary: dict = {"run_dir": str(self.run_dir), "steps": steps, "status": status}
        if status == "stopped":
            self.bus.emit(
                events.Message(
                    level="info", text=f"stopped at step {steps}; continue with: grpo-mlx train --resume {self.run_dir}"
                )
            )
            self.bus.emit(events.End(step=steps, summary=summary, status=status))
            return summary
        after = self.evaluate(self.eval_examples) if evaluating else {}
        if after:
            self.bus.emit(events.Eval(step=steps, name="after", metrics=after))
        summary.update({f"{k}_before": v for k, v in before.items() if k != "n"})
        if after:
            summary.update({f"{k}_after": v for k, v in after.items() if k != "n"})
            summary["eval_examples"] = after["n"]
        if self.world.is_main:
            with open(self.run_dir / "summary.json", "w", encoding="utf-8") as f:
                json.dump(summary, f, indent=2)
        self.bus.emit(events.End(step=steps, summary=summary, status=status))
        return summary


# policy_loss's keywords that are config keys of the same name
LOSS_KEYS = ("loss_type", "epsilon", "epsilon_high", "importance_sampling_level", "kl_estimator", "delta",
             "sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg",
             "vespo_lambda_neg", "top_entropy_quantile", "off_policy_mask_threshold",
             "use_bias_correction_kl")  # fmt: skip


def objective(cfg: TrainConfig) -> Objective:
    """The update's batch-wide options from the config (TRL's names)."""
    mismatch = None
    if cfg.importance_sampling_correction:
        mismatch = dict(mode=cfg.importance_sampling_mode, clip_max=cfg.importance_sampling_clip_max,
                        clip_min=cfg.importance_sampling_clip_min)  # fmt: skip
    return Objective(
        mask_truncated=cfg.mask_truncated_completions,
        top_entropy_quantile=cfg.top_entropy_quantile,
        entropy_bonus=cfg.entropy_coef != 0.0 or cfg.use_adaptive_entropy,
        off_policy_mask=cfg.off_policy_mask_threshold is not None,
        mismatch=mismatch,
    )


def all_skipped_message(n: int, cfg: TrainConfig, run_dir) -> str:
    """The diagnosis of a run in which no step was applied: it did not finish, it failed."""
    return (
        f"all {n} steps were skipped (non-finite loss or gradients, or failing reward functions under "
        f"reward_error_policy skip), so the adapters never changed; see the warnings above: a learning_rate "
        f"({cfg.learning_rate:g}) or lora_scale ({cfg.lora_scale:g}) too large is the usual cause of "
        f"non-finite values. The unchanged state is saved in {run_dir}"
    )
