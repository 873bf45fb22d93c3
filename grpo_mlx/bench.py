"""`grpo-mlx bench`: how fast and how big each phase of a GRPO step is on this machine.

One run measures, alternating the variants it compares (A B A B ...) so that other programs'
noise falls on both, and reports medians:
- the machine: fp32 matmul FLOP/s, memory bandwidth (large reductions and copies), the active
  BLAS, and the matmul speed-up of the system OpenBLAS (the probe in two subprocesses, one
  with GRPO_MLX_NO_BLAS=1);
- rollouts: prefill and decode tokens/s of grpo-mlx's group sampler and of mlx-lm's
  BatchGenerator on the same B x G prompts, sampling settings and token budget (no stop token
  can occur, so both generate the whole budget); the decode step's share of the bandwidth and
  compute ceilings; the sampling step alone (MLX eager / compiled / numpy);
- the trainer's own step (Trainer.train_step) split into the phases it records (rollout,
  rewards, reference pass, loss + gradients + update), with beta = 0 and beta > 0, its peak
  memory, and the training matmuls' share of the compute ceiling;
- the log-probability pass: peak memory of the chunked pass and of whole (rows, V) logits.

Models: the demo (default), `--model DIR`, or `--random NAME[:key=value,...]`, a random-weight
model of an mlx-lm architecture built in memory (nothing is downloaded).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from grpo_mlx.testing import PRESETS, NoStopTokenizer, build_random_model

HELP = "Measure rollout and training speed, memory and this machine's ceilings (a table; --json for a file)."

DEFAULTS = dict(
    batch_size=8,
    group_size=8,
    max_tokens=128,
    prompt_tokens=24,
    temperature=1.0,
    repeats=5,
    train_repeats=3,
    beta=0.04,
    matmul_size=2048,
    bandwidth_mb=256,
    blas_probe_size=1024,
)
# --quick: a smoke test of every section in seconds (what the tests run); explicit flags still win
QUICK = dict(
    batch_size=2,
    group_size=2,
    max_tokens=8,
    repeats=1,
    train_repeats=1,
    logprob_rows=256,
    matmul_size=256,
    bandwidth_mb=32,
    blas_probe_size=256,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="A local mlx-lm model directory (default: the embedded demo model).")
    parser.add_argument(
        "--random",
        metavar="NAME[:key=value,...]",
        help=f"A random-weight model instead: a preset ({', '.join(PRESETS)}) with optional config "
        "overrides, or an mlx-lm architecture name with its whole config (e.g. llama:hidden_size=64,...).",
    )
    parser.add_argument("-B", "--batch-size", type=int, help="Prompts per rollout (B). [default: 8]")
    parser.add_argument("-G", "--group-size", type=int, help="Completions per prompt (G). [default: 8]")
    parser.add_argument("--max-tokens", type=int, help="Tokens generated per completion. [default: 128]")
    parser.add_argument("--prompt-tokens", type=int, help="Prompt length for models other than the demo. [default: 24]")
    parser.add_argument("--temperature", type=float, help="Sampling temperature. [default: 1.0]")
    parser.add_argument("--repeats", type=int, help="Alternating rollout runs per variant. [default: 5]")
    parser.add_argument("--train-batch-size", type=int, help="B for the train step. [default: --batch-size]")
    parser.add_argument("--train-group-size", type=int, help="G for the train step. [default: --group-size]")
    parser.add_argument("--train-max-tokens", type=int, help="Token budget for the train step. [default: --max-tokens]")
    parser.add_argument("--train-repeats", type=int, help="Alternating train steps per beta. [default: 3]")
    parser.add_argument("--beta", type=float, help="The beta > 0 of the KL comparison. [default: 0.04]")
    parser.add_argument(
        "--logprob-rows",
        type=int,
        help="Rows (N*T) of the log-probability pass measurement. [default: the train step's N*T]",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=["machine", "rollout", "train", "logprobs", "rollout-memory"],
        help="Run only these sections (rollout-memory, not run by default: the quantized KV cache and waves).",
    )
    parser.add_argument("--quick", action="store_true", help="Tiny sizes and one repeat (a smoke test, seconds).")
    parser.add_argument("--json", metavar="PATH", help="Also write every figure to this JSON file.")


def run(args: argparse.Namespace) -> int:
    from grpo_mlx.blas import use_system_blas

    use_system_blas()
    settings = {**DEFAULTS, **(QUICK if args.quick else {})}
    settings.update({k: v for k, v in vars(args).items() if v is not None or k not in settings})
    settings["train_batch_size"] = settings["train_batch_size"] or settings["batch_size"]
    settings["train_group_size"] = settings["train_group_size"] or settings["group_size"]
    settings["train_max_tokens"] = settings["train_max_tokens"] or settings["max_tokens"]
    sections = set(args.only or ["machine", "rollout", "train", "logprobs"])
    report = bench(settings, sections)
    print_report(report)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        print(f"\nwrote {args.json}")
    return 0


# ------------------------------------------------------------------ helpers


def median(values):
    return float(statistics.median(values))


def alternate(variants: dict, repeats: int) -> dict:
    """Run each variant once (warm-up, not counted), then `repeats` rounds A B A B ...;
    returns {name: [result of each counted round]}."""
    for fn in variants.values():
        fn()
    results = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            results[name].append(fn())
    return results


def timer(fn, scale: float = 1.0):
    """A function that runs fn() and returns its wall time in seconds times scale."""

    def once():
        t = time.perf_counter()
        fn()
        return scale * (time.perf_counter() - t)

    return once


def medians(rows: list[dict]) -> dict:
    """Median of each numeric field over a list of result dicts."""
    return {k: median([r[k] for r in rows]) for k in rows[0] if isinstance(rows[0][k], (int, float))}


def model_shape(model) -> dict:
    """Parameter counts and bytes of the transformer blocks and the lm-head, KV bytes per token."""
    from mlx.utils import tree_flatten

    params = tree_flatten(model.parameters())
    blocks = [v for k, v in params if ".layers." in f".{k}"]
    head = getattr(model, "lm_head", None)
    head_params = tree_flatten(head.parameters()) if head is not None else []
    if not head_params:  # tied: the embedding is the head
        head_params = [(k, v) for k, v in params if "embed_tokens" in k]
    args = getattr(model, "args", None)
    kv_per_token = 0
    try:
        heads = args.num_attention_heads
        kv_heads = getattr(args, "num_key_value_heads", None) or heads
        head_dim = getattr(args, "head_dim", None) or args.hidden_size // heads
        kv_per_token = len(model.layers) * 2 * kv_heads * head_dim * 4
    except AttributeError:
        pass
    vocab = head_params[0][1].shape[0] if head_params else 0
    return dict(
        params=sum(v.size for _, v in params),
        block_params=sum(v.size for v in blocks),
        head_params=sum(v.size for _, v in head_params),
        block_bytes=sum(v.nbytes for v in blocks),
        head_bytes=sum(v.nbytes for _, v in head_params),
        kv_bytes_per_token=kv_per_token,
        vocab=vocab,
        layers=len(model.layers),
    )


# ------------------------------------------------------------------ machine


def matmul_gflops(n: int, repeats: int = 5) -> float:
    import mlx.core as mx

    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a, b)
    mx.eval(a @ b)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(a @ b)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / median(times) / 1e9


def matmul_probe_main() -> None:
    """Entry point of the BLAS subprocess: `python -c 'import grpo_mlx.bench as b; b.matmul_probe_main()' N`."""
    from grpo_mlx.blas import blas_name, use_system_blas

    use_system_blas()
    n = int(sys.argv[1])
    print(json.dumps({"gflops": matmul_gflops(n, 3), "blas": blas_name()}))


def blas_probe(n: int, no_blas: bool) -> dict:
    env = dict(os.environ)
    env.pop("GRPO_MLX_NO_BLAS", None)
    if no_blas:
        env["GRPO_MLX_NO_BLAS"] = "1"
    out = subprocess.run(
        [sys.executable, "-c", "import grpo_mlx.bench as b; b.matmul_probe_main()", str(n)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def bandwidth(mb: int) -> dict:
    """GB/s of large reductions and copies, in MLX and numpy; the best is the ceiling used."""
    import mlx.core as mx
    import numpy as np

    n = mb * 2**20 // 4
    x = mx.random.uniform(shape=(n,))
    mx.eval(x)
    a = np.random.default_rng(0).random(n, dtype=np.float32)
    out = np.empty_like(a)
    probes = {
        "mlx_sum": (lambda: mx.eval(x.sum()), 1),
        "mlx_copy": (lambda: mx.eval(x * 1.0), 2),
        "numpy_sum": (lambda: a.sum(), 1),
        "numpy_copy": (lambda: np.copyto(out, a), 2),
    }

    runs = alternate({k: timer(fn) for k, (fn, _) in probes.items()}, 3)
    result = {k: mult * a.nbytes / median(runs[k]) / 1e9 for k, (_, mult) in probes.items()}
    result["ceiling"] = max(result.values())
    return result


def machine(s: dict) -> dict:
    from grpo_mlx.blas import blas_name

    out = {"blas": blas_name(), "matmul_size": s["matmul_size"], "matmul_gflops": matmul_gflops(s["matmul_size"])}
    out["bandwidth_gbs"] = bandwidth(s["bandwidth_mb"])
    n = s["blas_probe_size"]
    runs = alternate(
        {"system": lambda: blas_probe(n, False), "bundled": lambda: blas_probe(n, True)}, 1 if s["quick"] else 2
    )
    out["blas_probe"] = {
        "size": n,
        "system_blas": runs["system"][0]["blas"],
        "system_gflops": median([r["gflops"] for r in runs["system"]]),
        "bundled_gflops": median([r["gflops"] for r in runs["bundled"]]),
    }
    out["blas_probe"]["speedup"] = out["blas_probe"]["system_gflops"] / out["blas_probe"]["bundled_gflops"]
    return out


# ------------------------------------------------------------------ rollouts


def rollout_once(model, prompts, G, T, temperature) -> dict:
    import mlx.core as mx

    from grpo_mlx.sampler import generate_groups

    mx.synchronize()
    mx.reset_peak_memory()
    t = time.perf_counter()
    roll = generate_groups(model, NoStopTokenizer(), prompts, G, T, temperature)
    wall = time.perf_counter() - t
    assert roll.tokens.shape == (len(prompts) * G, T) and roll.lengths.min() == T, "every row runs to the budget"
    return dict(
        prefill_s=roll.prefill_time,
        decode_s=roll.decode_time,
        wall_s=wall,
        prefill_tokens=sum(len(p) - 1 for p in prompts),
        generated=int(roll.lengths.sum()),
        peak_gb=mx.get_peak_memory() / 1e9,
    )


def batch_generator_once(model, prompts, G, T, temperature) -> dict:
    """mlx-lm's BatchGenerator on the same prompts, with the model's own MLP code (as mlx-lm
    runs a model it loaded: without grpo_mlx.cpu_kernels)."""
    from grpo_mlx.cpu_kernels import standard

    with standard(model):
        return _batch_generator_once(model, prompts, G, T, temperature)


def _batch_generator_once(model, prompts, G, T, temperature) -> dict:
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.sample_utils import make_sampler

    n = len(prompts) * G
    gen = BatchGenerator(
        model, max_tokens=T, sampler=make_sampler(temp=temperature), completion_batch_size=n, prefill_batch_size=n
    )
    mx.synchronize()
    mx.reset_peak_memory()
    t = time.perf_counter()
    generated = finished = 0
    with gen.stats() as stats:
        gen.insert([p for p in prompts for _ in range(G)])
        while finished < n:
            for response in gen.next_generated():
                generated += 1
                finished += response.finish_reason is not None
    wall = time.perf_counter() - t
    gen.close()
    assert generated == n * T, "every row runs to the budget"
    return dict(
        prefill_s=stats.prompt_time,
        decode_s=stats.decode_time,
        wall_s=wall,
        prefill_tokens=stats.prompt_tokens,
        generated=generated,
        peak_gb=mx.get_peak_memory() / 1e9,
    )


def sampling_step(n: int, vocab: int, temperature: float, repeats: int) -> dict:
    """Milliseconds for the sampling part of one decode step on (n, vocab) logits."""
    import mlx.core as mx
    from mlx_lm.sample_utils import make_sampler

    from grpo_mlx.sampler import host_pick, make_device_picker

    logits = mx.random.normal((n, vocab)) * 3.0
    mx.eval(logits)
    compiled = make_device_picker(temperature)
    eager = make_device_picker(temperature, compiled=False)
    chain = make_sampler(temp=temperature)

    def mlx_lm_style():  # what BatchGenerator does: normalise, then its sampler
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        tok = chain(logprobs)
        mx.eval(tok, mx.take_along_axis(logprobs, tok[:, None], axis=-1))

    runs = alternate(
        {
            "mlx_lm_style": timer(mlx_lm_style, 1000),
            "mlx_eager": timer(lambda: mx.eval(*eager(logits)), 1000),
            "mlx_compiled": timer(lambda: mx.eval(*compiled(logits)), 1000),
            "numpy_host": timer(lambda: host_pick(logits, temperature), 1000),
        },
        repeats,
    )
    return {k: median(v) for k, v in runs.items()}


def swiglu_step(n: int, width: int, repeats: int) -> dict:
    """Milliseconds of one MLP's SwiGLU on (n, width): mlx-lm's and grpo_mlx.cpu_kernels'."""
    import mlx.core as mx
    from mlx_lm.models.activations import swiglu as mlx_lm_swiglu

    from grpo_mlx.cpu_kernels import swiglu

    gate, up = mx.random.normal((n, width)) * 2.0, mx.random.normal((n, width))
    mx.eval(gate, up)

    runs = alternate(
        {
            "mlx_lm": timer(lambda: mx.eval(mlx_lm_swiglu(gate, up)), 1000),
            "cpu_kernels": timer(lambda: mx.eval(swiglu(gate, up)), 1000),
        },
        repeats,
    )
    return {"rows": n, "width": width, **{k: median(v) for k, v in runs.items()}}


