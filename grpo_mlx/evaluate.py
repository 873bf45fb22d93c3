"""`grpo-mlx eval`: pass@k, maj@k, format compliance and length, base model vs base + adapters.

Choices, stated once:
- Each prompt gets n = max(k) completions from the group sampler (one prefill per prompt, all
  rows decoded together). pass@k uses all n of them through the unbiased estimator of Chen et al.
  (2021), 1 - C(n-c, k) / C(n, k), so pass@1 is the fraction of right samples (c / n).
- maj@k votes over the extracted answers (rewards.extract_answer) of the first k samples.
  Answers that `answers_match` calls equal vote together ("1,000" and "1000"). A completion
  with no answer does not vote. A tie goes to the answer that appeared first among the tied
  ones; no votes at all counts as wrong.
- Greedy decoding (--temperature 0) gives one answer per prompt, so only k = 1 is reported;
  it is deterministic: two runs give identical numbers.
- The base model is the same loaded model with its adapters switched off
  (policy.adapters_disabled), sampled with the same seed, so nothing but the adapters differs.
- On the CPU the model computes in float32, as in training (policy.add_adapters).
- A run trained with tools or an environment is evaluated on the same episodes (the run's
  tools, environment and max_turns, from its config.json; grpo_mlx.episodes): pass@k and maj@k
  read the answer of each episode's last assistant turn (an episode cut while calling has none),
  rewards get the whole episode and, as in training, the episodes' `environments=`.
- Settings left unset come from the adapters' run directory (its config.json: data, maximum
  completion length, system prompt, stop strings) and adapter_config.json (the base model),
  so `grpo-mlx eval --adapter-path RUN_DIR` scores what the run trained for.

The statistics at the top are pure Python (tested against hand-computed numbers); MLX is imported
only inside the functions that sample.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from grpo_mlx import metric_names as M
from grpo_mlx import rewards

HELP = "Evaluate a model (and its adapters): pass@k, maj@k, format compliance, mean length."

DEFAULT_KS = (1, 4, 16)
DEFAULT_SAMPLING_TEMPERATURE = 0.7  # for k > 1: varied samples that are still mostly sensible


# ------------------------------------------------------------------ statistics (no MLX)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are right: 1 - C(n-c, k) / C(n, k), computed as
    1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the huge binomials."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset holds a right sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_answer(answers: list) -> str | None:
    """The most common answer (None entries do not vote); a tie goes to the earliest one."""
    votes: list[list] = []  # [answer, count] in order of first appearance
    for answer in answers:
        if answer is None:
            continue
        for vote in votes:
            if rewards.answers_match(answer, vote[0]):
                vote[1] += 1
                break
        else:
            votes.append([answer, 1])
    if not votes:
        return None
    most = max(count for _, count in votes)
    return next(answer for answer, count in votes if count == most)


def score_samples(texts: list[list[str]], lengths: list[list[int]], references: list, ks) -> dict:
    """Metrics of n completions per prompt: texts[p][i], lengths[p][i] (tokens), references[p]."""
    n = len(texts[0]) if texts else 0
    ks = sorted(set(ks))
    if any(len(row) != n for row in texts) or (ks and ks[-1] > n):
        raise ValueError(f"every prompt needs max(k) = {ks[-1] if ks else 0} samples")
    answers = [[rewards.extract_answer(t) for t in row] for row in texts]  # (P, n)
    right = [[rewards.answers_match(a, ref) for a in row] for row, ref in zip(answers, references)]
    flat = [t for row in texts for t in row]
    formatted = rewards.format_reward()(prompts=[None] * len(flat), completions=flat)
    out: dict = {}
    for k in ks:
        out[f"pass@{k}"] = _mean([pass_at_k(n, sum(r), k) for r in right])
    for k in ks:
        if k > 1:
            out[f"maj@{k}"] = _mean(
                [rewards.answers_match(majority_answer(row[:k]), ref) for row, ref in zip(answers, references)]
            )
    out["format"] = _mean([v == 1.0 for v in formatted])
    out["mean_length"] = _mean([x for row in lengths for x in row])
    out["answered"] = _mean([a is not None for row in answers for a in row])
    return out


def has_answer(reference) -> bool:
    return reference is not None and str(reference).strip() != "" and reference == reference  # NaN: empty cell


def _mean(values) -> float:
    values = list(values)
    return float(sum(values)) / len(values) if values else float("nan")


# ------------------------------------------------------------------ sampling (MLX)


def rollouts(
    model,
    tokenizer,
    examples: list[dict],
    n: int,
    max_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    stop=(),
    batch_size: int = 16,
    top_k: int = 0,
    min_p: float = 0.0,
    progress=None,
    agent=None,
    sampler_options=None,
):
    """(chunk of examples, Rollout of n completions each), batch_size prepared examples a call;
    `progress(done, total)` after each chunk (a real model's pass over 200 prompts takes minutes).
    With `agent` (grpo_mlx.episodes.Agent) the completions are its multi-turn episodes.
    `sampler_options`: generate_groups' kv_bits, kv_group_size, rollout_batch_size."""
    from grpo_mlx.sampler import generate_groups

    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        yield (
            chunk,
            agent.episodes(model, tokenizer, chunk, n, max_tokens, temperature, top_p, top_k, min_p)
            if agent is not None
            else generate_groups(
                model,
                tokenizer,
                [ex["prompt_ids"] for ex in chunk],
                n,
                max_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                min_p=min_p,
                stop=list(stop),
                **(sampler_options or {}),
            ),
        )
        if progress is not None:
            progress(start + len(chunk), len(examples))


def sample_completions(
    model,
    tokenizer,
    examples: list[dict],
    n: int,
    max_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    stop=(),
    batch_size: int = 16,
    seed: int = 0,
) -> tuple[list[list[str]], list[list[int]]]:
    """n completions of each prepared example (with `prompt_ids`), batch_size prompts a call."""
    import mlx.core as mx

    mx.random.seed(seed)
    texts, lengths = [], []
    for chunk, roll in rollouts(model, tokenizer, examples, n, max_tokens, temperature, top_p, stop, batch_size):
        for p in range(len(chunk)):
            texts.append(roll.texts[p * n : (p + 1) * n])
            lengths.append([int(x) for x in roll.lengths[p * n : (p + 1) * n]])
    return texts, lengths


def final_texts(roll) -> list[str]:
    """The text each completion's answer is read from: an episode's last assistant turn (empty
    when it ended on a call it could not make), a single-turn completion's whole text."""
    if roll.turns is None:
        return list(roll.texts)
    out = []
    for text, turns in zip(roll.texts, roll.turns):
        if turns is None:
            out.append(text)
        else:
            out.append(turns[-1]["text"] if turns and turns[-1]["role"] == "assistant" else "")
    return out


def progress_text(done: int, total: int) -> str:
    return f"held-out evaluation: {done}/{total} prompts" + (" (greedy)" if done == 0 else "")


def held_out(
    model,
    tokenizer,
    examples: list[dict],
    max_tokens: int,
    stop=(),
    score=None,
    batch_size: int = 64,
    progress=None,
    agent=None,
    sampler_options=None,
) -> dict:
    """The held-out figures a training run reports, from one greedy completion per prompt:
    `accuracy` (pass@1 over the prompts that have an answer), `format`, `mean_length` and, with
    `score(chunk, rollout) -> RewardResult`, `mean_reward` (process rewards at their mean).
    `progress(done, total)` is called at the start (0) and after each batch of prompts. With
    `agent` the completions are greedy episodes (its tools), answers read from their last turn,
    and `tool_use` is the share of episodes that call a tool. `sampler_options` as the run's
    rollouts (quantized KV cache, waves)."""
    if not examples:
        return {}
    training = model.training
    model.eval()
    if progress is not None:
        progress(0, len(examples))
    texts, lengths, references, totals, called = [], [], [], [], []
    chunks = rollouts(
        model, tokenizer, examples, 1, max_tokens, 0.0, stop=stop, batch_size=batch_size, progress=progress,
        agent=agent, sampler_options=sampler_options,
    )  # fmt: skip
    for chunk, roll in chunks:
        answers = final_texts(roll)
        for i, ex in enumerate(chunk):
            if has_answer(ex.get("answer")):
                texts.append([answers[i]])
                lengths.append([int(roll.lengths[i])])
                references.append(ex["answer"])
        called += [any(t["role"] == "tool_call" for t in turns or ()) for turns in roll.turns or ()]
        if score is not None:
            totals.extend(score(chunk, roll).shown.tolist())
        if agent is not None:  # score released them already; without a score, here
            agent.release(roll)
    model.train(training)
    out: dict = {"n": len(examples)}
    if score is not None:
        out["mean_reward"] = _mean(totals)
    if agent is not None:
        out["tool_use"] = _mean(called)
    if texts:
        scored = score_samples(texts, lengths, references, [1])
        out.update(accuracy=scored["pass@1"], format=scored["format"], mean_length=scored["mean_length"])
    return out


def evaluate(
    model,
    tokenizer,
    examples: list[dict],
    ks=DEFAULT_KS,
    temperature: float = 0.0,
    max_tokens: int = 256,
    top_p: float = 1.0,
    stop=(),
    batch_size: int = 16,
    seed: int = 0,
    top_k: int = 0,
    min_p: float = 0.0,
    reward_fns=(),
    samples: list | None = None,
    progress=None,
    agent=None,
) -> dict:
    """Metrics of `model` on prepared examples; with temperature 0 only k = 1 (greedy). With
    `reward_fns` ((name, function) pairs, loaded as train loads them) also each one's mean,
    `rewards/<name>/mean`; `samples` (a list) receives one row per completion (sample_rows).
    With `agent` the completions are its episodes (see the module's notes)."""
    import mlx.core as mx

    ks = [1] if temperature == 0 else sorted(set(ks))
    n = max(ks)
    model.eval()
    mx.random.seed(seed)
    texts, lengths, rows, scored = [], [], [], []
    chunks = rollouts(model, tokenizer, examples, n, max_tokens, temperature, top_p, stop, batch_size, top_k, min_p,
                      progress, agent)  # fmt: skip
    for chunk, roll in chunks:
        try:
            columns = agent.reward_columns(roll) if agent is not None else None  # environments=, as in training
            result = (
                rewards.score_examples(list(reward_fns), chunk, roll.texts, roll.completion_ids, row_columns=columns)
                if reward_fns
                else None
            )
        finally:
            if agent is not None:
                agent.release(roll)
        answers = final_texts(roll)
        for p, ex in enumerate(chunk):
            texts.append(answers[p * n : (p + 1) * n])
            lengths.append([int(x) for x in roll.lengths[p * n : (p + 1) * n]])
            for i in range(p * n, (p + 1) * n):
                values = {k: v[i] for k, v in result.per_function.items()} if result else {}
                turns = roll.turns[i] if roll.turns is not None else None
                rows.append((ex, roll.texts[i], int(roll.lengths[i]), roll.finish_reasons[i], values, turns,
                             answers[i]))  # fmt: skip
        scored.append(result)
    metrics = score_samples(texts, lengths, [ex.get("answer") for ex in examples], ks)
    for name in scored[0].per_function if scored and scored[0] else ():
        values = [v for r in scored for v in r.per_function[name].tolist() if v == v]  # None (NaN) does not count
        metrics[M.reward_mean(name)] = _mean(values)
    if samples is not None:
        samples.extend(sample_rows(rows, n))
    return metrics


def sample_rows(rows: list[tuple], n: int) -> list[dict]:
    """What `--json` shows of each completion: its prompt, text, extracted answer and verdict."""
    out = []
    for j, (ex, text, length, finish, values, turns, final) in enumerate(rows):
        answer = rewards.extract_answer(final)
        out.append(
            {
                "prompt_index": j // n,
                "prompt": ex.get("prompt"),
                "reference": ex.get("answer"),
                "completion": text,
                "extracted_answer": answer,
                "correct": rewards.answers_match(answer, ex.get("answer")),
                "length": length,
                "finish_reason": finish,
                **({"rewards": {k: None if v != v else float(v) for k, v in values.items()}} if values else {}),
                **({"turns": turns} if turns is not None else {}),
            }
        )
    return out


def compare(model, tokenizer, examples: list[dict], with_adapters: bool, samples=None, progress=None, **options):
    """{"base": metrics, "adapters": metrics} (the base is the same model with its adapters
    switched off), or {"model": metrics} for a model without adapters. `samples` (a dict)
    receives each model's sample rows; `progress(name, done, total)` follows the sampling."""
    from grpo_mlx.policy import adapters_disabled

    def one(name: str) -> dict:
        rows = None if samples is None else samples.setdefault(name, [])
        track = None if progress is None else (lambda done, total: progress(name, done, total))
        return evaluate(model, tokenizer, examples, samples=rows, progress=track, **options)

    if not with_adapters:
        return {"model": one("model")}
    with adapters_disabled(model):  # graphs are built and evaluated inside the block
        base = one("base")
    return {"base": base, "adapters": one("adapters")}


def load_for_eval(model_path: str, adapter_path: str | None):
    """The model (float32 on the CPU, as in training) with its adapters loaded, in eval mode."""
    from grpo_mlx.policy import ModelLoadError, load_model, prepare_for_cpu

    model, tokenizer = load_model(model_path)
    prepare_for_cpu(model)  # as in training: float32 and the CPU SwiGLU
    if adapter_path:
        from mlx_lm.tuner.utils import load_adapters

        try:
            load_adapters(model, adapter_path)
        except ValueError as e:  # adapters made for another model: names or shapes differ
            raise ModelLoadError(f"the adapters in {adapter_path} do not fit '{model_path}': {e}") from None
    model.eval()
    return model, tokenizer


# ------------------------------------------------------------------ report


def format_table(results: dict) -> str:
    """Metrics as rows, models as columns, and the change when there are two."""
    names = list(results)
    metrics = list(next(iter(results.values())))
    header = ["metric"] + names + (["change"] if len(names) == 2 else [])
    rows = [header]
    for m in metrics:
        values = [results[name][m] for name in names]
        is_length, is_reward = m == "mean_length", M.reward_function_of(m) is not None
        show = (lambda v: f"{v:.1f}") if is_length else (lambda v: f"{v:.3f}") if is_reward else (lambda v: f"{v:.1%}")
        row = [m.replace("mean_length", "mean length (tokens)")] + [show(v) for v in values]
        if len(names) == 2:
            delta = values[1] - values[0]
            row.append(f"{delta:+.1f}" if is_length else f"{delta:+.3f}" if is_reward else f"{100 * delta:+.1f} pts")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
        for r in rows
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------ command line


def parse_ks(text: str) -> list[int]:
    try:
        ks = sorted({int(part) for part in str(text).split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,4,16, got {text!r}") from None
    if not ks or ks[0] < 1:
        raise argparse.ArgumentTypeError(f"every k must be at least 1, got {text!r}")
    return ks


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        help="Model directory or Hugging Face repo id. Default: the adapters' "
        "base model (adapter_config.json), else the embedded demo model.",
    )
    parser.add_argument(
        "--adapter-path",
        help="Adapters to evaluate beside the base model (a run directory "
        "or a checkpoint in it). Without it only the model itself is scored.",
    )
    parser.add_argument(
        "--data",
        help="Directory with <split>.jsonl, or a Hugging Face dataset id. Default: the run's data, else the demo task.",
    )
    parser.add_argument("--split", default="test", help="Split to score. [default: test]")
    parser.add_argument(
        "-k",
        "--k",
        type=parse_ks,
        default=list(DEFAULT_KS),
        metavar="K,K,...",
        help="pass@k and maj@k for these k; max(k) samples are drawn per prompt. [default: 1,4,16]",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=None,
        metavar="X",
        help=f"Sampling temperature; 0 is greedy (k = 1 only). Default: {DEFAULT_SAMPLING_TEMPERATURE} "
        "when max(k) > 1, else 0.",
    )
    parser.add_argument("--top-p", type=float, default=1.0, metavar="X", help="Nucleus sampling (1 = off).")
    parser.add_argument(
        "--top-k",
        type=int,
        default=None,
        metavar="N",
        help="Sample among the k most likely tokens (0 = off). Default: the run's.",
    )
    parser.add_argument(
        "--min-p",
        type=float,
        default=None,
        metavar="X",
        help="Drop tokens below min-p x the top one's probability (0 = off). Default: the run's.",
    )
    parser.add_argument(
        "--reward-functions",
        nargs="+",
        default=None,
        metavar="SPEC",
        help="Also report the mean of these rewards (built-in names, file.py:function or module:function, "
        "loaded as train loads them). Default: none.",
    )
    parser.add_argument(
        "--max-completion-length",
        type=int,
        default=None,
        metavar="N",
        help="Tokens per completion. Default: the run's, else 8 for the demo and 256 otherwise.",
    )
    parser.add_synonym("--max-tokens", "--max-completion-length")  # mlx-lm's generate spells it so
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="Score only the first N prompts.")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="Random seed for sampling. [default: 0]")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=16,
        metavar="N",
        help="Prompts sampled together (each with max(k) completions). [default: 16]",
    )
    parser.add_argument("--system-prompt", default=None, help="System prompt. Default: the run's.")
    parser.add_argument(
        "--stop",
        nargs="+",
        default=None,
        metavar="TEXT",
        help="Stop strings (\\n, \\t, \\r, \\\\ escapes). Default: the run's.",
    )
    parser.add_argument("--prompt-key", default=None, help="Prompt column. Default: the run's, else prompt.")
    parser.add_argument("--answer-key", default=None, help="Answer column. Default: the run's, else answer.")
    add_prompt_arguments(parser)
    parser.add_argument(
        "--json",
        metavar="PATH",
        help="Also write the results, with every sample (prompt, completion, extracted answer, verdict), "
        "as JSON to PATH (- for stdout, instead of the table).",
    )
    parser.add_argument("--debug", action="store_true", help="Show Python tracebacks on errors.")


