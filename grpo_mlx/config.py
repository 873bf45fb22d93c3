"""The run configuration: one dataclass, the single source of truth.

CLI flags are generated from its fields (`grpo_mlx.cli`), a YAML file given with `-c` fills what
the flags leave unset, and `validate` refuses bad values with a message naming the key. This
module imports neither MLX nor mlx-lm, so the TUI can build its form from it at once.

Precedence, lowest first: field defaults < the demo's defaults (when no model is given)
< the YAML file < command-line flags.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpo_mlx.errors import UserError

DEMO_DIR = Path(__file__).parent / "demo"
DEMO_MODEL = str(DEMO_DIR / "model")
DEMO_DATA = str(DEMO_DIR / "data")
TOOLS_DEMO_MODEL = str(DEMO_DIR / "tools_model")  # grpo_mlx.demo.tools: 3-digit sums with the calculator
TOOLS_DEMO_DATA = str(DEMO_DIR / "tools_data")
DEMOS = ("arithmetic", "tools")

# The choices of each option, once: the loss and advantage functions check against these too,
# and this MLX-free module validates a config with them without loading MLX.
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "vespo", "luspo", "gmpo")
CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")  # PPO's clipped surrogate
SCALE_REWARDS = ("group", "batch", "none")
IMPORTANCE_LEVELS = ("token", "sequence")
KL_ESTIMATORS = ("k1", "k2", "k3")
BASELINES = ("mean", "leave_one_out")
REWARD_COMBINATIONS = ("sum", "normalize_each")
IMPORTANCE_SAMPLING_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
FINE_TUNE_TYPES = ("lora", "dora")
REWARD_ISOLATION = ("thread", "process")
JUDGE_MODES = ("pointwise", "group")
TRACKERS = ("wandb", "trackio", "tensorboard", "swanlab")  # grpo_mlx.tracking has one writer each
HUB_REPO = re.compile(r"([A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*")  # owner/name, or name in the token's account
KV_BITS = (2, 3, 4, 5, 6, 8)  # what mx.quantize (and so mlx-lm's QuantizedKVCache) accepts
KV_GROUP_SIZES = (32, 64, 128)
SEED_LIMIT = 2**32  # numpy's and MLX's seeds are unsigned 32/64-bit; negative ones fail mid-run


def _f(default, help: str, **kw):
    """A dataclass field whose help text travels with it (the CLI and TUI read it)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # --- what to train on
    model: str | None = _f(
        None, "Model: a local mlx-lm model directory or a Hugging Face repo id. Default: the embedded demo model."
    )
    demo: str | None = _f(
        None,
        "Run an embedded demo's settings: arithmetic (2-digit sums; the default when no model is given) or "
        "tools (3-digit sums the model learns to hand to the calculator tool).",
    )
    data: str | None = _f(
        None,
        "Data: a directory with train/valid/test .jsonl or .parquet (shards too), one .jsonl/.parquet file, "
        "or a Hugging Face dataset id. Default: the demo task.",
    )
    data_config: str | None = _f(
        None, "Config of a multi-config dataset (e.g. main or socratic of openai/gsm8k): its {config}/ files."
    )
    prompt_key: str = _f("prompt", "Column that holds the prompt (a string or a list of chat messages).")
    answer_key: str = _f(
        "answer",
        "Column that holds the reference answer: built-in rewards read it as `answer`; your functions get "
        "it under its own name too.",
    )
    system_prompt: str | None = _f(None, "System prompt prepended to every prompt.")
    chat_template_kwargs: dict | None = _f(
        None,
        "Extra arguments for the chat template, e.g. '{\"enable_thinking\": false}' (a mapping in YAML). "
        "Default: the template's own defaults.",
    )
    ignore_chat_template: bool = _f(
        False,
        "Use string prompts as they are, without the chat template (base models, R1-Zero-style prompts); "
        "conversations still get it.",
    )
    max_prompt_length: int | None = _f(None, "Refuse prompts longer than this many tokens (default: no limit).")
    adapter_path: str | None = _f(
        None, "Run directory: adapters, checkpoints, metrics.jsonl, samples.jsonl. Default: runs/<timestamp>."
    )
    resume: str | None = _f(None, "Continue the run in this run directory from its last checkpoint.")
    overwrite: bool = _f(
        False,
        "Start over in an --adapter-path that already holds a run: its checkpoints, adapters and logs "
        "are deleted first.",
    )
    seed: int = _f(0, "Random seed for data order, sampling and LoRA initialisation (0 <= seed < 2**32).")

    # --- adapters
    fine_tune_type: str = _f("lora", "Adapter type: lora or dora.")
    num_layers: int = _f(16, "Number of transformer blocks (from the last) that get adapters; -1 for all.")
    lora_rank: int = _f(8, "LoRA rank.")
    lora_scale: float = _f(20.0, "LoRA scale (mlx-lm's `scale`, multiplies the adapter output).")
    lora_dropout: float = _f(0.0, "LoRA dropout.")
    lora_keys: list | None = _f(
        None, "Module keys to adapt inside each block (e.g. self_attn.q_proj); default: every linear layer."
    )

    # --- GRPO
    iters: int = _f(200, "Number of training steps (each: sample, score, update).")
    batch_size: int = _f(8, "Prompts per step (B); each gets group-size completions.")
    group_size: int = _f(8, "Completions sampled per prompt (G).")
    max_completion_length: int = _f(256, "Maximum tokens per completion.")
    temperature: float = _f(1.0, "Sampling temperature; training log-probabilities use the same temperature.")
    top_p: float = _f(1.0, "Nucleus sampling: keep the smallest set of tokens with this total probability (1 = off).")
    top_k: int = _f(0, "Sample only among the k most likely tokens (0 = off).")
    min_p: float = _f(0.0, "Drop tokens below min-p times the top token's probability (0 = off).")
    stop: list = _f(
        [],
        "Stop strings that end a completion (EOS always does); not part of the completion text. "
        "\\n, \\t, \\r are escapes, \\\\ a backslash.",
    )
    reward_functions: list = _f(
        ["accuracy"],
        "Reward functions: built-in names (accuracy, format, format_soft, overlong, length, code, judge, "
        "environment), "
        "file.py:function or module:function.",
    )
    reward_weights: list | None = _f(None, "Weight of each reward function (default: all 1).")
    tools: list = _f(
        [],
        "Tools the model may call (multi-turn episodes): built-ins (python, calculator), file.py:function or "
        "module:function; typed functions with a Google-style docstring, as TRL takes them.",
    )
    environment: str | None = _f(
        None,
        "An environment class (file.py:Class or module:Class), TRL's environment_factory: one instance per "
        "episode; reset(**row) -> text appended to the prompt; its public methods are tools; optional "
        "get_reward() (the 'environment' reward) and close().",
    )
    tool_timeout: float = _f(30.0, "Seconds one tool call may take; then its error goes back to the model (0 = none).")
    max_turns: int = _f(4, "Most turns with tool calls per episode (TRL's max_tool_calling_iterations).")
    scale_rewards: str = _f("group", "Advantage scaling: group (z-score in group), batch (batch std), none (Dr. GRPO).")
    loss_type: str = _f(
        "grpo",
        "Loss: grpo, bnpo, dr_grpo, dapo, luspo (aggregations of the clipped objective), cispo, sapo (soft gate), "
        "vespo (gamma-weighted) or gmpo (geometric mean).",
    )
    importance_sampling_level: str = _f("token", "Importance ratio per token (GRPO) or per sequence (GSPO).")
    beta: float = _f(
        0.0, "KL penalty coefficient towards the reference (the base model, adapters off). 0 skips the reference pass."
    )
    epsilon: float = _f(
        0.2, "Lower clipping range of the importance ratio (gmpo: of the log-ratio; its paper uses 0.4)."
    )
    epsilon_high: float | None = _f(
        None,
        "Upper clipping range (DAPO clip-higher); default: epsilon. cispo: the absolute cap of the ratio (default "
        "5, ScaleRL). gmpo: log space.",
    )
    kl_estimator: str = _f("k3", "KL estimator: k1 (log ratio), k2 (half squared log ratio) or k3 (exp(x) - x - 1).")
    kl_in_reward: bool = _f(
        False, "Subtract beta * KL of each completion from its reward instead of adding beta * KL to the loss."
    )
    ref_update_every: int = _f(
        0, "Iterative GRPO: every N steps the reference becomes the current policy (0 = the base model always)."
    )
    delta: float | None = _f(
        None, "Two-sided clipping: cap the ratio at delta for negative advantages (> 1 + epsilon_high)."
    )
    advantage_baseline: str = _f(
        "mean", "Baseline subtracted from each reward: mean (of the group) or leave_one_out (RLOO)."
    )
    reward_combination: str = _f(
        "sum", "Several rewards: sum (weighted sum, then normalise) or normalize_each (normalise each, then sum)."
    )
    num_iterations: int = _f(
        1, "Updates per rollout batch (mu). With 1 the ratio is exactly 1 and clipping never acts."
    )
    sapo_temperature_pos: float = _f(1.0, "sapo: temperature of the soft gate for positive advantages.")
    sapo_temperature_neg: float = _f(1.05, "sapo: temperature of the soft gate for non-positive advantages.")
    vespo_k_pos: float = _f(2.0, "vespo: power k of the gamma weight for advantages >= 0 (down-weights ratios < 1).")
    vespo_lambda_pos: float = _f(
        3.0, "vespo: decay lambda of the gamma weight for advantages >= 0 (down-weights ratios > 1)."
    )
    vespo_k_neg: float = _f(3.0, "vespo: power k of the gamma weight for negative advantages.")
    vespo_lambda_neg: float = _f(2.0, "vespo: decay lambda of the gamma weight for negative advantages.")
    mask_truncated_completions: bool = _f(
        False, "Completions cut at max-completion-length contribute nothing to the loss (DAPO)."
    )
    top_entropy_quantile: float = _f(
        1.0,
        "Policy loss only on the tokens in this top fraction of the batch's entropies (0.2 in the 80/20 paper; 1 = "
        "all).",
    )
    entropy_coef: float = _f(0.0, "Entropy bonus: subtract this times the mean token entropy from the loss (0 = off).")
    use_adaptive_entropy: bool = _f(
        False,
        "Skywork-OR1 adaptive entropy: raise entropy-coef by entropy-coef-delta while the entropy is at or below "
        "entropy-target, lower it otherwise; applied only at or below the target.",
    )
    entropy_target: float = _f(0.2, "Adaptive entropy: the target mean token entropy (nats).")
    entropy_coef_min: float = _f(0.0, "Adaptive entropy: lower bound of the coefficient.")
    entropy_coef_max: float = _f(1.0, "Adaptive entropy: upper bound of the coefficient.")
    entropy_coef_delta: float = _f(0.005, "Adaptive entropy: change of the coefficient per step.")
    off_policy_mask_threshold: float | None = _f(
        None,
        "DeepSeek-V3.2: drop sequences with negative advantage whose mean KL(sampler || policy) per token exceeds "
        "this (e.g. 0.5).",
    )
    use_bias_correction_kl: bool = _f(
        False,
        "Multiply the per-token KL by the importance ratio (DeepSeek-V3.2): the unbiased gradient of KL(policy || "
        "reference). Off by default (the GRPO paper's k3 term); TRL 1.16 turns it on.",
    )
    importance_sampling_correction: bool = _f(
        False,
        "Weight the loss by the ratio of the training to the sampling log-probabilities, to correct a "
        "sampler/trainer mismatch.",
    )
    importance_sampling_mode: str = _f(
        "sequence_mask", "Mismatch correction: token_truncate, token_mask, sequence_truncate or sequence_mask."
    )
    importance_sampling_clip_max: float | None = _f(
        3.0, "Mismatch correction: ratios above this are clipped (*_truncate) or zeroed (*_mask)."
    )
    importance_sampling_clip_min: float | None = _f(
        None, "Mismatch correction: ratios below this are clipped (*_truncate) or zeroed (*_mask)."
    )
    sync_ref_model: bool = _f(
        False,
        "TR-DPO: every ref-model-sync-steps steps the reference adapters become alpha * policy + (1 - alpha) * "
        "reference.",
    )
    ref_model_mixup_alpha: float = _f(0.6, "TR-DPO: the weight alpha of the policy in the reference update.")
    ref_model_sync_steps: int = _f(512, "TR-DPO: steps between reference updates.")
    dynamic_sampling: bool = _f(
        False, "Drop groups whose rewards are all equal and sample more prompts to refill the batch (DAPO)."
    )
    max_resample_rounds: int = _f(3, "With dynamic sampling: at most this many extra sampling rounds per step.")
    kv_bits: int | None = _f(
        None,
        "Quantize the rollouts' KV cache to this many bits (mlx-lm's quantized cache: 2, 3, 4, 5, 6 or 8): less "
        "memory for long completions; the log-prob gap it adds is logged as sampling/sampling_logp_difference. "
        "Default: not quantized.",
    )
    kv_group_size: int = _f(64, "Group size of the KV-cache quantization (32, 64 or 128; must divide the head size).")
    rollout_batch_size: int | None = _f(
        None,
        "Decode at most this many of the batch-size x group-size completions at a time (waves); each prompt is "
        "still prefilled once. Default: all at once.",
    )

    # --- optimisation
    learning_rate: float = _f(1e-5, "Peak learning rate (AdamW).")
    warmup_steps: int = _f(0, "Linear warmup steps before the cosine decay.")
    min_lr_ratio: float = _f(0.1, "Cosine decay ends at learning_rate times this.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    max_grad_norm: float = _f(1.0, "Clip the global gradient norm to this (0 = off).")
    gradient_accumulation_steps: int = _f(1, "Split each step's B*G completions into this many micro-batches.")
    ignore_memory_plan: bool = _f(
        False, "Start even when the memory plan (`grpo-mlx plan`) predicts the run does not fit."
    )
    grad_checkpoint: bool = _f(
        False,
        "Recompute each transformer block's activations in the backward pass instead of keeping them: "
        "less memory, about a third more compute.",
    )

    # --- the judge reward (reward_functions: judge)
    judge_model: str | None = _f(
        None,
        "Who judges for the judge reward: a local mlx-lm model (path or hub id), base (the policy's own base "
        "model, adapters off: no extra memory, but the policy learns to please its own base), or the http(s) "
        "URL of an OpenAI-compatible server (URL#model names the server's model).",
    )
    judge_rubric: str | None = _f(
        None,
        "What the judge is asked: text or a .txt/.md file, with {prompt}, {completion}, {answer} and any "
        "dataset column filled in ({completions} in group mode). Default: a generic helpfulness rubric.",
    )
    judge_mode: str = _f(
        "pointwise",
        "pointwise (one request per completion) or group (one per prompt showing all its completions, "
        "a score each: relative judgments, RULER-style).",
    )
    judge_scale: str = _f("0-10", "The judge's score scale LOW-HIGH; scores are normalised to [0, 1].")
    judge_max_tokens: int = _f(256, "Most tokens of one judge answer.")
    judge_temperature: float = _f(0.0, "The judge's sampling temperature (0 = greedy); its sampling is seeded.")
    judge_concurrency: int = _f(
        8, "Judge requests at once: in flight to a server, or prompts per batch for a local judge."
    )
    judge_timeout: float = _f(60.0, "Seconds one request to a judge server may take.")
    judge_retries: int = _f(3, "Retries of a failed judge server request (with backoff) before the reward fails.")
    judge_api_key_env: str = _f(
        "OPENAI_API_KEY", "Environment variable holding the judge server's API key (sent when set)."
    )

    # --- faults
    reward_error_policy: str = _f(
        "stop", "When a reward function fails: stop (save a checkpoint and exit) or skip (skip the step)."
    )
    reward_isolation: str = _f(
        "thread",
        "Where custom reward functions run: thread (in the trainer, with the timeout) or process "
        "(a worker process each: a crash or os._exit costs only that call).",
    )
    reward_timeout: float = _f(
        60.0, "Seconds a reward function may take on one batch before it counts as failed (0 = no limit)."
    )
    max_bad_steps: int = _f(
        3, "Stop after this many skipped steps in a row (non-finite loss or gradients, failing rewards)."
    )

    # --- reporting and checkpoints
    save_every: int = _f(50, "Save a checkpoint every N steps (and always at the end).")
    samples_per_step: int = _f(4, "Groups per step written to samples.jsonl and shown live (-1 = all).")
    eval_limit: int = _f(200, "Held-out prompts scored greedily before and after training (0 = skip).")
    eval_split: str = _f("test", "Split used for the before/after evaluation (falls back to valid).")
    eval_every: int = _f(
        0, "Also score the held-out prompts greedily every N steps, as an `eval` event (0 = only before and after)."
    )

    # --- tracking and sharing
    report_to: list = _f(
        [],
        "Experiment trackers that also get the metrics, held-out evaluations and sampled completions: "
        "wandb, trackio, tensorboard, swanlab (comma-separated; none = only the run directory's files).",
    )
    project_name: str | None = _f(None, "Tracker project name. Default: grpo-mlx.")
    run_name: str | None = _f(None, "Tracker run name. Default: the run directory's name.")
    push_to_hub: str | None = _f(
        None, "After training, upload the adapters with a model card to this Hugging Face repo (owner/name)."
    )

    @property
    def is_demo(self) -> bool:
        return self.model in (None, DEMO_MODEL)


# The demo's settings, measured on this project's 2-core Linux machines: the 0.8M-parameter model
# goes from ~44% to >90% held-out accuracy in 120-200 steps at ~0.5 s a step.
DEMO_DEFAULTS: dict[str, Any] = dict(
    model=DEMO_MODEL,
    data=DEMO_DATA,
    num_layers=-1,
    iters=200,
    batch_size=8,
    group_size=8,
    max_completion_length=8,
    learning_rate=1e-4,
    save_every=50,
)

# `--demo tools`: the model (grpo_mlx.demo.pretrain_tools) rarely calls the calculator; the reward
# is its final answer. The before/after held-out evaluation runs greedy episodes with the tool
# (accuracy and tool_use, the share of episodes that call it) over the test split's 200 prompts.
TOOLS_DEMO_DEFAULTS: dict[str, Any] = dict(
    model=TOOLS_DEMO_MODEL,
    data=TOOLS_DEMO_DATA,
    tools=["calculator"],
    reward_functions=["grpo_mlx.demo.tools:tool_answer"],
    max_turns=1,
    num_layers=-1,
    iters=300,
    batch_size=8,
    group_size=8,
    max_completion_length=32,
    learning_rate=2e-4,  # 5e-4 broke the copy of the tool's result within 5 steps (reward 0 from step 7, measured)
    save_every=50,
)


class ConfigError(UserError, ValueError):
    """A configuration problem; the message names the key (and file/line when known)."""


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}

