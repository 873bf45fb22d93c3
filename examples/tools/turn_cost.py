"""What a turn boundary costs: B*G episodes with K tool calls against plain single-turn rollouts.

Every model token of the episodes is scripted (a filler, then a calculator call, K times, then
the answer and EOS), so each run does the same work; the plain rollouts decode (a) as many
tokens as the whole episode holds and (b) as many as the model wrote in it. Runs alternate;
medians are printed, with the cost of one boundary (calls, rendering, cache rebuild, prefill).

    python examples/tools/turn_cost.py [--hidden 256 --layers 4 --batch 2 --group 4 --calls 3 --filler 24]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np

import grpo_mlx  # noqa: F401  (the system BLAS before MLX, which is imported in main)
from grpo_mlx.episodes import ResultRenderer, generate_episodes
from grpo_mlx.sampler import generate_groups
from grpo_mlx.testing import build_random_model, build_tool_tokenizer
from grpo_mlx.tools import Toolbox, calculator

CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "1234 * 5678"}}\n</tool_call>'


class NoEos:
    """The tokenizer with no stop token, so a plain rollout runs to its budget."""

    def __init__(self, tok):
        self.tok, self.eos_token_ids = tok, []

    def decode(self, ids, **kw):
        return self.tok.decode(ids, **kw)


def main() -> None:
    import mlx.core as mx

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--filler", type=int, default=24, help="scripted tokens before each call")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    tok = build_tool_tokenizer(tempfile.mkdtemp())
    mx.random.seed(0)
    model, _ = build_random_model(
        f"tiny:vocab_size={len(tok.vocab)},hidden_size={args.hidden},num_hidden_layers={args.layers},"
        f"intermediate_size={4 * args.hidden},num_attention_heads=8,num_key_value_heads=4"
    )
    box = Toolbox({"calculator": calculator})
    renderer = ResultRenderer(tok, box.schemas)
    text = tok.apply_chat_template([{"role": "user", "content": "What is 1234 * 5678?"}], tools=box.schemas,
                                   add_generation_prompt=True, tokenize=False)  # fmt: skip
    prompt = tok.encode(text, add_special_tokens=False)
    filler = tok.encode(" x" * args.filler, add_special_tokens=False)[: args.filler]
    call = tok.encode(CALL, add_special_tokens=False)
    turns = [filler + call] * args.calls + [filler + [sorted(tok.eos_token_ids)[0]]]
    n = args.batch * args.group

    def force(rows, pos):  # every model token scripted; the appended ones are skipped over
        out = np.full(len(rows), -1)
        for b, (r, p) in enumerate(zip(rows, pos)):
            turn, start = state.setdefault(int(r), [0, 0])
            if p - start >= len(turns[turn]):
                state[int(r)] = [turn + 1, p]
                turn, start = turn + 1, p
            out[b] = turns[turn][p - start]
        return out

    prompts = [prompt] * args.batch
    budget = 4096
    times = {"episodes": [], "plain, episode length": [], "plain, model tokens": []}
    boundary = []
    for _ in range(args.repeats):
        state = {}
        t0 = time.perf_counter()
        roll, stats = generate_episodes(model, tok, prompts, args.group, budget, box, renderer, max_turns=args.calls,
                                        force=force)  # fmt: skip
        times["episodes"].append(time.perf_counter() - t0)
        boundary.append(stats.boundary_time / max(stats.boundaries, 1))
        total, own = int(roll.lengths[0]), int(roll.mask[0].sum())
        for name, length in (("plain, episode length", total), ("plain, model tokens", own)):
            t0 = time.perf_counter()
            generate_groups(model, NoEos(tok), prompts, args.group, length)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model: hidden {args.hidden}, {args.layers} layers; {n} episodes of {total} tokens ({own} the "
          f"model's, {total - own} appended by {args.calls} calls); device {mx.default_device()}")  # fmt: skip
    for k, v in med.items():
        print(f"  {k:24s} {v * 1000:8.1f} ms (median of {args.repeats})")
    print(f"  episodes / plain of the episode's length: {med['episodes'] / med['plain, episode length']:.2f}")
    print(f"  episodes / plain of the model's tokens:   {med['episodes'] / med['plain, model tokens']:.2f}")
    extra = (med["episodes"] - med["plain, model tokens"]) / args.calls
    print(f"  one turn boundary: {extra * 1000:.1f} ms over the plain rollout "
          f"({statistics.median(boundary) * 1000:.1f} ms in calls, rendering, cache rebuild and prefill)")  # fmt: skip


if __name__ == "__main__":
    main()