def add_prompt_arguments(parser: argparse.ArgumentParser) -> None:
    """Rendering and data options as train has them, each defaulting to the run's."""
    parser.add_argument("--data-config", default=None, help="Config of a multi-config dataset. Default: the run's.")
    parser.add_argument(
        "--chat-template-kwargs", default=None, metavar="JSON", help="Chat template arguments. Default: the run's."
    )
    parser.add_argument(
        "--ignore-chat-template", action=argparse.BooleanOptionalAction, default=None,
        help="Use string prompts as they are. Default: the run's.",
    )  # fmt: skip


def prompt_settings(args: argparse.Namespace, saved: dict) -> dict:
    from grpo_mlx.config import coerce

    def pick(name):
        given = getattr(args, name, None)
        return coerce(name, given, "eval") if given is not None else saved.get(name)

    return {name: pick(name) for name in ("data_config", "chat_template_kwargs", "ignore_chat_template")}


def run_config(adapter_path: str | None) -> dict:
    """The grpo-mlx config.json of the run the adapters come from ({} if there is none)."""
    if not adapter_path:
        return {}
    folder = Path(adapter_path).expanduser()
    candidates = [folder / "config.json"]
    if folder.parent.name == "checkpoints":  # RUN_DIR/checkpoints/step_N
        candidates.append(folder.parent.parent / "config.json")
    for path in candidates:
        try:
            found = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(found, dict) and "max_completion_length" in found:  # not a model's config.json
            return found
    return {}


