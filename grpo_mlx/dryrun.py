"""`grpo-mlx train --dry-run`: everything a run sets up before its first step, shown, then exit.

The first thing to run on a new task: it loads the config, the reward functions, the data and
only the tokenizer (no weights), prints the first rendered prompts with their token counts and
what each reward function returns on two sample completions (the dataset's own answer, and a
wrong one), and exits without training or writing anything.

Each part of the output is one `section_*` function over a `DryRun` record, so that later
sections (e.g. a memory plan) are one function and one line in `SECTIONS`.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from grpo_mlx import data, judge, prompts, rewards
from grpo_mlx.config import DEMO_MODEL, TrainConfig
from grpo_mlx.errors import UserError

SHOWN_PROMPTS = 2
WRONG = "<think>\nA guess.\n</think>\n<answer>no idea</answer>"


class DryRunError(UserError, RuntimeError):
    """The tokenizer cannot be loaded for the dry run."""


@dataclass
class DryRun:
    cfg: TrainConfig
    tokenizer: object
    reward_fns: list
    train: list[dict]  # prepared: prompt_text and prompt_ids added
    held_out: list[dict]
    held_out_split: str | None
    notes: list[str] = field(default_factory=list)


def load_tokenizer(model: str):
    """The model's tokenizer only (tokenizer files, no weights), as mlx_lm.load would give it."""
    from mlx_lm.utils import load_tokenizer as mlx_load_tokenizer

    where = model
    if not Path(model).expanduser().exists():
        from grpo_mlx.hub_datasets import hub_unreachable

        offline = hub_unreachable(model, "models")
        if offline:  # the cache, or one sentence now instead of huggingface_hub's retries
            import huggingface_hub

            try:
                where = huggingface_hub.snapshot_download(model, local_files_only=True, allow_patterns=["*.json"])
            except Exception:
                raise DryRunError(
                    f"model '{model}': the Hub is unreachable ({offline}) and its tokenizer is not in the local cache"
                ) from None
    try:
        return mlx_load_tokenizer(where)
    except Exception as error:  # a missing directory, no tokenizer files, the Hub unreachable
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise DryRunError(f"cannot load the tokenizer of '{model}': {type(error).__name__}: {first}") from None


def prepare(cfg: TrainConfig) -> DryRun:
    from grpo_mlx.blas import use_system_blas

    use_system_blas()  # mlx_lm's tokenizer module imports MLX
    fns = [
        rewards.resolve_reward(s, max_completion_length=cfg.max_completion_length, config=cfg)
        for s in cfg.reward_functions
    ]
    judge.probe_endpoints(fns)  # a judge server is asked for real below; a local judge needs weights
    train = data.load_split(
        cfg.data, "train", prompt_key=cfg.prompt_key, answer_key=cfg.answer_key, config=cfg.data_config
    )
    held, split = data.held_out_examples(cfg)
    model = cfg.model or DEMO_MODEL
    tokenizer = load_tokenizer(model)
    options = prompts.options(cfg)
    run = DryRun(
        cfg,
        tokenizer,
        fns,
        prompts.prepare_examples(train, tokenizer, **options),
        prompts.prepare_examples(held, tokenizer, **options),
        split,
    )
    run.notes = prompts.notes(train, tokenizer, cfg.ignore_chat_template, model)
    return run


def section_setup(run: DryRun, out: TextIO) -> None:
    cfg = run.cfg
    held = f"{len(run.held_out)} held-out ({run.held_out_split})" if run.held_out else "no held-out split"
    config = f" (config {cfg.data_config})" if cfg.data_config else ""
    out.write(f"data: {cfg.data}{config}: {len(run.train)} train prompts, {held}\n")
    out.write(f"model: {cfg.model or DEMO_MODEL} (tokenizer only; no weights loaded)\n")
    kwargs = f", chat_template_kwargs {cfg.chat_template_kwargs}" if cfg.chat_template_kwargs else ""
    template = "yes" if prompts.has_chat_template(run.tokenizer) else "no (plain text)"
    out.write(f"chat template: {template}{kwargs}\n")
    for note in run.notes:
        out.write(f"note: {note}\n")


