"""`grpo-mlx plan`: the peak memory of a training run, predicted from the model's config.json
before any weight loads, with the machine's budget and the smallest changes that make it fit.

The step's memory is the weights and the adapters' state (always alive) plus the largest of
three phases, each freed before the next: the rollout (the KV cache of the rows decoded at
once, and the decode activations), the reference pass (β > 0: a forward over every row) and
the update (the activations kept for the backward pass, and the chunked log-prob pass of
grpo_mlx.logprobs). The coefficients are counts of the arrays MLX keeps per token, fitted
once on this machine's CPU backend (see `python -m grpo_mlx.plan_check`).

No MLX import at module level: `grpo-mlx plan --help` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from grpo_mlx.errors import UserError

HELP = "Predict a training run's peak memory from the model's config.json (no weights loaded)."

KV_STEP = 256  # mlx-lm's KVCache grows in steps of this many positions
LOGPROB_WINDOW = 4  # chunks of the log-prob pass alive at once (MLX dispatches ahead)
CHUNK_ARRAYS = 3.2  # (rows, V) float32 arrays alive per chunk: logits, exp, d logp / d logits
# float32 values kept per token and block for the backward pass: D-sized (norm inputs and
# outputs, attention output, residuals), I-sized (gate, up, their product) and the attention
# probabilities (heads x positions)
ACT_D, ACT_I, ACT_SCORES = 8.0, 3.0, 3.0
CHECKPOINT_KEEP = 2.0  # D-sized values per token and block kept under gradient checkpointing
# Under gradient checkpointing the training step (MLX 0.32, CPU) frees none of the blocks'
# activations: its update peaked at the plain pass's activations plus one block recomputed with
# its cotangents, about 2.2x a block's values other than the attention probabilities (1.6-2.7x
# measured at 2 and 4 blocks, 32+32 and 64+128 tokens), unless the log-prob pass over the
# block inputs is larger (49k vocabulary).
RECOMPUTE_BLOCK = 2.2


class MemoryPlanError(UserError, RuntimeError):
    """The run is predicted not to fit, or the model's config cannot be read."""


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    bits: int | None = None  # quantized base
    group_size: int = 64
    bias: bool = False  # qwen2's q/k/v biases

    @classmethod
    def from_config(cls, config: dict) -> Shape:
        config = {**config.get("text_config", {}), **config}
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        q = config.get("quantization") or config.get("quantization_config") or {}
        return cls(
            hidden=hidden,
            intermediate=int(config["intermediate_size"]),
            layers=int(config["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            vocab=int(config["vocab_size"]),
            tied=bool(config.get("tie_word_embeddings", True)),
            bits=int(q["bits"]) if q.get("bits") else None,
            group_size=int(q.get("group_size", 64)),
            bias=config.get("model_type") == "qwen2",
        )

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of each linear layer of one block."""
        d, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return [(d, q), (d, kv), (d, kv), (q, d), (d, i), (d, i), (i, d)]

    def params(self) -> int:
        block = sum(i * o for i, o in self.linears()) + 2 * self.hidden
        return self.layers * block + self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden


def matrix_bytes(rows: int, cols: int, bits: int | None, group_size: int, float_bytes: int) -> int:
    """A weight matrix, float or quantized (packed values plus a scale and a bias per group)."""
    if not bits:
        return rows * cols * float_bytes
    return rows * cols * bits // 8 + 2 * rows * (cols // group_size) * float_bytes


def weight_bytes(s: Shape, float_bytes: int) -> int:
    per_block = sum(matrix_bytes(o, i, s.bits, s.group_size, float_bytes) for i, o in s.linears())
    per_block += 2 * s.hidden * float_bytes + (s.heads + 2 * s.kv_heads) * s.head_dim * float_bytes * s.bias
    embed = matrix_bytes(s.vocab, s.hidden, s.bits, s.group_size, float_bytes)
    return s.layers * per_block + embed * (1 if s.tied else 2) + s.hidden * float_bytes


def adapter_params(s: Shape, cfg) -> int:
    """LoRA A and B of every adapted linear layer (mlx-lm's default keys: all of a block's)."""
    layers = s.layers if cfg.num_layers == -1 else min(cfg.num_layers, s.layers)
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    keys = cfg.lora_keys
    chosen = [io for name, io in zip(names, s.linears()) if not keys or any(k.endswith(name) for k in keys)]
    return layers * sum(cfg.lora_rank * (i + o) for i, o in chosen)


def kv_bytes_per_value(cfg, float_bytes: int) -> float:
    bits = getattr(cfg, "kv_bits", None)
    if not bits:
        return float(float_bytes)
    return bits / 8 + 2 * float_bytes / getattr(cfg, "kv_group_size", 64)


def kv_row_bytes(s: Shape, cfg, P: int, T: int, float_bytes: int) -> float:
    """One decoding row's KV cache: mlx-lm's BatchKVCache allocates prompt and completion in
    steps of KV_STEP; the quantized one (grpo_mlx.rollout_cache) holds the prompt exactly and
    grows the completion in steps."""
    values = s.layers * 2 * s.kv_heads * s.head_dim
    if getattr(cfg, "kv_bits", None):
        return values * (P + math.ceil(max(T - 1, 1) / KV_STEP) * KV_STEP) * kv_bytes_per_value(cfg, float_bytes)
    return values * math.ceil((P + T - 1) / KV_STEP) * KV_STEP * float_bytes


def prefill_bytes(s: Shape, cfg, B: int, P: int, float_bytes: int) -> float:
    """The B prompts' prefilled cache, kept while every wave gathers its rows from it."""
    values = B * s.layers * 2 * s.kv_heads * s.head_dim
    if getattr(cfg, "kv_bits", None):
        return values * P * kv_bytes_per_value(cfg, float_bytes)
    return values * math.ceil(P / KV_STEP) * KV_STEP * float_bytes


def activation_values(s: Shape, positions: int) -> float:
    """float32 values kept per token and block for the backward pass."""
    kv = s.kv_heads * s.head_dim
    return ACT_D * s.hidden + 2 * kv + ACT_I * s.intermediate + ACT_SCORES * s.heads * positions


def logprob_pass_bytes(rows: int, vocab: int) -> float:
    """The chunked log-prob pass (grpo_mlx.logprobs): a few chunks of (R, V) float32 alive."""
    from grpo_mlx.logprobs import LOGPROB_CHUNK_BYTES

    chunk = max(16, LOGPROB_CHUNK_BYTES // (4 * max(vocab, 1)))
    alive = min(rows, LOGPROB_WINDOW * chunk)
    return CHUNK_ARRAYS * alive * vocab * 4


def predict(cfg, config: dict, prompt_len: int, float_bytes: int = 4) -> dict[str, float]:
    """The parts of the step's peak (bytes) and their `total`. `float_bytes`: 4 on the CPU
    backend (grpo-mlx runs float32 there), the model's dtype on a GPU."""
    s = Shape.from_config(config)
    B, G, T = cfg.batch_size, cfg.group_size, cfg.max_completion_length
    N = B * G
    P = max(prompt_len, 1)
    positions = P + T - 1
    weights = weight_bytes(s, float_bytes)
    adapters = adapter_params(s, cfg) * 4 * 5  # float32: values, gradients, their sum, Adam's m and v

    rows = min(getattr(cfg, "rollout_batch_size", None) or N, N)  # one wave's rows decode at once
    kv_cache = rows * kv_row_bytes(s, cfg, P, T, float_bytes) + prefill_bytes(s, cfg, B, P, float_bytes)
    decode = rows * (3 * s.vocab * 4 + 4 * (s.hidden + s.intermediate) * float_bytes) + B * P * s.hidden * 4
    rollout = kv_cache + decode

    layer = activation_values(s, positions) * float_bytes  # bytes per token and block, in the model's dtype
    reference = 0.0
    if cfg.beta > 0:  # one forward over all rows, no gradient: a block's values at a time
        reference = N * positions * (layer + s.hidden * float_bytes) + logprob_pass_bytes(N * T, s.vocab)

    # micro-batches: each slice is evaluated before the next is built (update_policy), so one
    # slice's activations are alive, and the summed gradients (in `adapters`)
    k = max(cfg.gradient_accumulation_steps, 1)
    n = math.ceil(N / k)
    kept = n * positions * s.layers * layer
    logprob = logprob_pass_bytes(n * T, s.vocab)
    training = kept + logprob
    if cfg.grad_checkpoint:  # the log-prob pass over the block inputs, or the recomputation
        inputs = n * positions * (s.layers * CHECKPOINT_KEEP * s.hidden * float_bytes + layer)
        block = n * positions * (layer - ACT_SCORES * s.heads * positions * float_bytes)
        training = max(inputs + logprob, kept + RECOMPUTE_BLOCK * block)
        kept = training - logprob
    parts = {
        "weights": float(weights),
        "adapters_and_optimizer": float(adapters),
        "kv_cache": float(kv_cache),
        "decode_activations": float(decode),
        "reference_pass": float(reference),
        "training_activations": float(kept),
        "logprob_pass": float(logprob),
    }
    parts["total"] = weights + adapters + max(rollout, reference, training)
    return parts


# ------------------------------------------------------------------ reading the run


def read_model_config(model: str) -> dict:
    """config.json of a local model directory or of a Hub id in the local cache (never downloaded)."""
    local = Path(model).expanduser()
    path = local / "config.json"
    if not local.exists():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "config.json")
        except Exception:
            cached = None
        if not isinstance(cached, str):
            raise MemoryPlanError(
                f"model '{model}': no config.json locally or in the Hugging Face cache yet, so no memory plan "
                "before the download"
            )
        path = Path(cached)
    if not path.is_file():
        raise MemoryPlanError(f"{local}: no config.json in it, so no memory plan")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        Shape.from_config(config)
    except (ValueError, KeyError, TypeError) as e:
        raise MemoryPlanError(f"{path}: cannot read the model's shape ({type(e).__name__}: {e})") from None
    return config


def prompt_length(cfg) -> int:
    """The longest training prompt in tokens when data and tokenizer are at hand, else the
    --max-prompt-length setting, else a guess of 256."""
    try:
        from grpo_mlx import data, prompts
        from grpo_mlx.dryrun import load_tokenizer

        examples = data.load_split(
            cfg.data, "train", prompt_key=cfg.prompt_key, answer_key=cfg.answer_key, config=cfg.data_config
        )
        tokenizer = load_tokenizer(cfg.model)
        ready = prompts.prepare_examples(examples[:2000], tokenizer, **prompts.options(cfg))
        return max(len(ex["prompt_ids"]) for ex in ready)
    except Exception:  # no data or tokenizer here: the setting
        return cfg.max_prompt_length or 256


def on_gpu() -> bool:
    import mlx.core as mx  # grpo_mlx's import has loaded the system BLAS already

    return mx.default_device() != mx.cpu


def float_bytes(config: dict) -> int:
    if not on_gpu():
        return 4  # grpo-mlx computes in float32 on the CPU backend
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    return 4 if "32" in dtype else 2


def budget_bytes() -> int:
    """macOS / Metal: MLX's recommended working set; Linux: MemAvailable."""
    if on_gpu():
        import mlx.core as mx

        info = mx.device_info()
        size = info.get("max_recommended_working_set_size") or info.get("memory_size")
        if size:
            return int(size)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# ------------------------------------------------------------------ fixes


def candidate_changes(cfg, config: dict) -> list[tuple[str, dict, dict]]:
    """(flag text, config changes, model-config changes), smallest first within each kind."""
    N = cfg.batch_size * cfg.group_size
    out: list[tuple[str, dict, dict]] = []
    k = cfg.gradient_accumulation_steps
    for more in (2, 4, 8, 16, 32):
        if k * more <= N and N % (k * more) == 0:
            out.append((f"--gradient-accumulation-steps {k * more}", {"gradient_accumulation_steps": k * more}, {}))
    if not cfg.grad_checkpoint:
        out.append(("--grad-checkpoint", {"grad_checkpoint": True}, {}))
    rows = getattr(cfg, "rollout_batch_size", None) or N
    for r in (rows // 2, rows // 4, rows // 8):
        if r >= 1:
            out.append((f"--rollout-batch-size {r}", {"rollout_batch_size": r}, {}))
    if not getattr(cfg, "kv_bits", None):
        out += [(f"--kv-bits {b}", {"kv_bits": b}, {}) for b in (8, 4)]
    T = cfg.max_completion_length
    out += [(f"--max-completion-length {T // d}", {"max_completion_length": T // d}, {}) for d in (2, 4) if T // d]
    q = config.get("quantization") or {}
    if not q.get("bits") or q["bits"] > 4:
        four_bit = {"quantization": {"bits": 4, "group_size": 64}}
        out.append(("a 4-bit base model (mlx_lm.convert -q --q-bits 4)", {}, four_bit))
    return out


def with_changes(cfg, changes: dict):
    """`cfg` with `changes`; options another part adds (kv_bits, rollout_batch_size) ride on a copy."""
    known = {f.name for f in dataclasses.fields(cfg)}
    new = dataclasses.replace(cfg, **{k: v for k, v in changes.items() if k in known})
    for key, value in changes.items():
        if key not in known:
            object.__setattr__(new, key, value)
    return new


def fixes(cfg, config: dict, prompt_len: int, budget: int, fb: int) -> list[dict]:
    """Each single change that makes the run fit, re-predicted, smallest predicted peak last."""
    found = []
    for text, changes, model_changes in candidate_changes(cfg, config):
        total = predict(with_changes(cfg, changes), {**config, **model_changes}, prompt_len, fb)["total"]
        if total <= budget:
            found.append({"change": text, "predicted_peak_bytes": int(total)})
    return found


@dataclass
class Plan:
    model: str
    prompt_len: int
    parts: dict
    budget: int
    fixes: list

    @property
    def total(self) -> float:
        return self.parts["total"]

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    def to_json(self) -> dict:
        parts = {k: int(v) for k, v in self.parts.items() if k != "total"}
        return {"model": self.model, "prompt_tokens": self.prompt_len, "parts_bytes": parts,
                "predicted_peak_bytes": int(self.total), "budget_bytes": int(self.budget),
                "fits": self.fits, "fixes": self.fixes}  # fmt: skip


def make_plan(
    cfg, config: dict | None = None, prompt_len: int | None = None, budget: int | None = None, fb: int | None = None
) -> Plan:
    from grpo_mlx.config import DEMO_MODEL

    model = cfg.model or DEMO_MODEL
    config = config if config is not None else read_model_config(model)
    prompt_len = prompt_len if prompt_len is not None else prompt_length(cfg)
    budget = budget if budget is not None else budget_bytes()
    fb = fb or float_bytes(config)
    parts = predict(cfg, config, prompt_len, fb)
    found = fixes(cfg, config, prompt_len, budget, fb) if parts["total"] > budget else []
    return Plan(model, prompt_len, parts, budget, found)


def gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB"


def format_plan(plan: Plan, short: bool = False) -> str:
    verdict = "fits" if plan.fits else "does NOT fit"
    head = f"memory plan: predicted peak {gb(plan.total)} of {gb(plan.budget)} available: {verdict}"
    if short:
        lines = [head]
    else:
        lines = [head, f"  model {plan.model}, prompts up to {plan.prompt_len} tokens"]
        lines += [f"  {k.replace('_', ' '):<24} {gb(v)}" for k, v in plan.parts.items() if k != "total"]
        lines.append("  (total = weights + adapters + the largest of rollout, reference pass, update)")
    if not plan.fits:
        shown = plan.fixes[:4]
        lines += [f"  fits with {f['change']} ({gb(f['predicted_peak_bytes'])})" for f in shown]
        if not shown:
            lines.append("  no single change makes it fit: combine them, or a smaller model")
    return "\n".join(lines)


def check_run(cfg, out=None) -> Plan | None:
    """For `train`: print the short plan, and refuse a run predicted not to fit (before weights
    load) unless --ignore-memory-plan. The demo is never refused."""
    try:
        plan = make_plan(cfg)
    except MemoryPlanError as e:
        # No config.json here (a Hub model downloads with its weights, a wrong path is the loader's
        # to name) or a shape the planner does not know: no plan, and the run is not refused for it.
        if not cfg.is_demo:
            (out or sys.stderr).write(f"memory plan: none ({e})\n")
        return None
    (out or sys.stderr).write(format_plan(plan, short=True) + "\n")
    if not plan.fits and not cfg.is_demo and not getattr(cfg, "ignore_memory_plan", False):
        fix = plan.fixes[0]["change"] if plan.fixes else "a smaller model or shorter completions"
        raise MemoryPlanError(
            f"the run is predicted to need {gb(plan.total)} but {gb(plan.budget)} is available; "
            f"try {fix} (see `grpo-mlx plan`), or --ignore-memory-plan to start anyway"
        )
    return plan


# ------------------------------------------------------------------ the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from grpo_mlx.cli import add_config_flags

    add_config_flags(parser)
    parser.add_argument("--json", action="store_true", help="Print the plan as JSON (predicted_peak_bytes ...).")


def run(args: argparse.Namespace) -> int:
    from grpo_mlx.cli import config_from_args

    args.resume = getattr(args, "resume", None)
    plan = make_plan(config_from_args(args))
    print(json.dumps(plan.to_json(), indent=2) if args.json else format_plan(plan))
    return 0