def adapter_base_model(adapter_path: str | None) -> str | None:
    if not adapter_path:
        return None
    path = Path(adapter_path).expanduser() / "adapter_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"--adapter-path {adapter_path}: no adapter_config.json there")
    return json.loads(path.read_text(encoding="utf-8")).get("model")


def resolve_settings(args: argparse.Namespace) -> dict:
    from grpo_mlx.config import DEMO_DATA, DEMO_DEFAULTS, DEMO_MODEL, ConfigError, unescape

    saved = run_config(args.adapter_path)
    model = args.model or adapter_base_model(args.adapter_path) or DEMO_MODEL
    demo = os.path.abspath(model) == os.path.abspath(DEMO_MODEL)
    data = args.data or saved.get("data") or (DEMO_DATA if demo else None)
    if data is None:
        raise ConfigError(
            "--data is required for a model other than the demo (a directory with "
            f"{args.split}.jsonl, or a Hugging Face dataset id)"
        )
    length = (
        args.max_completion_length
        or saved.get("max_completion_length")
        or (DEMO_DEFAULTS["max_completion_length"] if demo else 256)
    )
    temperature = args.temperature
    if temperature is None:
        temperature = DEFAULT_SAMPLING_TEMPERATURE if max(args.k) > 1 else 0.0
    if not math.isfinite(temperature) or temperature < 0:
        raise ConfigError(f"--temperature {temperature}: must be a finite number >= 0 (0 is greedy)")
    if not (math.isfinite(args.top_p) and 0 < args.top_p <= 1):
        raise ConfigError(f"--top-p {args.top_p}: must be in (0, 1]")
    top_k = args.top_k if args.top_k is not None else int(saved.get("top_k") or 0)
    min_p = args.min_p if args.min_p is not None else float(saved.get("min_p") or 0.0)
    if top_k < 0 or not (math.isfinite(min_p) and 0 <= min_p < 1):
        raise ConfigError(f"--top-k {top_k} and --min-p {min_p}: need top-k >= 0 and min-p in [0, 1)")
    if args.batch_size < 1 or length < 1:
        raise ConfigError(
            f"--batch-size {args.batch_size} and --max-completion-length {length}: both must be at least 1"
        )
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit {args.limit}: must be at least 1 (leave it out to score every prompt)")
    if not 0 <= args.seed < 2**32:
        raise ConfigError(f"--seed {args.seed}: must be in [0, 2**32)")
    check_output_path(args.json)
    return dict(
        model=model,
        adapter_path=args.adapter_path,
        data=data,
        split=args.split,
        k=[1] if temperature == 0 else args.k,
        temperature=temperature,
        top_p=args.top_p,
        top_k=top_k,
        min_p=min_p,
        max_completion_length=int(length),
        limit=args.limit,
        seed=args.seed,
        batch_size=args.batch_size,
        system_prompt=args.system_prompt if args.system_prompt is not None else saved.get("system_prompt"),
        stop=[unescape(s) for s in args.stop] if args.stop is not None else saved.get("stop") or [],
        reward_functions=args.reward_functions or [],
        prompt_key=args.prompt_key or saved.get("prompt_key") or "prompt",
        answer_key=args.answer_key or saved.get("answer_key") or "answer",
        **prompt_settings(args, saved),
        **episode_settings(saved),
    )


