"""The tool demo: 3-digit addition that a tiny model gets wrong alone and right with the calculator.

    grpo-mlx train --demo tools

Choices, stated once:
- operands are 100..999, so every prompt ("123+456") renders to the same 8 tokens ("123+456=").
- the model answers directly ("579" then <eos>), or calls the built-in `calculator` tool:
  <tool_call>{"name": "calculator", "arguments": {"expression": "123+456"}}</tool_call>, reads
  <tool_response> 579</tool_response>= (the result right-aligned in four characters) and
  then copies it (" 579"; the reward strips the space). Its pre-training
  (grpo_mlx.demo.pretrain_tools) answers directly with forgotten carries and calls the tool in a
  few percent of the examples only, so GRPO has a better way to find.
- the chat template writes every message's content with no roles (the model is character-level
  and tiny); tool calls and results get their markers. It names `<tool_call>` and
  `tool_call.name`, from which mlx-lm infers its json_tools parser; the schemas passed as
  `tools=` are not written (one tool, and each character costs a decode step).
- the reward is the final answer: the text after the last "=" of the completion (the result of a
  tool is no answer until the model writes it).
- the before/after figures are the trainer's held-out evaluation (grpo_mlx.evaluate.held_out
  with the run's agent): greedy episodes, accuracy of the last turn and the share that call the
  tool, in summary.json as accuracy_before/after and tool_use_before/after.

No MLX at import: the reward loader and tests import this cheaply.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from grpo_mlx.rewards.answers import completion_text

HERE = Path(__file__).parent
MODEL_DIR = HERE / "tools_model"
DATA_DIR = HERE / "tools_data"
LOW, HIGH = 100, 999  # operand range, inclusive
N_TEST, N_VALID, N_TRAIN = 200, 100, 5000  # the shipped splits; pre-training draws from the rest

TOOL_CALL, TOOL_CALL_END = "<tool_call>", "</tool_call>"
TOOL_RESPONSE, TOOL_RESPONSE_END = "<tool_response>", "</tool_response>"
# One token for the call's fixed JSON head: the character-level model writes 11 tokens a call, not 70.
CALL_HEAD = '{"name": "calculator", "arguments": {"expression": "'
CALL_TAIL = '"}}'
# A tool's result is written right-aligned in RESULT_WIDTH characters (" 579", "1910"), so that the
# answer copied after "=" always sits the same distance back: with 3- and 4-digit results at
# different distances the tiny model mixed the two up ("1910=1900").
RESULT_WIDTH = 4
RESULT_FIELD = "{{ '%" + str(RESULT_WIDTH) + "s' | format(message.content) }}"
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'tool' %}" + TOOL_RESPONSE + RESULT_FIELD + TOOL_RESPONSE_END + "="
    "{%- else %}{{ message.content }}"
    "{%- for tool_call in message.tool_calls or [] %}" + TOOL_CALL + '{"name": "{{ tool_call.name }}", '
    '"arguments": {{ tool_call.arguments | tojson }}}' + TOOL_CALL_END + "{%- endfor %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt and messages[-1].role != 'tool' %}={% endif %}"
)


def example(a: int, b: int) -> dict:
    return {"prompt": f"{a}+{b}", "answer": str(a + b)}


def call_text(prompt: str) -> str:
    """What the model writes to call the calculator on a prompt."""
    return TOOL_CALL + CALL_HEAD + prompt + CALL_TAIL + TOOL_CALL_END


def result_field(result: str) -> str:
    """A tool's result as the template writes it (right-aligned; longer text unchanged)."""
    return f"{result:>{RESULT_WIDTH}}"


def response_text(result: str) -> str:
    """What the template appends after a call (the tool message and the generation prompt)."""
    return TOOL_RESPONSE + result_field(result) + TOOL_RESPONSE_END + "="


def split_pairs(seed: int = 0) -> dict[str, list[tuple[int, int]]]:
    """The canonical disjoint split of ordered pairs; `pretrain` is everything not shipped as test/valid."""
    rng = random.Random(seed)
    held = set()
    while len(held) < N_TEST + N_VALID:
        held.add((rng.randint(LOW, HIGH), rng.randint(LOW, HIGH)))
    held = sorted(held)
    rng.shuffle(held)
    test, valid = held[:N_TEST], held[N_TEST:]
    train, taken = [], set(held)
    while len(train) < N_TRAIN:
        pair = (rng.randint(LOW, HIGH), rng.randint(LOW, HIGH))
        if pair not in taken:
            taken.add(pair)
            train.append(pair)
    return {"test": test, "valid": valid, "train": train, "held": held}


def write_splits(out_dir: str | Path = DATA_DIR, seed: int = 0) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, pairs in split_pairs(seed).items():
        if name == "held":
            continue
        path = out_dir / f"{name}.jsonl"
        path.write_text("".join(json.dumps(example(a, b)) + "\n" for a, b in pairs))
        paths[name] = path
    return paths


def final_answer(text: str) -> str:
    """The model's answer: what follows the last "=" (a tool's result is not it), stripped."""
    return text.rsplit("=", 1)[-1].strip()


def tool_answer(prompts, completions, answer=None, **kwargs) -> list[float | None]:
    """The demo's reward: 1.0 when the final answer is the sum, 0.0 when not."""
    answer = answer or [None] * len(completions)
    return [
        None if ref is None else float(final_answer(completion_text(c)) == str(ref))
        for c, ref in zip(completions, answer, strict=True)
    ]