def rollout(model, shape, prompts, s: dict, ceilings: dict) -> dict:
    B, G, T = len(prompts), s["group_size"], s["max_tokens"]
    runs = alternate(
        {
            "grpo_mlx": lambda: rollout_once(model, prompts, G, T, s["temperature"]),
            "batch_generator": lambda: batch_generator_once(model, prompts, G, T, s["temperature"]),
        },
        s["repeats"],
    )
    out = {"B": B, "G": G, "max_tokens": T, "repeats": s["repeats"], "prompt_lengths": [len(p) for p in prompts]}
    cover = B * G * sum(len(p) for p in prompts) / B  # prompt tokens every row needs in its cache
    for name, rows in runs.items():
        m = medians(rows)
        m["prefill_tok_s"] = cover / max(m["prefill_s"], 1e-9)
        m["decode_tok_s"] = m["generated"] / max(m["decode_s"], 1e-9)
        m["runs"] = rows
        out[name] = m
    out["decode_ratio"] = out["grpo_mlx"]["decode_tok_s"] / out["batch_generator"]["decode_tok_s"]
    out["prefill_ratio"] = out["grpo_mlx"]["prefill_tok_s"] / out["batch_generator"]["prefill_tok_s"]
    # the decode step against the ceilings: bandwidth (weights + KV read per step), compute
    n = B * G
    step_s = out["grpo_mlx"]["decode_s"] / T
    context = sum(len(p) for p in prompts) / B + T / 2  # mean attended length
    bytes_per_step = shape["block_bytes"] + shape["head_bytes"] + n * context * shape["kv_bytes_per_token"]
    flops_per_step = 2 * n * (shape["block_params"] + shape["head_params"])
    out["decode_step"] = {
        "ms": 1000 * step_s,
        "bytes": bytes_per_step,
        "gb_s": bytes_per_step / step_s / 1e9,
        "gflops": flops_per_step / step_s / 1e9,
    }
    if ceilings:
        out["decode_step"]["bandwidth_fraction"] = out["decode_step"]["gb_s"] / ceilings["bandwidth_gbs"]["ceiling"]
        out["decode_step"]["compute_fraction"] = out["decode_step"]["gflops"] / ceilings["matmul_gflops"]
    out["sampling_ms"] = sampling_step(n, shape["vocab"], s["temperature"], max(3, s["repeats"]))
    width = getattr(getattr(model, "args", None), "intermediate_size", None)
    if isinstance(width, int):
        out["swiglu_ms"] = swiglu_step(n, width, max(3, s["repeats"]))
    return out