# `--help` shows the options in these groups, in this order; every field is in exactly one
# (tests/test_config.py checks), so a new field is placed here too.
OPTION_GROUPS: dict[str, tuple[str, ...]] = {
    "model and prompts": (
        "model", "demo", "system_prompt", "max_prompt_length", "chat_template_kwargs", "ignore_chat_template",
    ),
    "data": ("data", "data_config", "prompt_key", "answer_key"),
    "run directory": ("adapter_path", "resume", "overwrite", "seed"),
    "adapters": ("fine_tune_type", "num_layers", "lora_rank", "lora_scale", "lora_dropout", "lora_keys"),
    "sampling": (
        "batch_size", "group_size", "max_completion_length", "temperature", "top_p", "top_k", "min_p", "stop",
        "dynamic_sampling", "max_resample_rounds",
    ),
    "rollout memory": ("kv_bits", "kv_group_size", "rollout_batch_size"),
    "rewards and advantages": (
        "reward_functions", "reward_weights", "reward_combination", "scale_rewards", "advantage_baseline",
    ),
    "objective": (
        "loss_type", "importance_sampling_level", "beta", "epsilon", "epsilon_high", "delta", "kl_estimator",
        "kl_in_reward", "ref_update_every", "num_iterations", "sapo_temperature_pos", "sapo_temperature_neg",
        "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg",
    ),
    "objective: masks, entropy and corrections": (
        "mask_truncated_completions", "top_entropy_quantile", "entropy_coef", "use_adaptive_entropy",
        "entropy_target", "entropy_coef_min", "entropy_coef_max", "entropy_coef_delta", "off_policy_mask_threshold",
        "use_bias_correction_kl", "importance_sampling_correction", "importance_sampling_mode",
        "importance_sampling_clip_max", "importance_sampling_clip_min", "sync_ref_model", "ref_model_mixup_alpha",
        "ref_model_sync_steps",
    ),
    "optimisation": (
        "iters", "learning_rate", "warmup_steps", "min_lr_ratio", "weight_decay", "max_grad_norm",
        "gradient_accumulation_steps", "grad_checkpoint", "ignore_memory_plan",
    ),
    "judge": (
        "judge_model", "judge_rubric", "judge_mode", "judge_scale", "judge_max_tokens", "judge_temperature",
        "judge_concurrency", "judge_timeout", "judge_retries", "judge_api_key_env",
    ),
    "tools and episodes": ("tools", "environment", "tool_timeout", "max_turns"),
    "faults": ("reward_error_policy", "reward_isolation", "reward_timeout", "max_bad_steps"),
    "evaluation": ("eval_limit", "eval_split", "eval_every"),
    "logging, tracking and sharing": (
        "save_every", "samples_per_step", "report_to", "project_name", "run_name", "push_to_hub",
    ),
}  # fmt: skip