def episode_settings(saved: dict) -> dict:
    """The run's tools and environment (its config.json): eval samples the same episodes."""
    return dict(
        tools=list(saved.get("tools") or []),
        environment=saved.get("environment"),
        tool_timeout=float(saved.get("tool_timeout", 30.0)),
        max_turns=int(saved.get("max_turns", 4)),
    )


def run_agent(settings: dict, tokenizer):
    """The episodes' Agent of a run that had tools or an environment, else None."""
    if not settings.get("tools") and not settings.get("environment"):
        return None
    from grpo_mlx.config import TrainConfig
    from grpo_mlx.episodes import Agent

    keys = ("tools", "environment", "tool_timeout", "max_turns", "system_prompt", "chat_template_kwargs")
    cfg = TrainConfig(**{k: settings[k] for k in keys}, ignore_chat_template=bool(settings["ignore_chat_template"]))
    return Agent.from_config(cfg, tokenizer)


def check_output_path(path: str | None) -> None:
    """Refuse an unwritable --json path now, not after a whole evaluation."""
    if not path or path == "-":
        return
    from grpo_mlx.config import ConfigError

    target = Path(path).expanduser()
    if target.is_dir():
        raise ConfigError(f"--json {path}: is a directory; name a file")
    existed = target.exists()
    try:
        with open(target, "a", encoding="utf-8"):
            pass
    except OSError as e:
        raise ConfigError(f"--json {path}: cannot write there ({e.strerror or e}); choose another path") from None
    if not existed:
        target.unlink(missing_ok=True)