# ------------------------------------------------------------------ train step


def train(model, shape, prompts, answers, tokenizer, s: dict, ceilings: dict) -> dict:
    """Time the trainer's own step (Trainer.train_step), phase by phase from the time/* figures
    it records, with beta = 0 and beta > 0 alternating; each step starts from the same adapters."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from grpo_mlx.config import DEMO_DATA, build_config
    from grpo_mlx.policy import add_adapters
    from grpo_mlx.trainer import Trainer, make_optimizer

    G, T = s["train_group_size"], s["train_max_tokens"]
    options = {
        "model": s.get("model") or None,
        "data": DEMO_DATA,
        "num_layers": -1 if s["is_demo"] else 16,
        "batch_size": len(prompts),
        "group_size": G,
        "max_completion_length": T,
        "temperature": s["temperature"],
        "learning_rate": 1e-5,
        "samples_per_step": 0,
        "reward_functions": ["accuracy" if answers else "length"],
    }
    cfg = build_config(options)
    adapter_config = add_adapters(model, cfg)
    initial = tree_flatten(model.trainable_parameters())
    examples = [
        {"prompt": "", "prompt_text": "", "prompt_ids": p, **({"answer": answers[i]} if answers else {})}
        for i, p in enumerate(prompts)
    ]
    trainers = {
        name: Trainer.from_parts(
            build_config({**options, "beta": beta}), model, tokenizer, examples, adapter_config=adapter_config
        )
        for name, beta in (("beta_0", 0.0), ("beta_pos", s["beta"]))
    }

    def one_step(trainer):
        model.load_weights(initial, strict=False)
        trainer.optimizer = make_optimizer(trainer.cfg)
        trainer.state["data_position"] = 0
        mx.eval(model.parameters())
        mx.synchronize()
        m = trainer.train_step(0)
        times = {phase: m[f"time/{phase}"] for phase in ("rollout", "rewards", "reference", "update")}
        return dict(
            **times,
            step=m["step_time"],
            peak_gb=m["peak_memory_gb"],
            generated=m["num_tokens"],
            mean_length=m["completions/mean_length"],
        )

    runs = alternate({name: (lambda t=t: one_step(t)) for name, t in trainers.items()}, s["train_repeats"])
    out = {"B": len(prompts), "G": G, "max_tokens": T, "beta": s["beta"], "repeats": s["train_repeats"]}
    for name, rows in runs.items():
        out[name] = {**medians(rows), "runs": rows}
    out["peak_ratio"] = out["beta_pos"]["peak_gb"] / out["beta_0"]["peak_gb"]
    # training matmuls: the body over every real position, the head over the completion tokens
    m = out["beta_0"]
    head_tokens = m["generated"]
    body_tokens = G * sum(len(p) for p in prompts) + head_tokens
    pass_flops = 2 * (shape["block_params"] * body_tokens + shape["head_params"] * head_tokens)
    seconds = m["update"]  # loss + gradients + AdamW of the one update
    out["train_matmuls"] = {
        "tokens": body_tokens,
        "gflops_6pt": 3 * pass_flops / seconds / 1e9,  # the usual 6 * params * tokens
        "gflops_lora": 2 * pass_flops / seconds / 1e9,  # LoRA: forward + input gradients only
    }
    if ceilings:
        for k in ("6pt", "lora"):
            out["train_matmuls"][f"fraction_{k}"] = out["train_matmuls"][f"gflops_{k}"] / ceilings["matmul_gflops"]
    return out


# ------------------------------------------------------------------ log-probability pass


def logprob_pass(model, shape, rows: int, temperature: float, quick: bool) -> dict:
    """Peak memory and time of forward + backward of the log-probability pass from hidden states:
    chunked (what training uses) against whole (rows, V) logits."""
    import mlx.core as mx

    from grpo_mlx.logprobs import chunked_token_logprobs, lm_head_split, token_logprobs_from_logits

    split = lm_head_split(model)
    if split is None:
        return {"skipped": "the model's lm-head cannot be split from its body"}
    _, head = split
    V = shape["vocab"]
    hidden = mx.random.normal((1, rows, model.args.hidden_size))  # (1, rows, D)
    targets = mx.random.randint(0, V, (1, rows))
    mx.eval(hidden, targets)

    def measure(chunked: bool):
        def f(h):
            if chunked:
                lp = chunked_token_logprobs(head, h, targets, temperature, V)
            else:
                lp = token_logprobs_from_logits(head(h), targets, temperature)
            return lp.sum()

        step = mx.compile(mx.value_and_grad(f))

        def once():
            mx.synchronize()
            mx.clear_cache()
            base = mx.get_active_memory()
            mx.reset_peak_memory()
            t = time.perf_counter()
            mx.eval(step(hidden))
            return dict(seconds=time.perf_counter() - t, peak_gb=(mx.get_peak_memory() - base) / 1e9)

        return once

    full_gb = rows * V * 4 / 1e9
    out = {
        "rows": rows,
        "vocab": V,
        "full_log_softmax_gb": full_gb,
        "full_log_softmax_gb_at_64x512": 64 * 512 * V * 4 / 1e9,
    }
    variants = {"chunked": measure(True)}
    if (
        3.5 * full_gb < 0.5 * _available_memory() / 1e9
    ):  # whole logits need about 3x their size: skip when they would not fit
        variants["whole"] = measure(False)
    else:
        out["whole"] = {"skipped": f"would need about {3.5 * full_gb:.1f} GB"}
    runs = alternate(variants, 1 if quick else 2)
    for name, r in runs.items():
        out[name] = medians(r)
    out["chunked_over_full_log_softmax"] = out["chunked"]["peak_gb"] / full_gb
    if "peak_gb" in out.get("whole", {}):
        out["chunked_over_whole"] = out["chunked"]["peak_gb"] / out["whole"]["peak_gb"]
    return out


def _available_memory() -> int:
    """Bytes of RAM available, from /proc/meminfo (or the total, from sysconf)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# ------------------------------------------------------------------ the run


