"""One trainer's side of `python -m grpo_mlx.bench_peers`: train a few GRPO steps and print one
JSON line with the seconds per optimizer step, the BLAS it ran on and its matmul GFLOP/s.

Run by path (`PYTHON grpo_mlx/peer_workers.py TRAINER SETTINGS_JSON`) so that a peer's venv,
which has no grpo-mlx installed, can run it: nothing here imports grpo_mlx at module level.
Every trainer gets the same model directory, prompts, reward, sampling temperature, group
size, token budget, beta and LoRA shape; bench_peers.py lists what could not be matched.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import time

if __name__ == "__main__" and sys.path and os.path.basename(sys.path[0].rstrip("/")) == "grpo_mlx":
    sys.path.pop(0)  # run by path: grpo_mlx/ itself must not shadow top-level modules (data, tools, ...)

# The system OpenBLAS, loaded globally before MLX is imported (as grpo_mlx/blas.py does), so
# that every trainer's matmuls run on the same BLAS; the GFLOP/s probe shows that they did.
OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"


def load_blas(path: str) -> str | None:
    if not path or not os.path.exists(path):
        return None
    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    return path


def matmul_gflops(n: int = 1024, repeats: int = 5) -> float:
    # grpo_mlx.bench's probe, repeated: this file runs in a peer's venv, where grpo_mlx may be absent
    import mlx.core as mx

    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a @ b)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(a @ b)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / sorted(times)[len(times) // 2] / 1e9


def digit_reward(prompts, completions, answer=None, types=None, **kwargs) -> list[float]:
    """The share of digits in a completion: the same reward for every trainer (each calls it
    with its own keyword arguments; all pass the completions' text)."""
    out = []
    for c in completions:
        if isinstance(c, list):  # a conversational completion: a list of messages
            c = "".join(m.get("content", "") for m in c if isinstance(m, dict))
        elif isinstance(c, dict):
            c = c.get("content") or c.get("text") or ""
        text = str(c)
        out.append(sum(ch.isdigit() for ch in text) / max(len(text), 1))
    return out


class StepClock:
    """Wall time between successive step ends: the same measure for all three trainers (each
    reports the end of an optimizer step through its own hook)."""

    def __init__(self):
        self.ends: list[float] = []

    def tick(self) -> None:
        self.ends.append(time.perf_counter())

    def seconds(self, warmup: int) -> list[float]:
        deltas = [b - a for a, b in zip(self.ends, self.ends[1:])]  # ends[0] is the tick before step 1
        return deltas[warmup:]  # the warm-up steps (compilation, first allocations) are dropped


# ------------------------------------------------------------------ grpo-mlx


def run_grpo_mlx(s: dict, clock: StepClock) -> dict:
    from mlx_lm import load  # main() has let grpo_mlx load the system OpenBLAS before MLX

    from grpo_mlx.config import build_config
    from grpo_mlx.policy import add_adapters
    from grpo_mlx.trainer import Trainer

    model, tokenizer = load(s["model_dir"])
    options = {
        "model": s["model_dir"],
        "data": s["data_dir"],
        "eval_limit": 0,
        "num_layers": -1,
        "lora_rank": s["lora_rank"],
        "lora_scale": s["lora_scale"],
        "batch_size": s["B"],
        "group_size": s["G"],
        "max_completion_length": s["T"],
        "temperature": s["temperature"],
        "beta": s["beta"],
        "epsilon": s["epsilon"],
        "loss_type": "grpo",
        "learning_rate": s["learning_rate"],
        "warmup_steps": 0,
        "max_grad_norm": 0.0,
        "iters": s["warmup"] + s["steps"],
        "samples_per_step": 0,
        "reward_functions": [f"{os.path.abspath(__file__)}:digit_reward"],  # by path: any grpo-mlx version loads it
    }
    cfg = build_config(options)
    adapter_config = add_adapters(model, cfg)
    examples = [{"prompt": p, "prompt_text": p, "prompt_ids": ids} for p, ids in zip(s["prompts"], s["prompt_ids"])]
    trainer = Trainer.from_parts(cfg, model, tokenizer, examples, adapter_config=adapter_config)
    lengths, skipped = [], 0
    clock.tick()
    for step in range(s["warmup"] + s["steps"]):
        m = trainer.train_step(step)
        clock.tick()
        lengths.append(m.get("completions/mean_length"))
        skipped += int(bool(m.get("skipped")))  # a non-finite update is skipped: its time is not a full step
    return {"mean_length": next((x for x in reversed(lengths) if x is not None), None), "skipped_steps": skipped}


# ------------------------------------------------------------------ mlx-lm-lora


def run_mlx_lm_lora(s: dict, clock: StepClock) -> dict:
    import mlx.optimizers as optim
    from mlx_lm import load
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm_lora.trainer.grpo_trainer import GRPOTrainingArgs, train_grpo

    model, tokenizer = load(s["model_dir"])
    model.freeze()
    linear_to_lora_layers(model, len(model.layers), {"rank": s["lora_rank"], "scale": s["lora_scale"], "dropout": 0.0})
    # its CLI's reference when beta != 0 and no reference path is given: the base model loaded again, frozen
    ref_model, _ = load(s["model_dir"])
    ref_model.freeze()
    lengths = []

    class Clock(TrainingCallback):
        def on_train_loss_report(self, info):
            clock.tick()
            lengths.append(info.get("train_average_generated_tokens"))

    n = s["warmup"] + s["steps"]
    args = GRPOTrainingArgs(
        batch_size=s["B"],
        iters=n,
        steps_per_report=1,  # its step ends where it reports (after mx.eval of the update)
        steps_per_eval=10**9,
        steps_per_save=10**9,
        max_seq_length=4096,
        adapter_file=os.path.join(s["work_dir"], "mlx_lm_lora_adapters.safetensors"),
        group_size=s["G"],
        beta=s["beta"],
        epsilon=s["epsilon"],
        max_completion_length=s["T"],
        temperature=s["temperature"],
        top_p=1.0,
        top_k=0,
        min_p=0.0,
        grpo_loss_type="grpo",
    )
    dataset = [(ids, [], p, "") for p, ids in zip(s["prompts"], s["prompt_ids"])]
    clock.tick()  # the first report's delta includes loading of nothing but the first step
    train_grpo(
        model=model,
        ref_model=ref_model,
        tokenizer=tokenizer,
        optimizer=optim.Adam(learning_rate=s["learning_rate"]),
        train_dataset=dataset,
        reward_funcs=[digit_reward],
        args=args,
        training_callback=Clock(),
        end_answer_token="",  # its default stops at "</answer>"; the others have no such stop string
    )
    return {"mean_length": lengths[-1] if lengths else None}


# ------------------------------------------------------------------ Unsloth (unsloth_zoo's MLX trainer)


def run_unsloth(s: dict, clock: StepClock) -> dict:
    os.environ.setdefault("UNSLOTH_ZOO_DISABLE_GPU_INIT", "1")  # no torch, no GPU probe: MLX on the CPU
    from unsloth_zoo.mlx.loader import FastMLXModel
    from unsloth_zoo.mlx.trainer import MLXGRPOConfig, MLXGRPOTrainer

    model, tokenizer = FastMLXModel.from_pretrained(
        s["model_dir"], max_seq_length=1024, dtype="float32", load_in_4bit=False
    )
    model = FastMLXModel.get_peft_model(
        model,
        r=s["lora_rank"],
        lora_alpha=s["lora_scale"] * s["lora_rank"],  # its scale is alpha / r
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        lora_dropout=0,
        use_gradient_checkpointing=False,
    )
    lengths = []

    class Clock:
        def on_step_end(self, args, state, control, **kwargs):
            clock.tick()

        def on_log(self, args, state, control, logs=None, **kwargs):
            for key in ("completions/mean_length", "completion_length"):
                if logs and key in logs:
                    lengths.append(logs[key])

    n = s["warmup"] + s["steps"]
    args = MLXGRPOConfig(
        per_device_train_batch_size=s["B"] * s["G"],  # TRL counts completions: B prompts x G
        num_generations=s["G"],
        gradient_accumulation_steps=1,
        max_steps=n,
        warmup_steps=0,
        learning_rate=s["learning_rate"],
        lr_scheduler_type="constant",
        max_completion_length=s["T"],
        max_seq_length=1024,
        temperature=s["temperature"],
        top_p=1.0,
        beta=s["beta"],
        epsilon=s["epsilon"],
        loss_type="grpo",
        mask_truncated_completions=False,  # every completion runs to the budget: masking would zero the loss
        gradient_checkpointing=False,
        logging_steps=1,
        save_steps=0,
        output_dir=os.path.join(s["work_dir"], "unsloth"),
        report_to="none",
        seed=0,
    )
    from datasets import Dataset

    trainer = MLXGRPOTrainer(
        model=model,
        tokenizer=tokenizer,
        train_dataset=Dataset.from_list([{"prompt": p} for p in s["prompts"]]),
        args=args,
        reward_funcs=[digit_reward],
        callbacks=[Clock()],
    )
    clock.tick()
    trainer.train()
    return {"mean_length": lengths[-1] if lengths else None}


RUNNERS = {"grpo-mlx": run_grpo_mlx, "mlx-lm-lora": run_mlx_lm_lora, "unsloth": run_unsloth}


def main() -> None:
    name, s = sys.argv[1], json.loads(sys.argv[2])
    blas = load_blas(s.get("blas_path", OPENBLAS)) if name != "grpo-mlx" else None
    if name == "grpo-mlx":
        import grpo_mlx.blas as b

        b.use_system_blas()
        blas = b._loaded
    gflops = matmul_gflops()
    clock = StepClock()
    sys.stdout.flush()
    out = sys.stdout
    sys.stdout = sys.stderr  # the trainers' own prints go to stderr; stdout carries the one JSON line
    extra = RUNNERS[name](s, clock)
    sys.stdout = out
    print(json.dumps({"trainer": name, "blas": blas, "gflops": gflops, "seconds": clock.seconds(s["warmup"]), **extra}))


if __name__ == "__main__":
    main()
