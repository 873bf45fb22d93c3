"""`python -m grpo_mlx.plan_check`: the memory plan against measured peaks.

For each shape of a grid (random-weight models built in memory, float and 4-bit), two real
training steps through the Trainer, the peak of each (mx.get_peak_memory after the step's
mx.reset_peak_memory, as metrics.jsonl records it), and the planner's prediction from the
same config; one table row per shape with the ratio. `--quick` runs the three smallest.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

# (preset spec, bits or 0, B, G, prompt tokens, completion tokens, micro-batches, checkpointing,
#  other options: beta, kv_bits, rollout_batch_size)
L2_8K = "smollm2-135m:num_hidden_layers=2,vocab_size=8192"  # 12M parameters
GRID = [
    (L2_8K, 0, 2, 4, 32, 32, 1, False, {}),
    ("smollm2-135m:num_hidden_layers=4", 0, 2, 4, 32, 32, 1, False, {}),
    (L2_8K, 0, 2, 8, 32, 32, 4, False, {}),
    (L2_8K, 0, 2, 8, 32, 32, 1, True, {}),
    ("smollm2-135m:num_hidden_layers=4", 0, 2, 8, 32, 32, 1, True, {}),
    ("smollm2-135m:num_hidden_layers=4", 4, 2, 8, 32, 64, 2, False, {"kv_bits": 8}),
    ("smollm2-135m:num_hidden_layers=4,vocab_size=8192", 0, 2, 8, 64, 128, 2, True, {}),
    ("smollm2-135m:num_hidden_layers=8", 0, 2, 4, 32, 32, 1, False, {"beta": 0.04}),
    ("smollm2-135m", 4, 1, 4, 32, 32, 1, False, {"rollout_batch_size": 2}),
    ("smollm2-135m", 0, 1, 4, 32, 32, 2, True, {}),
    ("qwen2.5-0.5b:num_hidden_layers=6", 4, 1, 4, 32, 32, 1, False, {"kv_bits": 4}),
    ("qwen2.5-0.5b:num_hidden_layers=6", 0, 1, 4, 32, 32, 2, False, {"beta": 0.04}),
    ("qwen2.5-0.5b", 4, 1, 2, 16, 32, 1, True, {}),
    ("qwen2.5-0.5b", 0, 1, 2, 16, 16, 1, False, {"beta": 0.04}),
]


def model_config(spec: str, bits: int) -> dict:
    """The config.json the planner would read for this random model."""
    from grpo_mlx.testing import PRESETS

    name, _, overrides = spec.partition(":")
    arch, config = PRESETS[name]
    config = {"model_type": arch, **config}
    for item in filter(None, overrides.split(",")):
        key, _, value = item.partition("=")
        config[key] = json.loads(value)
    if bits:
        config["quantization"] = {"bits": bits, "group_size": 64}
    return config


def run_config(B, G, P, T, k, ckpt, extra=None):
    from grpo_mlx.config import DEMO_DATA, build_config

    return build_config(dict(data=DEMO_DATA, num_layers=16, batch_size=B, group_size=G, max_completion_length=T,
                             learning_rate=1e-5, samples_per_step=0, reward_functions=["length"],
                             gradient_accumulation_steps=k, grad_checkpoint=ckpt, eval_limit=0,
                             **(extra or {})))  # fmt: skip


def measure(spec, bits, B, G, P, T, k, ckpt, extra=None, steps=2) -> float:
    """The largest step peak (bytes) of `steps` real training steps."""
    import mlx.core as mx  # grpo_mlx's import has loaded the system BLAS already
    import mlx.nn as nn

    from grpo_mlx.policy import add_adapters
    from grpo_mlx.testing import NoStopTokenizer, build_random_model
    from grpo_mlx.trainer import Trainer

    model, _ = build_random_model(spec)
    if bits:
        nn.quantize(model, group_size=64, bits=bits)
    cfg = run_config(B, G, P, T, k, ckpt, extra)
    adapter_config = add_adapters(model, cfg)
    mx.eval(model.parameters())
    examples = [{"prompt": "", "prompt_text": "", "prompt_ids": [(i * 7 + j) % 100 + 1 for j in range(P)]}
                for i in range(B)]  # fmt: skip
    trainer = Trainer.from_parts(cfg, model, NoStopTokenizer(), examples, adapter_config=adapter_config)
    return max(trainer.train_step(s)["peak_memory_gb"] for s in range(steps)) * 1e9


def predicted(spec, bits, B, G, P, T, k, ckpt, extra=None) -> float:
    from grpo_mlx.plan import predict

    return predict(run_config(B, G, P, T, k, ckpt, extra), model_config(spec, bits), P, 4)["total"]


def row(shape) -> dict:
    """One shape, measured in a fresh process (peaks and MLX's cache do not carry over)."""
    out = subprocess.run([sys.executable, "-m", "grpo_mlx.plan_check", "--one", json.dumps(shape)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    measured = float(out.stdout.strip().splitlines()[-1])
    p = predicted(*shape)
    return {"shape": shape, "measured": measured, "predicted": p, "ratio": p / measured}


def params(spec: str) -> int:
    from grpo_mlx.plan import Shape

    return Shape.from_config(model_config(spec, 0)).params()


# Qwen2.5 shapes (their config.json), 4-bit, for the "what fits" table
QWEN25 = {
    "0.5B": dict(hidden_size=896, num_hidden_layers=24, intermediate_size=4864, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "1.5B": dict(hidden_size=1536, num_hidden_layers=28, intermediate_size=8960, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "3B": dict(hidden_size=2048, num_hidden_layers=36, intermediate_size=11008, num_attention_heads=16,
               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7B": dict(hidden_size=3584, num_hidden_layers=28, intermediate_size=18944, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}  # fmt: skip
MAC_GB = (8, 16, 24, 36, 64)
WORKING_SET = 0.75  # Metal's recommended working set is about this share of a Mac's memory
FITS_G, FITS_T = (4, 8, 16, 32), (128, 256, 512, 1024, 2048, 4096)


def what_fits(prompt_tokens: int = 256, batch_size: int = 1) -> None:
    """For each Mac and model: the largest G x completion length (by their product) the planner
    fits with gradient checkpointing and the fewest micro-batches that fit (up to one row at a
    time), bf16 activations, B prompts of `prompt_tokens`, otherwise the default options."""
    from grpo_mlx.config import DEMO_DATA, build_config
    from grpo_mlx.plan import predict

    print("| Mac memory | " + " | ".join(f"Qwen2.5-{m} 4-bit" for m in QWEN25) + " |")
    print("|---" * (len(QWEN25) + 1) + "|")
    for mem in MAC_GB:
        cells = []
        for shape in QWEN25.values():
            config = {"model_type": "qwen2", **shape, "quantization": {"bits": 4, "group_size": 64}}
            best = None
            for G in FITS_G:
                for T in FITS_T:
                    for k in (m for m in (1, 2, 4, 8, 16, 32) if m <= G * batch_size):
                        cfg = build_config(dict(data=DEMO_DATA, model="x/y", batch_size=batch_size, group_size=G,
                                                max_completion_length=T, grad_checkpoint=True,
                                                gradient_accumulation_steps=k))  # fmt: skip
                        if predict(cfg, config, prompt_tokens, 2)["total"] <= WORKING_SET * mem * 1e9:
                            best = max(best or (0, 0, 0, 0), (G * T, G, T, -k))
                            break
            cells.append(f"G={best[1]} x {best[2]}, {-best[3]} micro" if best else "does not fit")
        print(f"| {mem} GB | " + " | ".join(cells) + " |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grpo_mlx.plan_check", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="Only the first three shapes.")
    parser.add_argument("--only", metavar="I,J", help="Only these rows of the grid (0-based): it in parts.")
    parser.add_argument("--fits", action="store_true", help="Print the 'what fits' table of Macs and models.")
    parser.add_argument(
        "--repredict",
        metavar="TABLE",
        help="Print a table this command printed before with today's predictions (no measuring: "
        "its measured column, row by row in the grid's order).",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fits:
        what_fits()
        return 0
    if args.one:
        print(measure(*json.loads(args.one)))
        return 0
    head = "model | params | bits | B | G | prompt | completion | micro | ckpt | other | measured | predicted | ratio"
    print(f"| {head} |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    if args.repredict:
        rows = measured_rows(args.repredict)
    else:
        chosen = [GRID[int(i)] for i in args.only.split(",")] if args.only else GRID[:3] if args.quick else GRID
        rows = ((shape, None) for shape in chosen)
    bad = 0
    for shape, measured in rows:
        r = row(shape) if measured is None else {"measured": measured, "predicted": predicted(*shape)}
        r["ratio"] = r["predicted"] / r["measured"]
        bad += not 0.85 <= r["ratio"] <= 1.15
        name, *rest = cells(shape)
        print(f"| {name} | {params(shape[0]) / 1e6:.0f}M | {' | '.join(rest)} | {r['measured'] / 1e6:.0f} MB | "
              f"{r['predicted'] / 1e6:.0f} MB | {r['ratio']:.2f} |", flush=True)  # fmt: skip
    print(f"{bad} of the shapes outside ±15%")
    return 1 if bad else 0


def cells(shape) -> list[str]:
    """The table cells that name a shape (all but params and the figures)."""
    spec, bits, B, G, P, T, k, ckpt, extra = shape
    other = ", ".join(f"{key} {value}" for key, value in extra.items()) or "-"
    return [spec, str(bits or "float32"), *map(str, (B, G, P, T, k)), "yes" if ckpt else "no", other]


def measured_rows(path: str):
    """(shape, measured bytes) of the rows of tables this command printed (files joined by
    commas, rows in any order), in GRID order; shapes not measured are left out."""
    found = {}
    for name in path.split(","):
        with open(name, encoding="utf-8") as f:
            for line in f:
                if line.startswith("| ") and " MB |" in line:
                    row = [c.strip() for c in line.strip().strip("|").split("|")]
                    found[tuple(row[:1] + row[2:10])] = float(row[10].removesuffix(" MB")) * 1e6
    for shape in GRID:
        if tuple(cells(shape)) in found:
            yield shape, found[tuple(cells(shape))]


if __name__ == "__main__":
    sys.exit(main())
