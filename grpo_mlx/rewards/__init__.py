"""Reward functions: TRL-style signature, a few built-ins, loading custom ones, batch scoring.

answers.py (answer extraction and matching), builtin.py (the built-ins), loading.py (specs to
functions) and scoring.py (a batch's rewards) are the parts; this package exports their API.

A reward function is `f(prompts, completions, **columns) -> list[float | None]`, exactly as in
TRL, so TRL reward functions work unchanged. `completions[i]` is a string for plain-text data or
`[{"role": "assistant", "content": text}]` for conversational data; `columns` holds every extra
dataset column as a list aligned with `completions` (e.g. `answer=[...]`) plus TRL's
`completion_ids` (the sampled token ids, EOS included), `trainer_state` (global_step, epoch,
max_steps), `log_metric(name, value)` and `log_extra(column, values)` (rewards.context).
Completion text is decoded as TRL decodes it: special tokens skipped, the final EOS and a stop
string left out. `async def` functions are awaited together.
`None` means "not applicable to this completion"; it adds 0 to the weighted total (TRL's nansum).

Choices:
- Functions are called with keywords only (`prompts=..., completions=..., **columns`), as TRL
  does, so a TRL function that names only `completions` and `**kwargs` works too.
- Built-ins: `accuracy` reads the `answer` column (option `column=`); `format` is strict (1/0);
  `format_soft` gives 0.25 per format rule that holds, so a nearly formatted answer still gets
  a signal (both give 1.0 to the same completions); `overlong` is DAPO's soft punishment;
  `length` is -min(L, L_max)/L_max, linear in [-1, 0], meant with a small weight.
- Custom functions are used as they are; factory options apply to built-ins only.
- `#### x` counts as an answer only when x is a number or ends the text (else it is a heading).
- No MLX here: this module is imported by cheap code paths (CLI help, TUI).
"""

from grpo_mlx.rewards.answers import answers_match, completion_text, extract_answer
from grpo_mlx.rewards.builtin import BUILTIN_REWARDS, RewardFn, accuracy_reward, check_columns, format_reward
from grpo_mlx.rewards.context import RewardContext, TrainerState
from grpo_mlx.rewards.errors import RewardFunctionError, RewardSpecError
from grpo_mlx.rewards.loading import resolve_reward
from grpo_mlx.rewards.scoring import RewardResult, compute_rewards, score_examples

__all__ = [
    "BUILTIN_REWARDS",
    "RewardFn",
    "RewardFunctionError",
    "RewardContext",
    "RewardResult",
    "RewardSpecError",
    "TrainerState",
    "accuracy_reward",
    "answers_match",
    "check_columns",
    "completion_text",
    "compute_rewards",
    "extract_answer",
    "format_reward",
    "resolve_reward",
    "score_examples",
]