# Other spellings of an option, as TRL (GRPOConfig / TrainingArguments) or mlx-lm name it, where
# the meaning is the same; each works as a flag and as a YAML key.
SYNONYMS: dict[str, str] = {
    "num_generations": "group_size",  # TRL
    "output_dir": "adapter_path",  # TRL
    "max_steps": "iters",  # TRL
    "lora_layers": "num_layers",  # mlx-lm's earlier name
    "max_tokens": "max_completion_length",  # mlx-lm's generate
    "lr": "learning_rate",
    "gradient_checkpointing": "grad_checkpoint",  # TRL
    "save_steps": "save_every",  # TRL
    "steps_per_eval": "eval_every",  # mlx-lm
    "max_tool_calling_iterations": "max_turns",  # TRL
    "environment_factory": "environment",  # TRL
}

# Names that look like one of ours but mean something else: refused with the conversion.
DIFFERENT_MEANING: dict[str, str] = {
    "per_device_train_batch_size": (
        "TRL's per_device_train_batch_size counts completions, grpo-mlx's batch_size counts prompts "
        "(each gets group_size completions): use batch_size = per_device_train_batch_size / num_generations "
        "(times gradient_accumulation_steps and the number of processes, which one TRL update also spans)"
    ),
    "grad_accumulation_steps": (
        "mlx-lm's grad_accumulation_steps adds batches to each update, grpo-mlx's gradient_accumulation_steps "
        "splits one step's batch_size * group_size completions into micro-batches (the same update, less "
        "memory): for mlx-lm's N batches per update use an N times larger batch_size and "
        "gradient_accumulation_steps N"
    ),
    "lora_alpha": (
        "PEFT's lora_alpha is divided by the rank: grpo-mlx (as mlx-lm) multiplies the adapter output by "
        "lora_scale, so use lora_scale = lora_alpha / lora_rank"
    ),
    "hub_model_id": "grpo-mlx's push_to_hub takes the repo id itself: use push_to_hub owner/name",
    "quantized_kv_start": (
        "mlx-lm's quantized_kv_start delays the quantization of a long prompt's cache; grpo-mlx's kv_bits "
        "quantizes the rollout cache after the full-precision prompt prefill, for every completion token: "
        "remove quantized_kv_start"
    ),
    "num_train_epochs": (
        "grpo-mlx counts steps, not epochs: use iters (or max_steps) = num_train_epochs * train prompts / batch_size"
    ),
}