def section_prompts(run: DryRun, out: TextIO) -> None:
    lengths = [len(ex["prompt_ids"]) for ex in run.train + run.held_out]
    out.write(
        f"prompt tokens over {len(lengths)} prompts: min {min(lengths)}, median "
        f"{statistics.median(lengths):g}, max {max(lengths)}; completions up to {run.cfg.max_completion_length}\n"
    )
    for i, ex in enumerate(run.train[:SHOWN_PROMPTS], 1):
        out.write(f"\n--- prompt {i} of {len(run.train)} ({len(ex['prompt_ids'])} tokens) ---\n")
        out.write(ex["prompt_text"] + "\n")
        out.write("--- end of prompt ---\n")


def sample_completions(example: dict, specs: list[str]) -> dict[str, str]:
    """Two completions to score: the dataset's answer written as the rewards expect it (a code
    block for `code`, <think>/<answer> tags otherwise), and a wrong one."""
    answer = example.get("answer")
    if isinstance(answer, list):
        answer = answer[0] if answer else None
    if answer is None:
        return {"wrong": WRONG}
    if "code" in specs:
        return {"reference": f"```python\n{answer}\n```", "wrong": "```python\npass\n```"}
    final = rewards.extract_answer(str(answer)) or str(answer)
    return {"reference": f"<think>\nWorking it out.\n</think>\n<answer>{final}</answer>", "wrong": WRONG}


def score_sample(run: DryRun, example: dict, text: str) -> dict[str, float | str | None]:
    """Each reward function's value on one completion, called as training calls it."""
    ids = [list(run.tokenizer.encode(text, add_special_tokens=False))]
    state = rewards.TrainerState(0, run.cfg.iters, 0.0)  # what the first step's functions see
    fns = [(name, fn) for name, fn in run.reward_fns if not judge.needs_model(fn)]
    weights = run.cfg.reward_weights
    if weights:
        weights = [w for (_, fn), w in zip(run.reward_fns, weights) if not judge.needs_model(fn)]
    result = rewards.score_examples(fns, [example], [text], ids, weights=weights,
                                    timeout=run.cfg.reward_timeout, context=rewards.RewardContext(state))  # fmt: skip
    values = {name: float(v[0]) for name, v in result.per_function.items()}
    skipped = {name: "needs the model" for name, fn in run.reward_fns if judge.needs_model(fn)}
    total = "total (judge not counted)" if skipped else "total"
    return {name: None if v != v else v for name, v in values.items()} | skipped | {total: float(result.total[0])}


def _shown(value) -> str:
    return value if isinstance(value, str) else "None" if value is None else f"{value:g}"


def section_rewards(run: DryRun, out: TextIO) -> None:
    example = run.train[0]
    out.write("\nrewards of sample completions of prompt 1")
    out.write(f" (answer {example['answer']!r:.80}):\n" if example.get("answer") is not None else " (no answer):\n")
    for label, text in sample_completions(example, run.cfg.reward_functions).items():
        values = score_sample(run, example, text)
        shown = ", ".join(f"{k} {_shown(v)}" for k, v in values.items())
        out.write(f"  {label} {text!r:.100}\n    -> {shown}\n")


def section_plan(run: DryRun, out: TextIO) -> None:
    from grpo_mlx.plan import MemoryPlanError, format_plan, make_plan

    lengths = [len(ex["prompt_ids"]) for ex in run.train] or [0]
    try:
        out.write("\n" + format_plan(make_plan(run.cfg, prompt_len=max(lengths))) + "\n")
    except MemoryPlanError as e:
        out.write(f"\nmemory plan: {e}\n")


SECTIONS = [section_setup, section_prompts, section_rewards, section_plan]


def dry_run(cfg: TrainConfig, out: TextIO) -> int:
    """Set the run up as far as it goes without weights, show each section, exit 0."""
    run = prepare(cfg)
    out.write("grpo-mlx train --dry-run: nothing is trained and nothing is written\n")
    for section in SECTIONS:
        section(run, out)
    out.flush()
    return 0
