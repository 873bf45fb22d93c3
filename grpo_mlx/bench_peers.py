"""`python -m grpo_mlx.bench_peers`: the same GRPO step in grpo-mlx, mlx-lm-lora and Unsloth's MLX
trainer, side by side: seconds per optimizer step, medians of alternating rounds, and ratios.

The shape: a ~4M-parameter qwen2 with random weights, saved once as an mlx-lm model directory
with a byte-level BPE tokenizer and a ChatML template; B=4 prompts, G=8 completions each, 64
new tokens, beta=0.04, LoRA rank 8 on every linear layer of every block, float32 on the CPU
with the system OpenBLAS. Its stop token lies outside the model's vocabulary (the
tokenizer has one more token than the model has logits), so no completion can end early and
every trainer generates the whole budget.

Each round runs every trainer once, in its own subprocess (A B C A B C ...), so that other
programs' load falls on all three; a trainer runs `--warmup` steps, then `--steps` timed ones.
The peers run from their own Python (`--peer-python`, a venv with mlx-lm-lora and
unsloth_zoo installed; they are never dependencies of grpo-mlx), and a trainer whose package
is missing there is skipped with a message. Each subprocess loads the system OpenBLAS before
MLX and reports a matmul GFLOP/s probe, printed beside its times.

Settings matched: the model, tokenizer and prompt tokens; the reward (share of digits in the
completion); temperature 1 without top-p/top-k/min-p; G; the token budget; beta; epsilon 0.2;
the "grpo" loss (per-sequence token mean); LoRA rank 8, scale 20, all linear layers; a
constant learning rate without warm-up; no gradient checkpointing; one update per rollout.
Not matched (each trainer's own way, kept): mlx-lm-lora's reference is a second, frozen copy
of the base model (its CLI's default), the others switch the adapters off; mlx-lm-lora uses
Adam and the others AdamW (weight decay 0 in grpo-mlx, Unsloth's 0.001); grpo-mlx clips no
gradient norm here (max_grad_norm 0), Unsloth caps each gradient leaf's norm at 1 (its
default), mlx-lm-lora clips nothing; Unsloth compiles its steps (its default `compile=True`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

TRAINERS = ("grpo-mlx", "mlx-lm-lora", "unsloth")
# the package each trainer needs in the Python that runs it
PACKAGES = {"grpo-mlx": "grpo_mlx", "mlx-lm-lora": "mlx_lm_lora", "unsloth": "unsloth_zoo"}
# ~4M parameters: 6 blocks of width 256 (3.83M) and a 401-token embedding (0.10M)
MODEL = dict(
    hidden_size=256,
    num_hidden_layers=6,
    intermediate_size=576,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    rope_theta=1e6,
    tie_word_embeddings=True,
    max_position_embeddings=2048,
)
PROMPTS = [
    "What is 12 + 30? Answer with digits.",
    "Natalia sold 48 clips in April and half as many in May. How many in all?",
    "def add(a, b): return a + b. What is add(1, 2)?",
    "How many clips did Natalia sell altogether in April and May?",
    "Write the number 72 in digits.",
    "What is 7 times 6?",
    "Count from 1 to 5.",
    "The answer is 42. Repeat the answer.",
]
STOP = "<|stop|>"
WORKER = Path(__file__).with_name("peer_workers.py")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--peer-python", default=None, help="Python of a venv with mlx-lm-lora and unsloth_zoo installed.")
    p.add_argument("--grpo-mlx-python", default=None, help="Python for grpo-mlx (default: this one).")
    p.add_argument("--mlx-lm-lora-python", default=None, help="Python for mlx-lm-lora (default: --peer-python).")
    p.add_argument("--unsloth-python", default=None, help="Python for Unsloth (default: --peer-python).")
    p.add_argument("--trainers", default=",".join(TRAINERS), help="Comma-separated subset of " + ", ".join(TRAINERS))
    p.add_argument("--rounds", type=int, default=3, help="Rounds; each runs every trainer once, in turn.")
    p.add_argument("--warmup", type=int, default=2, help="Untimed steps at the start of each run.")
    p.add_argument("--steps", type=int, default=3, help="Timed steps per run.")
    p.add_argument("--batch-size", type=int, default=4, help="B: prompts per step.")
    p.add_argument("--group-size", type=int, default=8, help="G: completions per prompt.")
    p.add_argument("--max-tokens", type=int, default=64, help="New tokens per completion (all generate this many).")
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--work-dir", default=None, help="Where the model directory goes (default: a temporary one).")
    p.add_argument("--timeout", type=float, default=900, help="Seconds a single trainer run may take.")
    p.add_argument("--json", default=None, help="Also write every run's figures to this file.")


def save_model_dir(path: Path) -> Path:
    """The random-weight qwen2 as an mlx-lm model directory: weights, config.json and a tokenizer
    whose stop token has no logit (its id is the model's vocab_size)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from grpo_mlx.testing import build_bpe_tokenizer, build_random_model

    tok = build_bpe_tokenizer()
    tok.add_tokens([STOP], special_tokens=True)
    tok.eos_token = STOP
    stop_id = tok.convert_tokens_to_ids(STOP)
    assert stop_id == len(tok) - 1, "the stop token must be the last id, outside the model's vocabulary"
    config = {**MODEL, "vocab_size": stop_id}
    spec = "qwen2:" + ",".join(f"{k}={json.dumps(v)}" for k, v in config.items())  # JSON: true, 1e-06
    mx.random.seed(0)
    model, _ = build_random_model(spec)
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (path / "config.json").write_text(json.dumps({"model_type": "qwen2", **config, "torch_dtype": "float32"}, indent=1))
    tok.save_pretrained(str(path))
    params = sum(v.size for _, v in tree_flatten(model.parameters()))
    (path / "bench_params.json").write_text(json.dumps({"parameters": params}))
    return path


def settings(args, model_dir: Path, work_dir: Path) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    prompts = (PROMPTS * args.batch_size)[: args.batch_size]  # the same B prompts every step, in every trainer
    data = work_dir / "data"  # grpo-mlx's config wants a dataset; its trainer is handed the prompts themselves
    data.mkdir(parents=True, exist_ok=True)
    (data / "train.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return {
        "model_dir": str(model_dir),
        "data_dir": str(data),
        "work_dir": str(work_dir),
        "prompts": prompts,
        "prompt_ids": [tok.encode(p, add_special_tokens=False) for p in prompts],
        "B": args.batch_size,
        "G": args.group_size,
        "T": args.max_tokens,
        "beta": args.beta,
        "epsilon": 0.2,
        "temperature": 1.0,
        "lora_rank": 8,
        "lora_scale": 20.0,
        "learning_rate": 1e-5,
        "warmup": args.warmup,
        "steps": args.steps,
    }


def has_package(python: str, package: str) -> bool:
    check = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({package!r}) is None)"
    return subprocess.run([python, "-c", check], capture_output=True).returncode == 0