def available_memory() -> int:
    """Bytes of memory available now (MemAvailable on Linux), else the machine's total."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def bytes_per_sample(model_args, tokens: int) -> int:
    """Memory one sampled row holds while decoding: float32 key/value cache over `tokens`
    positions in every layer, plus a float32 row of logits (twice: logits and probabilities)."""
    get = lambda name, default=0: getattr(model_args, name, None) or default  # noqa: E731
    layers = get("num_hidden_layers", 1)
    heads = get("num_attention_heads", 1)
    kv_heads = get("num_key_value_heads", heads)
    head_dim = get("head_dim", get("hidden_size", 0) // max(heads, 1))
    return 4 * (2 * layers * kv_heads * head_dim * tokens + 2 * get("vocab_size", 0))


def plan_batch(n: int, batch_size: int, per_sample: int, available: int, k_text: str) -> int:
    """Prompts to sample together so that batch x n rows fit in half the available memory; refuse
    when even one prompt's n samples do not fit (a -k far beyond what memory allows)."""
    budget = available // 2
    if n * per_sample > budget:
        raise_k = f"-k {k_text}: {n} samples of one prompt need about {n * per_sample / 1e9:.1f} GB while decoding, "
        from grpo_mlx.config import ConfigError

        raise ConfigError(
            raise_k + f"more than half of the {available / 1e9:.1f} GB available; lower -k (or --max-completion-length)"
        )
    return max(1, min(batch_size, budget // max(n * per_sample, 1)))


def run(args: argparse.Namespace) -> int:
    settings = resolve_settings(args)
    # the same loader as train, before anything loads: a typo costs no model load
    reward_fns = [rewards.resolve_reward(s, max_completion_length=settings["max_completion_length"])
                  for s in settings["reward_functions"]]  # fmt: skip
    from grpo_mlx.blas import use_system_blas

    use_system_blas()
    from grpo_mlx import data, prompts

    examples = data.load_split(
        settings["data"], settings["split"], prompt_key=settings["prompt_key"], answer_key=settings["answer_key"],
        config=settings["data_config"],
    )  # fmt: skip
    scored = [ex for ex in examples if has_answer(ex.get("answer"))]
    skipped = len(examples) - len(scored)
    if not scored:
        raise data.DataError(
            f"{settings['data']} ({settings['split']}): no example has an answer "
            f"(column {settings['answer_key']!r}); eval scores answers"
        )
    if settings["limit"]:
        scored = scored[: settings["limit"]]
    rewards.check_columns(reward_fns, scored, f"{settings['data']} ({settings['split']})")
    model, tokenizer = load_for_eval(settings["model"], settings["adapter_path"])
    agent = run_agent(settings, tokenizer)
    prepared = prompts.prepare_examples(
        scored, tokenizer, settings["system_prompt"], chat_template_kwargs=settings["chat_template_kwargs"],
        ignore_chat_template=bool(settings["ignore_chat_template"]), tools=agent.schemas if agent else None,
    )  # fmt: skip
    for note in prompts.notes(scored, tokenizer, bool(settings["ignore_chat_template"]), settings["model"]):
        print(f"  note: {note}", file=sys.stderr)
    n = max(settings["k"])
    longest = max(len(ex["prompt_ids"]) for ex in prepared) + settings["max_completion_length"]
    batch = plan_batch(
        n,
        settings["batch_size"],
        bytes_per_sample(getattr(model, "args", None), longest),
        available_memory(),
        ",".join(map(str, settings["k"])),
    )
    if batch < settings["batch_size"]:
        print(
            f"  sampling {batch} prompt{'s' if batch > 1 else ''} at a time (not --batch-size "
            f"{settings['batch_size']}) so that {n} samples each fit in memory",
            file=sys.stderr,
        )
        settings["batch_size"] = batch
    decoding = "greedy" if settings["temperature"] == 0 else f"temperature {settings['temperature']}"
    if agent is not None:
        decoding += f", episodes with tools (at most {settings['max_turns']} turns with calls)"
    note = "" if settings["temperature"] or args.k == [1] else " (greedy gives one answer per prompt: k = 1 only)"
    print(
        f"grpo-mlx eval: {len(prepared)} prompts ({settings['split']} of {settings['data']}), "
        f"{n} sample{'s' if n > 1 else ''} each, {decoding}, seed {settings['seed']}{note}",
        file=sys.stderr,
    )
    if skipped:
        print(f"  {skipped} examples without an answer skipped", file=sys.stderr)
    samples: dict = {}
    results = compare(
        model,
        tokenizer,
        prepared,
        with_adapters=bool(settings["adapter_path"]),
        ks=settings["k"],
        temperature=settings["temperature"],
        max_tokens=settings["max_completion_length"],
        top_p=settings["top_p"],
        top_k=settings["top_k"],
        min_p=settings["min_p"],
        stop=settings["stop"],
        batch_size=settings["batch_size"],
        seed=settings["seed"],
        reward_fns=reward_fns,
        samples=samples,
        progress=ProgressLine(),
        agent=agent,
    )
    report = {
        **{k: v for k, v in settings.items() if k != "limit"},
        "prompts": len(prepared),
        "samples_per_prompt": n,
        "skipped_without_answer": skipped,
        "results": results,
        "samples": samples,
    }
    if args.json == "-":
        print(json.dumps(report, indent=2))
        return 0
    print(format_table(results))
    if args.json:
        Path(args.json).expanduser().write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"results written to {args.json}", file=sys.stderr)
    return 0


class ProgressLine:
    """`progress(name, done, total)` as a line on stderr: rewritten in place on a terminal, one
    line per batch of prompts otherwise (logs)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr

    def __call__(self, name: str, done: int, total: int) -> None:
        line = f"  {name}: {done}/{total} prompts sampled"
        if self.stream.isatty():
            self.stream.write("\r\033[K" + line + ("\n" if done >= total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
