"""`grpo-mlx bench --only rollout-memory`: what a quantized KV cache and rollout waves save.

The variants decode the same B x G rows (per-prompt seeds, no stop token, so every row runs to
its budget), alternated A B C ... as the other sections are: a full-precision cache, kv_bits 8
and 4, and waves of N/2 and N/4 rows. For each: peak memory (mx.get_peak_memory, and the part
above what was allocated before the rollout: the cache and the decode's activations), decode
tokens/s, and the mean / max |sampler - teacher-forced| log-prob per token, which is what the
trainer logs as sampling/sampling_logp_difference (its training pass uses no cache).
"""

from __future__ import annotations

import time


def variants(n: int, head_dim: int) -> dict:
    """name -> generate_groups options."""
    group = 64 if head_dim % 64 == 0 else 32
    out = {
        "full precision": {},
        "kv_bits 8": dict(kv_bits=8, kv_group_size=group),
        "kv_bits 4": dict(kv_bits=4, kv_group_size=group),
    }
    for parts in (2, 4):
        if n // parts >= 1 and n % parts == 0:
            out[f"waves of {n // parts}"] = dict(rollout_batch_size=n // parts)
    return out


def _once(model, prompts, G, T, temperature, options, keep: dict, name: str) -> dict:
    import mlx.core as mx

    from grpo_mlx.sampler import generate_groups
    from grpo_mlx.testing import NoStopTokenizer

    mx.synchronize()
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    t = time.perf_counter()
    roll = generate_groups(model, NoStopTokenizer(), prompts, G, T, temperature, seeds=list(range(len(prompts))),
                           **options)  # fmt: skip
    wall = time.perf_counter() - t
    peak = mx.get_peak_memory()
    keep[name] = roll
    generated = int(roll.lengths.sum())
    return dict(
        peak_gb=peak / 1e9,
        rollout_gb=(peak - before) / 1e9,
        decode_s=roll.decode_time,
        decode_tok_s=generated / max(roll.decode_time, 1e-9),
        wall_s=wall,
        generated=generated,
    )


def logp_gap(model, prompts, roll, G: int, temperature: float) -> dict:
    """Mean and max |sampler - teacher-forced| log-prob over the completion tokens."""
    import numpy as np

    from grpo_mlx.batch import training_arrays
    from grpo_mlx.logprobs import completion_logprobs

    tokens, prompt_lens, mask = training_arrays(prompts, roll, G, pad_id=0)
    lp = np.array(completion_logprobs(model, tokens, prompt_lens, mask.shape[1], temperature))  # (N, T')
    d = np.abs(lp[:, : roll.tokens.shape[1]] - roll.logprobs)[roll.mask]  # (tokens,)
    return dict(logp_diff_mean=float(d.mean()), logp_diff_max=float(d.max()))


def rollout_memory(model, shape: dict, prompts, s: dict) -> dict:
    from grpo_mlx.bench import alternate, medians

    B, G, T = len(prompts), s["group_size"], s["max_tokens"]
    n = B * G
    args = model.args
    options = variants(n, getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads)
    kept: dict = {}
    runs = alternate(
        {
            name: (lambda name=name, kw=kw: _once(model, prompts, G, T, s["temperature"], kw, kept, name))
            for name, kw in options.items()
        },
        s["repeats"],
    )
    out = {"B": B, "G": G, "max_tokens": T, "repeats": s["repeats"], "variants": {}}
    tokens = n * (sum(len(p) for p in prompts) / B + T)
    out["kv_gb_full_precision"] = tokens * shape["kv_bytes_per_token"] / 1e9  # every row's whole context
    for name, rows in runs.items():
        m = medians(rows)
        m.update(logp_gap(model, prompts, kept[name], G, s["temperature"]))
        m["options"] = options[name]
        out["variants"][name] = m
    return out


def print_rollout_memory(r: dict) -> None:
    print(
        f"\nrollout memory  B={r['B']} G={r['G']}, {r['max_tokens']} new tokens (full-precision KV of all rows: "
        f"{r['kv_gb_full_precision']:.3f} GB), medians of {r['repeats']} alternating runs"
    )
    print(f"  {'':18}{'peak GB':>9}{'rollout GB':>12}{'decode tok/s':>14}{'logp diff mean':>16}{'max':>9}")
    for name, v in r["variants"].items():
        print(
            f"  {name:18}{v['peak_gb']:>9.3f}{v['rollout_gb']:>12.3f}{v['decode_tok_s']:>14.0f}"
            f"{v['logp_diff_mean']:>16.2e}{v['logp_diff_max']:>9.2e}"
        )