def closest_key(name: str) -> str:
    match = difflib.get_close_matches(name, [*FIELDS, *SYNONYMS], n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def canonical_keys(values: dict[str, Any], spell=lambda k: f"'{k}'", where: str = "") -> dict[str, Any]:
    """`values` with every synonym under its field's name. Two spellings of one option with
    different values are refused, naming both; a name that means something else here gets its
    conversion. `spell` writes a name as the user wrote it (a flag or a YAML key)."""
    out: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in values.items():
        if key in DIFFERENT_MEANING:
            raise ConfigError(f"{where}{spell(key)}: {DIFFERENT_MEANING[key]}")
        name = SYNONYMS.get(key, key)
        if name in out and out[name] != value:
            raise ConfigError(
                f"{where}{spell(spelled[name])} = {out[name]!r} and {spell(key)} = {value!r} are two spellings "
                "of one option; give one"
            )
        out[name], spelled[name] = value, key
    return out


def _normalise_key(key: str) -> str:
    return str(key).replace("-", "_")


def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML config; unknown keys are refused with their line and the closest valid key."""
    import yaml  # cheap; kept local so `import grpo_mlx.config` costs nothing

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        values = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(values).__name__}")
    lines = {kn.value: kn.start_mark.line + 1 for kn, _ in node.value} if node is not None else {}
    seen: dict[str, int] = {}
    for key_node, _ in node.value if node is not None else []:
        # YAML keeps the last of two equal keys without a word; batch-size and batch_size are one key
        name, line = _normalise_key(key_node.value), key_node.start_mark.line + 1
        if name in seen:
            raise ConfigError(
                f"{path}:{line}: key '{key_node.value}' is given twice (first at line {seen[name]}); keep one"
            )
        seen[name] = line
    out = {}
    for key, value in values.items():
        name = _normalise_key(key)
        if name not in FIELDS and name not in SYNONYMS and name not in DIFFERENT_MEANING:
            raise ConfigError(f"{path}:{lines.get(key, '?')}: unknown key '{key}'{closest_key(name)}")
        out[name] = value
    spelled = {_normalise_key(k): k for k in values}
    return canonical_keys(out, spell=lambda k: f"'{spelled[k]}' (line {lines.get(spelled[k], '?')})", where=f"{path}: ")


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
_ESCAPE = re.compile(r"\\([ntr\\])")


def unescape(text: str) -> str:
    """A stop string as typed: `\\n`, `\\t`, `\\r` are a newline, tab, carriage return and `\\\\` one
    backslash (a shell cannot pass a newline in '...'); any other backslash stays as written."""
    return _ESCAPE.sub(lambda m: _ESCAPES[m[1]], text)


def _typed_stops(values: dict[str, Any]) -> dict[str, Any]:
    """Stop strings from flags or YAML with their escapes decoded; one string is one stop string
    (a comma or newline is a fine stop string). A recorded run's values are decoded already."""
    stop = values.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if isinstance(stop, (list, tuple)):
        values = {**values, "stop": [unescape(v) if isinstance(v, str) else v for v in stop]}
    return values


def build_config(
    flags: dict[str, Any] | None = None, config_file: str | None = None, base: dict[str, Any] | None = None
) -> TrainConfig:
    """Merge defaults, demo defaults, `base` (a resumed run's saved config), YAML and flags
    (None = unset), then validate."""
    flags = _typed_stops(canonical_keys({k: v for k, v in (flags or {}).items() if v is not None}, spell=flag_name))
    for key in flags:
        if key not in FIELDS:
            raise ConfigError(f"unknown option '{key}'{closest_key(key)}")
    from_file = {**(base or {}), **_typed_stops(load_yaml(config_file) if config_file else {})}
    merged: dict[str, Any] = {}
    if (flags.get("demo") or from_file.get("demo")) == "tools":
        merged.update(TOOLS_DEMO_DEFAULTS)
    elif (flags.get("model") or from_file.get("model")) in (None, DEMO_MODEL):
        merged.update(DEMO_DEFAULTS)
        if from_file.get("data") or flags.get("data"):
            merged.pop("data")
    merged.update(from_file)
    merged.update(flags)
    cfg = TrainConfig(**{k: coerce(k, v, source=config_file) for k, v in merged.items()})
    absolute_paths(cfg)
    validate(cfg)
    return cfg


def local_path(value: str | None) -> str | None:
    """An existing local path made absolute, so a run directory's record works from any working
    directory (and a relative path never reads as a Hub id there); anything else unchanged."""
    if not value:
        return value
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


def rubric_path(value: str | None) -> str | None:
    """judge_rubric made absolute when it names a file; rubric text (any length) unchanged."""
    try:
        return local_path(value) if value and "\n" not in value else value
    except OSError:  # text too long to be a file name
        return value


def absolute_paths(cfg: TrainConfig) -> None:
    cfg.model = local_path(cfg.model)
    cfg.data = local_path(cfg.data)
    cfg.judge_rubric = rubric_path(cfg.judge_rubric)
    if cfg.judge_model not in (None, "base") and not cfg.judge_model.startswith(("http://", "https://")):
        cfg.judge_model = local_path(cfg.judge_model)
    specs = []
    for spec in cfg.reward_functions:
        target, colon, attr = spec.rpartition(":")
        specs.append(f"{local_path(target)}:{attr}" if colon and target.endswith(".py") else spec)
    cfg.reward_functions = specs
    tools = []
    for spec in cfg.tools:
        target, colon, attr = spec.rpartition(":")
        tools.append(f"{local_path(target)}:{attr}" if colon and target.endswith(".py") else spec)
    cfg.tools = tools
    if cfg.environment:
        target, colon, attr = cfg.environment.rpartition(":")
        cfg.environment = f"{local_path(target)}:{attr}" if colon and target.endswith(".py") else cfg.environment


# Options a resumed run may change: none of them changes what the steps compute, only how far the
# run goes, how often it saves, evaluates and logs, and how faults are handled. `iters` also sets
# the length of the cosine learning-rate schedule, so changing it bends the remaining schedule.
RESUME_MAY_CHANGE = frozenset(
    {
        "iters",
        "save_every",
        "eval_every",
        "eval_limit",
        "eval_split",
        "samples_per_step",
        "reward_timeout",
        "judge_timeout",
        "judge_retries",
        "judge_api_key_env",
        "reward_isolation",
        "reward_error_policy",
        "max_bad_steps",
        "grad_checkpoint",
        "rollout_batch_size",  # waves sample what one wave does (per-prompt seeds): memory, not results
        "adapter_path",
        "resume",
        "overwrite",
        "report_to",
        "project_name",
        "run_name",
        "push_to_hub",
    }
)


def recorded_config(run_dir: str) -> dict[str, Any]:
    """The config.json a run directory holds, as a dict of known keys."""
    import json

    path = Path(run_dir).expanduser() / "config.json"
    if not Path(run_dir).expanduser().is_dir():
        raise ConfigError(f"--resume {run_dir}: no such directory")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--resume {run_dir}: no config.json there; is it a grpo-mlx run directory?") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"--resume {run_dir}: cannot read {path}: {e}") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"--resume {run_dir}: {path} is not a grpo-mlx run configuration")
    return {k: v for k, v in saved.items() if k in FIELDS and k not in ("resume", "overwrite")}


def build_resumed_config(
    run_dir: str, flags: dict[str, Any] | None = None, config_file: str | None = None
) -> TrainConfig:
    """The recorded run's config with what flags and YAML change, refusing every change to an
    option that changes what is trained (each one named, recorded and given value)."""
    flags = {k: v for k, v in (flags or {}).items() if v is not None and k != "resume"}
    if flags.get("overwrite") not in (None, False, "false", "False"):
        raise ConfigError(f"--resume {run_dir} continues a run and --overwrite starts over: give one of them")
    recorded = recorded_config(run_dir)
    given_dir = flags.pop("adapter_path", None) or (load_yaml(config_file).get("adapter_path") if config_file else None)
    if given_dir and Path(given_dir).expanduser().resolve() != Path(run_dir).expanduser().resolve():
        raise ConfigError(
            f"--resume {run_dir} with --adapter-path {given_dir}: a resumed run stays in its "
            "directory; give --resume alone"
        )
    base = {**recorded, "adapter_path": run_dir}
    before = build_config({}, None, base=base)  # the record, normalised as a new value would be
    cfg = build_config(flags, config_file, base=base)
    cfg.adapter_path = cfg.resume = run_dir
    changed = [
        f"{k} {getattr(before, k)!r} -> {getattr(cfg, k)!r}"
        for k in FIELDS
        if k in recorded and k not in RESUME_MAY_CHANGE and getattr(before, k) != getattr(cfg, k)
    ]
    if changed:
        raise ConfigError(
            f"--resume {run_dir}: these options differ from the recorded run and would change what "
            f"is trained: {'; '.join(changed)} (drop them to continue the run; only "
            f"{', '.join(sorted(RESUME_MAY_CHANGE - {'adapter_path', 'resume', 'overwrite'}))} may change)"
        )
    return cfg


def coerce(name: str, value: Any, source: str | None = None) -> Any:
    """Convert a YAML/flag value to the field's type, with an error naming the key."""
    where = f"{source}: " if source else ""
    annotation = str(FIELDS[name].type)
    if value is None:
        if "None" in annotation:  # `X | None`: null means "unset"
            return None
        raise ConfigError(f"{where}'{name}': null is not a value for this option (remove the line to get its default)")
    if name == "push_to_hub" and isinstance(value, bool):
        raise ConfigError(
            f"{where}'push_to_hub': takes the repo id (owner/name), not {value}; TRL's push_to_hub: true with "
            "hub_model_id: X is push_to_hub: X here"
        )
    if "dict" in annotation:
        return _coerce_mapping(name, value, where)
    if "list" not in annotation and isinstance(value, (list, tuple, dict)):
        raise ConfigError(f"{where}'{name}': expected one value, got {type(value).__name__} {value!r:.60}")
    try:
        if "list" in annotation:
            return _coerce_list(name, value, where)
        return _coerce_scalar(annotation, value)
    except ConfigError:
        raise
    except (TypeError, ValueError):
        kind = annotation.replace(" | None", "")
        raise ConfigError(f"{where}'{name}': expected {kind}, got {value!r}") from None


def _coerce_mapping(name: str, value: Any, where: str) -> dict:
    """A mapping from YAML, or a JSON object from the command line ('{"enable_thinking": false}')."""
    if isinstance(value, str):
        import json

        try:
            value = json.loads(value)
        except ValueError as e:
            raise ConfigError(f"{where}'{name}': not valid JSON ({e}); write it as '{{\"key\": value}}'") from None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"{where}'{name}': expected a mapping of names to values, got {value!r:.60}")
    return dict(value)


