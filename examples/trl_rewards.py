"""Reward functions in TRL's style, for conversational data (examples/trl_rewards.yaml).

TRL calls a reward function with keywords: `prompts`, `completions` and every other dataset
column as a list aligned with the completions, and takes one float (or None) per completion.
grpo-mlx does the same, so these functions run unchanged under TRL's GRPOTrainer.

With conversational prompts (lists of messages) each completion is a list holding one message,
[{"role": "assistant", "content": text}]; with plain string prompts it is the text itself.

    python examples/trl_rewards.py ./data/gsm8k_chat

writes the recipe's data: GSM8K's questions as chat messages, its final numbers as `ground_truth`.
"""

import re

THINK_ANSWER = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)
ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def think_answer_format(completions, **kwargs):
    """1.0 when the reply is a <think> block followed by an <answer> block and nothing else."""
    contents = [completion[0]["content"] for completion in completions]
    return [1.0 if THINK_ANSWER.match(content) else 0.0 for content in contents]


def answer_matches(completions, ground_truth, **kwargs):
    """1.0 when the <answer> block holds the ground truth (commas and spaces ignored)."""
    rewards = []
    for completion, truth in zip(completions, ground_truth):
        found = ANSWER.findall(completion[0]["content"])
        given = found[-1].replace(",", "").strip() if found else None
        rewards.append(1.0 if given == str(truth).replace(",", "").strip() else 0.0)
    return rewards


SYSTEM = "Think step by step inside <think> </think>, then give only the final number inside <answer> </answer>."


def write_gsm8k_chat(folder: str) -> None:
    """GSM8K (openai/gsm8k, config main) as conversational rows with a `ground_truth` column."""
    import json
    from pathlib import Path

    from grpo_mlx.data import load_split

    Path(folder).mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        rows = load_split("openai/gsm8k", split, prompt_key="question", config="main")
        with open(Path(folder) / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": row["question"]}]
                truth = row["answer"].split("####")[-1].strip()  # GSM8K's solutions end in "#### 72"
                f.write(json.dumps({"prompt": messages, "ground_truth": truth}) + "\n")
        print(f"{folder}/{split}.jsonl: {len(rows)} rows")


if __name__ == "__main__":
    import sys

    write_gsm8k_chat(sys.argv[1] if len(sys.argv) > 1 else "./data/gsm8k_chat")
