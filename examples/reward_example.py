"""A custom reward file for grpo-mlx, written the way TRL reward functions are written.

Use it with `--reward examples/reward_example.py:concise_correct` (or list it in the config).
Each function gets the prompts, the completions and every other dataset column as a keyword
list aligned with the completions (here `answer`), plus `completion_ids`. It returns one float
per completion, or None where the reward does not apply.
"""

from grpo_mlx.rewards import answers_match, completion_text, extract_answer


def concise_correct(prompts, completions, answer=None, completion_ids=None, **kwargs):
    """1.0 for a correct answer, minus up to 0.5 for using many words; None without a key."""
    if answer is None:
        return [None] * len(completions)
    rewards = []
    for completion, reference in zip(completions, answer, strict=True):
        text = completion_text(completion)  # plain string or [{"role": "assistant", ...}]
        if reference is None:
            rewards.append(None)
            continue
        correct = answers_match(extract_answer(text), reference)
        wordiness = min(len(text.split()) / 200, 1.0)
        rewards.append(float(correct) - 0.5 * wordiness)
    return rewards


def mentions_units(prompts, completions, **kwargs):
    """A format-style reward: 1.0 if the completion names a unit of money."""
    return [float(any(u in completion_text(c) for u in ("$", "dollars", "cents"))) for c in completions]