def bench(s: dict, sections: set) -> dict:
    import random

    from grpo_mlx.config import DEMO_DATA, DEMO_MODEL
    from grpo_mlx.policy import load_model, on_cpu, prepare_for_cpu

    report: dict = {
        "settings": {k: v for k, v in s.items() if isinstance(v, (str, int, float, bool, list, type(None)))}
    }
    if "machine" in sections:
        report["machine"] = machine(s)
    else:
        from grpo_mlx.blas import blas_name

        report["machine"] = {"blas": blas_name()}
    ceilings = report["machine"] if "matmul_gflops" in report["machine"] else {}

    s["is_demo"] = not (s["model"] or s["random"])
    tokenizer = None
    if s["random"]:
        model, name = build_random_model(s["random"])
    else:
        model, tokenizer = load_model(s["model"] or DEMO_MODEL)
        name = s["model"] or "demo"
    prepare_for_cpu(model)  # as training runs it: float32 and the CPU SwiGLU (mlx-lm's baseline runs without)
    shape = model_shape(model)
    report["model"] = {"name": name, "device": "cpu" if on_cpu() else "gpu", **shape}

    def make_prompts(B):
        if s["is_demo"]:
            from grpo_mlx import data, prompts

            examples = prompts.prepare_examples(data.load_split(DEMO_DATA, "train")[:B], tokenizer)
            return [ex["prompt_ids"] for ex in examples], [ex["answer"] for ex in examples]
        rng = random.Random(0)
        top = min(shape["vocab"], 1000)
        lengths = [max(2, round(s["prompt_tokens"] * (0.75 + 0.5 * b / max(B - 1, 1)))) for b in range(B)]
        return [[rng.randrange(1, top) for _ in range(n)] for n in lengths], None

    if "rollout" in sections:
        prompts, _ = make_prompts(s["batch_size"])
        report["rollout"] = rollout(model, shape, prompts, s, ceilings)
    if "rollout-memory" in sections:  # grpo_mlx.bench_rollouts: --kv-bits and --rollout-batch-size
        from grpo_mlx.bench_rollouts import rollout_memory

        report["rollout_memory"] = rollout_memory(model, shape, make_prompts(s["batch_size"])[0], s)
    if "logprobs" in sections:
        rows = s["logprob_rows"] or s["train_batch_size"] * s["train_group_size"] * s["train_max_tokens"]
        report["logprobs"] = logprob_pass(model, shape, rows, s["temperature"], s["quick"])
    if "train" in sections:
        prompts, answers = make_prompts(s["train_batch_size"])
        train_tokenizer = tokenizer if s["is_demo"] else NoStopTokenizer()
        report["train"] = train(model, shape, prompts, answers, train_tokenizer, s, ceilings)
    return report


