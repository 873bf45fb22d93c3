"""The tool demo: 3-digit addition that a tiny model gets wrong alone and right with the calculator.

    grpo-mlx train --demo tools

Choices, stated once:
- operands are 100..999, so every prompt ("123+456") renders to the same 8 tokens ("123+456=").
- the model answers directly ("579" then <eos>), or calls the built-in `calculator` tool:
  <tool_call>{"name": "calculator", "arguments": {"expression": "123+456"}}</tool_call>, reads
  <tool_response>579</tool_response>= and then writes the answer. Its pre-training
  (grpo_mlx.demo.pretrain_tools) answers directly with forgotten carries and calls the tool in a
  few percent of the examples only, so GRPO has a better way to find.
- the chat template writes every message's content with no roles (the model is character-level
  and tiny); tool calls and results get their markers. It names `<tool_call>` and
  `tool_call.name`, from which mlx-lm infers its json_tools parser; the schemas passed as
  `tools=` are not written (one tool, and each character costs a decode step).
- the reward is the final answer: the text after the last "=" of the completion (the result of a
  tool is no answer until the model writes it).

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
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'tool' %}" + TOOL_RESPONSE + "{{ message.content }}" + TOOL_RESPONSE_END + "="
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


def response_text(result: str) -> str:
    """What the template appends after a call (the tool message and the generation prompt)."""
    return TOOL_RESPONSE + result + TOOL_RESPONSE_END + "="


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


def held_out(model, tokenizer, agent, examples: list[dict], max_tokens: int, batch: int = 100) -> dict:
    """Greedy episodes (with the tool) on prepared examples ("prompt_ids", "answer"): accuracy of
    the final answer and the share of episodes that call the tool."""
    from grpo_mlx.episodes import generate_episodes

    hits, calls = [], []
    for i in range(0, len(examples), batch):
        chunk = examples[i : i + batch]
        roll, stats = generate_episodes(
            model, tokenizer, [ex["prompt_ids"] for ex in chunk], 1, max_tokens,
            agent.toolbox, agent.renderer, agent.max_turns, temperature=0.0,
        )  # fmt: skip
        hits += [final_answer(t) == str(ex["answer"]) for t, ex in zip(roll.texts, chunk)]
        calls += [int(c) > 0 for c in stats.calls]
    n = max(len(hits), 1)
    return {"accuracy": sum(hits) / n, "tool_use": sum(calls) / n, "n": len(hits)}


class Report:
    """The `--demo tools` figures, as a subscriber of the trainer's event bus: greedy held-out
    episodes at the start event (before the first step) and at the end event; each shown as a
    message and recorded in summary.json (tool_accuracy_before/after, tool_use_before/after)."""

    def __init__(self, trainer, split: str = "test"):
        self.trainer, self.split, self.before, self.examples = trainer, split, None, None

    def measure(self) -> dict:
        from grpo_mlx import data, prompts

        t, cfg = self.trainer, self.trainer.cfg
        if self.examples is None:
            rows = data.load_split(cfg.data, self.split, prompt_key=cfg.prompt_key, answer_key=cfg.answer_key)
            self.examples = prompts.prepare_examples(rows, t.tokenizer, **prompts.options(cfg), tools=t.agent.schemas)
        return held_out(t.model, t.tokenizer, t.agent, self.examples, cfg.max_completion_length)

    def say(self, name: str, m: dict) -> None:
        from grpo_mlx import events

        text = f"held-out ({name}, {m['n']} prompts, greedy episodes): accuracy {m['accuracy']:.1%}, "
        self.trainer.bus.emit(events.Message(level="info", text=text + f"calls the tool {m['tool_use']:.1%}"))

    def __call__(self, event: dict) -> None:
        if event["type"] == "start":
            self.before = self.measure()
            self.say("before", self.before)
        elif event["type"] == "end" and event["status"] not in ("stopped", "failed") and self.before:
            after = self.measure()
            self.say("after", after)
            path = self.trainer.run_dir / "summary.json"
            summary = json.loads(path.read_text()) if path.exists() else {}
            for when, m in (("before", self.before), ("after", after)):
                summary[f"tool_accuracy_{when}"], summary[f"tool_use_{when}"] = m["accuracy"], m["tool_use"]
            summary["tool_eval_examples"] = after["n"]
            if self.trainer.world.is_main:
                path.write_text(json.dumps(summary, indent=2))


def attach(trainer) -> None:
    """Subscribe the figures' Report to a `--demo tools` trainer (the CLI and the TUI call this)."""
    if trainer.cfg.demo == "tools":
        trainer.bus.subscribe(Report(trainer))