def _coerce_list(name: str, value: Any, where: str) -> list:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)):
        value = [value]
    if name == "reward_weights":
        bad = [v for v in value if isinstance(v, bool) or not isinstance(v, (int, float, str))]
        if bad:
            raise ConfigError(f"{where}'{name}': expected numbers, got {bad[0]!r:.60}")
        return [float(v) for v in value]
    if name == "report_to":  # mlx-lm's form "wandb,trackio" also inside a list; TRL's "none" means no tracker
        value = [v.strip().lower() for item in value for v in str(item).split(",") if v.strip()]
        return [v for v in dict.fromkeys(value) if v != "none"]
    bad = [v for v in value if not isinstance(v, str)]
    if bad:  # str(5) or str({...}) would become a stop string or key nobody wrote
        raise ConfigError(f"{where}'{name}': expected a list of strings, got {type(bad[0]).__name__} {bad[0]!r:.60}")
    return list(value)


def _coerce_scalar(annotation: str, value: Any) -> Any:
    """One value as the annotation's type; ValueError when it is not one."""
    if "bool" in annotation:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        return bool(value)
    if "int" in annotation:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(value)
        return int(value)
    if "float" in annotation:
        if isinstance(value, bool):
            raise ValueError(value)
        return float(value)
    if not isinstance(value, str):
        raise ValueError(value)  # a number or object where text belongs
    return value