def pythons(args) -> dict[str, str | None]:
    peer = args.peer_python
    return {
        "grpo-mlx": args.grpo_mlx_python or sys.executable,
        "mlx-lm-lora": args.mlx_lm_lora_python or peer,
        "unsloth": args.unsloth_python or peer,
    }


def run_one(name: str, python: str, s: dict, timeout: float) -> dict:
    env = dict(os.environ, UNSLOTH_ZOO_DISABLE_GPU_INIT="1", TOKENIZERS_PARALLELISM="false")
    env.pop("GRPO_MLX_NO_BLAS", None)
    try:
        p = subprocess.run(
            [python, str(WORKER), name, json.dumps(s)], env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"trainer": name, "error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-12:]
        return {"trainer": name, "error": f"exit {p.returncode}: " + "\n".join(tail)}
    return json.loads(lines[-1])


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    out = {}
    for name, rows in runs.items():
        ok = [r for r in rows if "seconds" in r]
        if not ok:
            continue
        out[name] = {
            "median_s": median([t for r in ok for t in r["seconds"]]),
            "run_medians": [median(r["seconds"]) for r in ok],
            "gflops": median([r["gflops"] for r in ok]),
            "blas": ok[-1]["blas"],
            "mean_length": ok[-1].get("mean_length"),
        }
    return out


def print_table(summary: dict, s: dict, params: int, rounds: int) -> None:
    print(
        f"\nqwen2 random weights, {params / 1e6:.1f}M parameters; B={s['B']} G={s['G']} {s['T']} new tokens, "
        f"beta={s['beta']}, LoRA rank {s['lora_rank']}; {rounds} alternating rounds x {s['steps']} timed steps "
        f"(after {s['warmup']} warm-up)"
    )
    base = summary.get("grpo-mlx", {}).get("median_s")
    print(
        f"{'trainer':<12} {'median s/step':>13} {'range of runs':>15} {'vs grpo-mlx':>12} {'tokens':>7} "
        f"{'matmul GFLOP/s':>15}  BLAS"
    )
    for name, r in summary.items():
        ratio = f"{r['median_s'] / base:.2f}x" if base else "-"
        lo, hi = min(r["run_medians"]), max(r["run_medians"])
        tokens = f"{r['mean_length']:.1f}" if isinstance(r["mean_length"], (int, float)) else "?"
        print(
            f"{name:<12} {r['median_s']:>13.3f} {f'{lo:.2f}-{hi:.2f}':>15} {ratio:>12} {tokens:>7} "
            f"{r['gflops']:>15.1f}  {r['blas']}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grpo_mlx.bench_peers", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    import grpo_mlx  # noqa: F401  (the system OpenBLAS before MLX, for building the model)

    chosen = [t.strip() for t in args.trainers.split(",") if t.strip()]
    unknown = sorted(set(chosen) - set(TRAINERS))
    if unknown:
        parser.error(f"--trainers: unknown {', '.join(unknown)} (choose from {', '.join(TRAINERS)})")
    py = pythons(args)
    active = []
    for name in chosen:
        if not py[name]:
            print(f"skipping {name}: no Python given for it (--peer-python or --{name}-python)", file=sys.stderr)
        elif not has_package(py[name], PACKAGES[name]):
            print(f"skipping {name}: {PACKAGES[name]} is not installed in {py[name]}", file=sys.stderr)
        else:
            active.append(name)
    if not active:
        print("no trainer to run", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="grpo-mlx-peers-") as tmp:
        work = Path(args.work_dir or tmp)
        model_dir = save_model_dir(work / "model")
        params = json.loads((model_dir / "bench_params.json").read_text())["parameters"]
        s = settings(args, model_dir, work)
        runs: dict[str, list[dict]] = {name: [] for name in active}
        for k in range(args.rounds):
            for name in active:
                r = run_one(name, py[name], s, args.timeout)
                runs[name].append(r)
                if "error" in r:
                    print(f"round {k + 1} {name}: failed: {r['error']}", file=sys.stderr)
                else:
                    times = " ".join(f"{t:.3f}" for t in r["seconds"])
                    if r.get("skipped_steps"):
                        times += f" ({r['skipped_steps']} update(s) skipped as non-finite)"
                    print(
                        f"round {k + 1} {name:<12} s/step {times}  ({r['gflops']:.0f} GFLOP/s, {r['blas']})",
                        file=sys.stderr,
                        flush=True,
                    )
        summary = summarize(runs)
        print_table(summary, s, params, args.rounds)
        if args.json:
            Path(args.json).write_text(json.dumps({"settings": s, "runs": runs, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
