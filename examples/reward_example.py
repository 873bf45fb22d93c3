"""A custom reward file for grpo-mlx, written the way TRL reward functions are written.

Try it on the embedded demo task (two steps, a minute on a laptop CPU):

    grpo-mlx train --reward-functions accuracy examples/reward_example.py:concise_correct \
        --iters 2 --eval-limit 0 --adapter-path /tmp/reward-example --overwrite

Each function gets the prompts, the completions and every other dataset column as a keyword
list aligned with the completions (here `answer`), plus TRL's `completion_ids`, `trainer_state`
(global_step, epoch, max_steps), `log_metric(name, value)` (into metrics.jsonl) and
`log_extra(column, values)` (into samples.jsonl). It returns one float per completion, or None
where the reward does not apply. A completion is a string, or [{"role": "assistant",
"content": ...}] when the prompts are conversations.
"""

from grpo_mlx.rewards import answers_match, completion_text, extract_answer


def concise_correct(prompts, completions, answer=None, completion_ids=None, log_metric=None, **kwargs):
    """1.0 for a correct answer, minus up to 0.5 for using many words; None without a key."""
    if answer is None:
        return [None] * len(completions)
    if log_metric is not None:  # shown with the step's metrics (metrics.jsonl, the TUI)
        log_metric("concise_correct/mean_tokens", sum(map(len, completion_ids or [])) / max(len(completions), 1))
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