def validate(cfg: TrainConfig) -> None:
    """Refuse values that cannot work, naming the key and what would be valid."""

    def need(ok: bool, key: str, why: str):
        if not ok:
            raise ConfigError(f"'{key}' = {getattr(cfg, key)!r}: {why}")

    for name, f in FIELDS.items():  # NaN passes no comparison and inf passes most: refuse both first
        value = getattr(cfg, name)
        if "float" in str(f.type) and value is not None and not math.isfinite(value):
            raise ConfigError(f"'{name}' = {value!r}: must be a finite number")
    for i, w in enumerate(cfg.reward_weights or []):
        if not math.isfinite(w):
            raise ConfigError(
                f"'reward_weights' = {cfg.reward_weights!r}: weight {i + 1} is {w!r}, must be a finite number"
            )
    need(0 <= cfg.seed < SEED_LIMIT, "seed", f"must be in [0, 2**32) = [0, {SEED_LIMIT - 1}]")
    need(cfg.reward_isolation in REWARD_ISOLATION, "reward_isolation", f"must be one of {', '.join(REWARD_ISOLATION)}")
    need(
        not (cfg.resume and cfg.overwrite),
        "overwrite",
        "--resume continues a run and --overwrite starts over: give one of them",
    )
    need(
        cfg.data is not None,
        "data",
        "required when a model is given: a directory of train/valid/test.jsonl, a .jsonl file "
        "or a Hugging Face dataset id",
    )
    need(cfg.group_size >= 2, "group_size", "must be at least 2 (advantages compare completions within a group)")
    need(cfg.batch_size >= 1, "batch_size", "must be at least 1")
    need(cfg.iters >= 0, "iters", "must be >= 0")
    need(cfg.max_completion_length >= 1, "max_completion_length", "must be at least 1")
    need(cfg.learning_rate >= 0, "learning_rate", "must be >= 0")
    need(cfg.beta >= 0, "beta", "must be >= 0")
    need(cfg.epsilon >= 0, "epsilon", "must be >= 0")
    need(cfg.epsilon_high is None or cfg.epsilon_high >= 0, "epsilon_high", "must be >= 0")
    need(cfg.temperature > 0, "temperature", "must be > 0 (training samples; use eval for greedy decoding)")
    need(0 < cfg.top_p <= 1, "top_p", "must be in (0, 1]")
    need(cfg.top_k >= 0, "top_k", "must be >= 0")
    need(0 <= cfg.min_p < 1, "min_p", "must be in [0, 1)")
    need(cfg.num_iterations >= 1, "num_iterations", "must be at least 1")
    need(cfg.lora_rank >= 1, "lora_rank", "must be at least 1")
    need(0 <= cfg.lora_dropout < 1, "lora_dropout", "must be in [0, 1)")
    need(cfg.num_layers == -1 or cfg.num_layers >= 1, "num_layers", "must be -1 (all) or at least 1")
    need(cfg.warmup_steps >= 0, "warmup_steps", "must be >= 0")
    need(0 <= cfg.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
    need(cfg.weight_decay >= 0, "weight_decay", "must be >= 0")
    need(cfg.max_grad_norm >= 0, "max_grad_norm", "must be >= 0")
    need(cfg.save_every >= 1, "save_every", "must be at least 1")
    need(cfg.eval_limit >= 0, "eval_limit", "must be >= 0")
    need(cfg.eval_every >= 0, "eval_every", "must be >= 0 (0 = no periodic evaluation)")
    need(cfg.kl_estimator in KL_ESTIMATORS, "kl_estimator", f"must be one of {', '.join(KL_ESTIMATORS)}")
    need(cfg.ref_update_every >= 0, "ref_update_every", "must be >= 0")
    eps_high = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high
    need(
        cfg.delta is None or cfg.delta > 1 + eps_high,
        "delta",
        f"must be greater than 1 + epsilon_high = {1 + eps_high:g}",
    )
    need(cfg.advantage_baseline in BASELINES, "advantage_baseline", f"must be one of {', '.join(BASELINES)}")
    need(
        cfg.reward_combination in REWARD_COMBINATIONS,
        "reward_combination",
        f"must be one of {', '.join(REWARD_COMBINATIONS)}",
    )
    need(cfg.reward_error_policy in ("stop", "skip"), "reward_error_policy", "must be stop or skip")
    need(cfg.reward_timeout >= 0, "reward_timeout", "must be >= 0")
    need(cfg.max_bad_steps >= 1, "max_bad_steps", "must be at least 1")
    need(cfg.max_turns >= 1, "max_turns", "must be at least 1")
    need(
        not (cfg.stop and (cfg.tools or cfg.environment)),
        "stop",
        "does not apply to episodes with tools or an environment (a turn ends at a tool call or EOS, an "
        "episode at EOS, max_turns or max_completion_length): drop it",
    )
    need(cfg.demo in (None, *DEMOS), "demo", f"must be one of {', '.join(DEMOS)}")
    need(cfg.tool_timeout >= 0, "tool_timeout", "must be >= 0")
    need(cfg.max_resample_rounds >= 0, "max_resample_rounds", "must be >= 0")
    _validate_rollout_memory(cfg, need)
    need(cfg.max_prompt_length is None or cfg.max_prompt_length >= 1, "max_prompt_length", "must be at least 1")
    need(cfg.loss_type in LOSS_TYPES, "loss_type", f"must be one of {', '.join(LOSS_TYPES)}")
    need(cfg.scale_rewards in SCALE_REWARDS, "scale_rewards", f"must be one of {', '.join(SCALE_REWARDS)}")
    need(
        cfg.importance_sampling_level in IMPORTANCE_LEVELS,
        "importance_sampling_level",
        f"must be one of {', '.join(IMPORTANCE_LEVELS)}",
    )
    need(cfg.fine_tune_type in FINE_TUNE_TYPES, "fine_tune_type", f"must be one of {', '.join(FINE_TUNE_TYPES)}")
    need(len(cfg.reward_functions) >= 1, "reward_functions", "name at least one reward function")
    need(
        cfg.reward_weights is None or len(cfg.reward_weights) == len(cfg.reward_functions),
        "reward_weights",
        f"needs one weight per reward function ({len(cfg.reward_functions)})",
    )
    _validate_objective(cfg, need)
    _validate_judge(cfg, need)
    unknown = [t for t in cfg.report_to if t not in TRACKERS]
    need(
        not unknown,
        "report_to",
        f"{unknown[0] if unknown else ''!r} is no tracker here; use {', '.join(TRACKERS)} or none",
    )
    need(
        cfg.push_to_hub is None or HUB_REPO.fullmatch(cfg.push_to_hub) is not None,
        "push_to_hub",
        "must be a Hugging Face repo id, owner/name (TRL's push_to_hub: true with hub_model_id: X is "
        "push_to_hub: X here)",
    )
    n = cfg.batch_size * cfg.group_size
    need(
        cfg.gradient_accumulation_steps >= 1 and n % cfg.gradient_accumulation_steps == 0,
        "gradient_accumulation_steps",
        f"must be >= 1 and divide batch_size*group_size = {n}",
    )


def _validate_rollout_memory(cfg: TrainConfig, need) -> None:
    need(cfg.kv_bits is None or cfg.kv_bits in KV_BITS, "kv_bits", f"must be one of {', '.join(map(str, KV_BITS))}")
    need(cfg.kv_group_size in KV_GROUP_SIZES, "kv_group_size", f"must be one of {', '.join(map(str, KV_GROUP_SIZES))}")
    need(cfg.rollout_batch_size is None or cfg.rollout_batch_size >= 1, "rollout_batch_size", "must be at least 1")
    # episodes rebuild their batch cache at each tool boundary (merge, right-padded prefill): full precision only
    episodes = bool(cfg.tools or cfg.environment)
    need(
        not (episodes and cfg.kv_bits),
        "kv_bits",
        "multi-turn episodes (tools, environment) need a full-precision cache",
    )
    need(
        not (episodes and cfg.rollout_batch_size),
        "rollout_batch_size",
        "multi-turn episodes (tools, environment) decode every row at once; waves are for single-turn rollouts",
    )


def _validate_judge(cfg: TrainConfig, need) -> None:
    """The judge_* keys; judge_model is required when the judge reward is chosen."""
    from grpo_mlx.judge_rubric import parse_scale

    need(
        "judge" not in cfg.reward_functions or bool(cfg.judge_model),
        "judge_model",
        "the judge reward needs a judge: a local model path or hub id, base, or an http(s) URL",
    )
    need(cfg.judge_mode in JUDGE_MODES, "judge_mode", f"must be one of {', '.join(JUDGE_MODES)}")
    need(parse_scale(cfg.judge_scale) is not None, "judge_scale", "must be LOW-HIGH with LOW < HIGH, e.g. 0-10")
    need(cfg.judge_max_tokens >= 1, "judge_max_tokens", "must be at least 1")
    need(cfg.judge_temperature >= 0, "judge_temperature", "must be >= 0 (0 = greedy)")
    need(cfg.judge_concurrency >= 1, "judge_concurrency", "must be at least 1")
    need(cfg.judge_timeout > 0, "judge_timeout", "must be > 0 seconds")
    need(cfg.judge_retries >= 0, "judge_retries", "must be >= 0")
    need(bool(cfg.judge_api_key_env), "judge_api_key_env", "must name an environment variable")


def _validate_objective(cfg: TrainConfig, need) -> None:
    """The loss types' and the objective options' keys (TRL's names and meanings)."""
    lt = cfg.loss_type
    if lt == "cispo":
        need(
            cfg.epsilon_high is None or cfg.epsilon_high >= 1,
            "epsilon_high",
            "with loss_type cispo it is the absolute cap of the importance ratio (ScaleRL uses 5); below 1 it "
            "would shrink even on-policy tokens",
        )
    need(
        cfg.delta is None or lt in CLIPPED_LOSS_TYPES,
        "delta",
        f"applies only to the clipped loss types ({', '.join(CLIPPED_LOSS_TYPES)}), not {lt}",
    )
    need(
        lt != "vespo" or cfg.importance_sampling_level == "token",
        "importance_sampling_level",
        "vespo builds its own sequence weight from the token ratios: use token",
    )
    need(
        lt != "gmpo" or cfg.importance_sampling_level == "token",
        "importance_sampling_level",
        "gmpo takes the geometric mean of the token ratios itself: use token",
    )
    need(
        lt != "luspo" or cfg.importance_sampling_level == "sequence",
        "importance_sampling_level",
        "luspo is defined with sequence-level ratios: use sequence",
    )
    need(cfg.sapo_temperature_pos > 0, "sapo_temperature_pos", "must be > 0")
    need(cfg.sapo_temperature_neg > 0, "sapo_temperature_neg", "must be > 0")
    for key in ("vespo_k_pos", "vespo_k_neg"):
        need(getattr(cfg, key) >= 0, key, "must be >= 0")
    for key in ("vespo_lambda_pos", "vespo_lambda_neg"):
        need(getattr(cfg, key) > 0, key, "must be > 0")
    need(0 <= cfg.top_entropy_quantile <= 1, "top_entropy_quantile", "must be in [0, 1] (1 keeps every token)")
    need(cfg.entropy_coef_delta >= 0, "entropy_coef_delta", "must be >= 0")
    need(
        cfg.entropy_coef_min <= cfg.entropy_coef_max,
        "entropy_coef_min",
        f"must be <= entropy_coef_max = {cfg.entropy_coef_max:g}",
    )
    need(
        not cfg.use_adaptive_entropy or cfg.entropy_coef_min <= cfg.entropy_coef <= cfg.entropy_coef_max,
        "entropy_coef",
        f"with use_adaptive_entropy it must lie in [entropy_coef_min, entropy_coef_max] = "
        f"[{cfg.entropy_coef_min:g}, {cfg.entropy_coef_max:g}]",
    )
    need(
        cfg.off_policy_mask_threshold is None or cfg.off_policy_mask_threshold >= 0,
        "off_policy_mask_threshold",
        "must be >= 0",
    )
    need(
        cfg.importance_sampling_mode in IMPORTANCE_SAMPLING_MODES,
        "importance_sampling_mode",
        f"must be one of {', '.join(IMPORTANCE_SAMPLING_MODES)}",
    )
    lo, hi = cfg.importance_sampling_clip_min, cfg.importance_sampling_clip_max
    need(
        lo is None or hi is None or lo < hi,
        "importance_sampling_clip_min",
        f"must be less than importance_sampling_clip_max = {hi}",
    )
    if cfg.importance_sampling_correction:
        need(
            lo is not None or hi is not None or cfg.importance_sampling_mode.endswith("_mask"),
            "importance_sampling_clip_max",
            "a *_truncate importance_sampling_mode needs importance_sampling_clip_max or importance_sampling_clip_min",
        )
        need(
            lt != "vespo" or cfg.importance_sampling_mode.startswith("token"),
            "importance_sampling_mode",
            "vespo folds the correction into its sequence weight token by token: use token_truncate or token_mask",
        )
        need(
            lt != "gmpo",
            "importance_sampling_correction",
            "gmpo has no per-token loss to weight; turn the correction off",
        )
    need(not cfg.sync_ref_model or cfg.beta > 0, "sync_ref_model", "needs beta > 0: with beta = 0 no reference is used")
    need(
        not cfg.sync_ref_model or cfg.ref_update_every == 0,
        "sync_ref_model",
        "and ref_update_every both move the reference; ref_update_every N is sync_ref_model with alpha 1 every N steps",
    )
    need(0 <= cfg.ref_model_mixup_alpha <= 1, "ref_model_mixup_alpha", "must be in [0, 1]")
    need(cfg.ref_model_sync_steps >= 1, "ref_model_sync_steps", "must be at least 1")


def default_run_dir() -> str:
    return os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