# ------------------------------------------------------------------ printing


def print_report(r: dict) -> None:
    m, model = r["machine"], r["model"]
    print(
        f"grpo-mlx bench: {model['name']}  |  {model['params'] / 1e6:.1f}M parameters, vocab {model['vocab']}, "
        f"{model['layers']} layers  |  {model['device']}, float32  |  BLAS: {m['blas']}"
    )
    if "matmul_gflops" in m:
        bw, probe = m["bandwidth_gbs"], m["blas_probe"]
        print("\nmachine")
        print(f"  matmul fp32 {m['matmul_size']}^3              {m['matmul_gflops']:8.1f} GFLOP/s")
        print(
            f"  memory bandwidth                {bw['ceiling']:8.1f} GB/s   (mlx sum {bw['mlx_sum']:.1f}, mlx copy "
            f"{bw['mlx_copy']:.1f}, numpy sum {bw['numpy_sum']:.1f}, numpy copy {bw['numpy_copy']:.1f})"
        )
        print(
            f"  OpenBLAS speed-up (fp32 {probe['size']}^3)  {probe['speedup']:8.1f}x     ({probe['system_gflops']:.1f} "
            f"GFLOP/s with {probe['system_blas']} vs {probe['bundled_gflops']:.1f} with GRPO_MLX_NO_BLAS=1)"
        )
    if "rollout" in r:
        ro = r["rollout"]
        ours, bg = ro["grpo_mlx"], ro["batch_generator"]
        lens = ro["prompt_lengths"]
        print(
            f"\nrollout  B={ro['B']} G={ro['G']}, {ro['max_tokens']} new tokens, "
            f"prompts {min(lens)}-{max(lens)} tokens, medians of {ro['repeats']} alternating runs"
        )
        print(f"  {'':30}{'grpo-mlx':>12}{'BatchGenerator':>16}{'ratio':>8}")
        rows = [
            ("prefill (s)", "prefill_s", ".3f", False),
            ("prefill (prompt tok/s)", "prefill_tok_s", ".0f", True),
            ("decode (s)", "decode_s", ".3f", False),
            ("decode (tok/s)", "decode_tok_s", ".0f", True),
            ("rollout wall (s)", "wall_s", ".3f", False),
            ("peak memory (GB)", "peak_gb", ".3f", False),
        ]
        for label, key, fmt, higher in rows:
            ratio = ours[key] / bg[key] if higher else bg[key] / ours[key]
            print(f"  {label:30}{ours[key]:>12{fmt}}{bg[key]:>16{fmt}}{ratio:>7.2f}x")
        d = ro["decode_step"]
        line = f"  decode step {d['ms']:.1f} ms: {d['bytes'] / 1e6:.0f} MB of weights+KV read -> {d['gb_s']:.1f} GB/s"
        if "bandwidth_fraction" in d:
            line += (
                f" ({d['bandwidth_fraction']:.0%} of bandwidth), {d['gflops']:.1f} GFLOP/s "
                f"({d['compute_fraction']:.0%} of matmul)"
            )
        print(line)
        sm = ro["sampling_ms"]
        print(
            f"  sampling step ({ro['B'] * ro['G']} x {model['vocab']}): mlx-lm style {sm['mlx_lm_style']:.1f} ms, "
            f"ours MLX eager {sm['mlx_eager']:.1f} / compiled {sm['mlx_compiled']:.1f} / "
            f"numpy {sm['numpy_host']:.1f} ms"
        )
        if "swiglu_ms" in ro:
            sw = ro["swiglu_ms"]
            print(
                f"  SwiGLU of one MLP ({sw['rows']} x {sw['width']}, x{model['layers']} layers a step): mlx-lm "
                f"{sw['mlx_lm']:.2f} ms, grpo_mlx.cpu_kernels {sw['cpu_kernels']:.2f} ms"
            )
    if "rollout_memory" in r:
        from grpo_mlx.bench_rollouts import print_rollout_memory

        print_rollout_memory(r["rollout_memory"])
    if "train" in r:
        tr = r["train"]
        a, b = tr["beta_0"], tr["beta_pos"]
        print(
            f"\ntrain step (Trainer.train_step)  B={tr['B']} G={tr['G']}, budget {tr['max_tokens']} "
            f"(mean length {a['mean_length']:.1f}), medians of {tr['repeats']} alternating steps"
        )
        beta = f"beta={tr['beta']}"
        print(f"  {'':30}{'beta=0':>12}{beta:>16}")
        labels = {"update": "loss + gradients + update (s)", "step": "whole step (s)"}
        for key in ("rollout", "rewards", "reference", "update", "step"):
            print(f"  {labels.get(key, key + ' (s)'):30}{a[key]:>12.3f}{b[key]:>16.3f}")
        print(f"  {'peak memory, step (GB)':30}{a['peak_gb']:>12.3f}{b['peak_gb']:>16.3f}{tr['peak_ratio']:>7.2f}x")
        tm = tr["train_matmuls"]
        line = (
            f"  training matmuls: {tm['gflops_6pt']:.1f} GFLOP/s counted as 6*params*tokens, "
            f"{tm['gflops_lora']:.1f} as LoRA's 4*params*tokens"
        )
        if "fraction_6pt" in tm:
            line += f" ({tm['fraction_6pt']:.0%} / {tm['fraction_lora']:.0%} of matmul)"
        print(line)
    if "logprobs" in r:
        lp = r["logprobs"]
        print()
        if "skipped" in lp:
            print(f"log-prob pass: skipped ({lp['skipped']})")
        else:
            print(f"log-prob pass  {lp['rows']} rows x {lp['vocab']} vocab, forward + backward, compiled")
            c = lp["chunked"]
            print(f"  chunked lm-head                 {c['peak_gb']:8.3f} GB peak  {c['seconds']:8.2f} s")
            w = lp["whole"]
            if "peak_gb" in w:
                print(f"  whole (rows, V) logits          {w['peak_gb']:8.3f} GB peak  {w['seconds']:8.2f} s")
            else:
                print(f"  whole (rows, V) logits          skipped: {w['skipped']}")
            print(
                f"  full float32 log-softmax        {lp['full_log_softmax_gb']:8.3f} GB  -> chunked peak is "
                f"{lp['chunked_over_full_log_softmax']:.2f}x of it (at N=64, T=512 it would be "
                f"{lp['full_log_softmax_gb_at_64x512']:.1f} GB)"
            )
