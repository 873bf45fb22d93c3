"""Reward functions written for TRL run unchanged and see what TRL shows them: completion text
decoded with special tokens skipped (no EOS, no stop string) over a byte-level BPE tokenizer
with a ChatML template, TRL's extra keywords (completion_ids, trainer_state, log_metric,
log_extra), async functions awaited together, also in a worker process, and a run refused
before training when a reward's column is missing. The reward functions below are copied
unchanged from TRL's documentation ("Using a custom reward function")."""

import asyncio
import json
import textwrap

import numpy as np
import pytest

from grpo_mlx import reward_worker, rewards
from grpo_mlx.rewards import RewardContext, TrainerState, compute_rewards, score_examples

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE tokenizer with ChatML special tokens, wrapped as mlx_lm.load wraps one."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["<think>add the numbers</think><answer>54</answer>", "Hello\nWorld, 12 + 42 = 54 dollars"] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML
    )
    return TokenizerWrapper(hf)


def ids_of(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


# ------------------------------------------------------------------ decoding as TRL decodes


def test_completion_text_skips_special_tokens_and_the_final_eos(bpe):
    from grpo_mlx.sampler import _finish

    eos = bpe.convert_tokens_to_ids("<|im_end|>")
    start = bpe.convert_tokens_to_ids("<|im_start|>")
    body = ids_of(bpe, "<think>add</think><answer>54</answer>")
    rows = [body + [eos], body[:3] + [start] + body[3:] + [eos]]
    width = max(map(len, rows))
    tokens = np.array([r + [0] * (width - len(r)) for r in rows], dtype=np.int32)  # (2, T)
    roll = _finish(bpe, tokens, np.zeros(tokens.shape, np.float32), np.array([len(r) for r in rows]), [], 0, 0)
    assert bpe.decode(rows[0]).endswith("<|im_end|>"), "the raw decode holds the special token"
    assert roll.texts == ["<think>add</think><answer>54</answer>"] * 2  # special tokens skipped, EOS too
    assert roll.completion_ids == rows, "the token ids stay as sampled, EOS included"
    assert roll.finish_reasons == ["stop", "stop"]


def test_stop_string_is_not_in_the_text_and_ends_with_stop(bpe):
    from grpo_mlx.sampler import _find_stop_strings, _finish

    eos = bpe.convert_tokens_to_ids("<|im_end|>")
    row = ids_of(bpe, "Hello\nWorld") + [eos]
    tokens = np.array([row], dtype=np.int32)
    end = np.array([len(row)])  # ended by EOS between two stop checks: the stop string came first
    _find_stop_strings(bpe, tokens, end, len(row), ["\n"], every_row=True)
    cut = next(k for k in range(1, len(row) + 1) if "\n" in bpe.decode(row[:k]))
    assert end[0] == cut < len(row), "the row ends at the token that completes the stop string"
    roll = _finish(bpe, tokens, np.zeros(tokens.shape, np.float32), end, ["\n"], 0, 0)
    assert roll.texts == ["Hello"] and roll.finish_reasons == ["stop"]
    assert roll.completion_ids == [row[:cut]], "the stop string's tokens stay (they were sampled)"


# ------------------------------------------------------------------ TRL's documented functions, unchanged

TRL_REWARDS = textwrap.dedent(
    r'''
    import asyncio
    import re


    def format_reward_func(completions, **kwargs):
        """Reward function that checks if the completion has a specific format."""
        pattern = r"^<think>.*?</think><answer>.*?</answer>$"
        completion_contents = [completion[0]["content"] for completion in completions]
        matches = [re.match(pattern, content) for content in completion_contents]
        return [1.0 if match else 0.0 for match in matches]


    def reward_func(completion_ids, **kwargs):
        """Reward function that assigns higher scores to longer completions (in terms of token count)."""
        return [float(len(ids)) for ids in completion_ids]


    def reward_len(completions, **kwargs):
        """Reward function that assigns higher scores to longer completions (in terms of character count)."""
        return [float(len(completion)) for completion in completions]


    def logging_reward_func(completions, ground_truth, log_extra=None, log_metric=None, **kwargs):
        extracted = [re.search(r"\\boxed\{(.*?)\}", c) for c in completions]
        extracted = [m.group(1) if m else None for m in extracted]
        rewards = [1.0 if e == gt else 0.0 for e, gt in zip(extracted, ground_truth)]

        if log_extra:
            log_extra("golden_answer", list(ground_truth))
            log_extra("extracted_answer", [e or "[none]" for e in extracted])

        if log_metric:
            log_metric("accuracy", sum(rewards) / len(rewards))

        return rewards


    async def async_reward_func(prompts, completions, **kwargs):
        # Simulate an I/O-bound call (e.g., HTTP request, database lookup)
        await asyncio.sleep(0.01)
        # Simple toy reward: 1.0 if the completion is non-empty, else 0.0
        return [1.0 if completion else 0.0 for completion in completions]


    def step_shaped(completions, trainer_state, **kwargs):
        return [trainer_state.global_step / trainer_state.max_steps + trainer_state.epoch] * len(completions)
    '''
)


@pytest.fixture
def trl_file(tmp_path):
    path = tmp_path / "trl_rewards.py"
    path.write_text(TRL_REWARDS)
    return path


def load(path, *names):
    return [rewards.resolve_reward(f"{path}:{name}") for name in names]


def test_trl_documented_rewards_run_unchanged(trl_file, bpe):
    conversation = [{"role": "user", "content": "What is 12 + 42?"}]
    examples = [{"prompt": conversation, "prompt_text": "…", "prompt_ids": [1], "answer": "54"}]
    texts = ["<think>add</think><answer>54</answer>", "54"]
    ids = [ids_of(bpe, t) + [bpe.convert_tokens_to_ids("<|im_end|>")] for t in texts]
    result = score_examples(load(trl_file, "format_reward_func", "reward_func"), examples, texts, ids)
    np.testing.assert_allclose(result.per_function["format_reward_func"], [1.0, 0.0])  # completion[0]["content"]
    np.testing.assert_allclose(result.per_function["reward_func"], [len(i) for i in ids])
    plain = [{"prompt": "The sky is", "prompt_text": "The sky is", "prompt_ids": [1]}]
    result = score_examples(load(trl_file, "reward_len"), plain, [" blue.", " in the sky."], [[1, 2], [3]])
    np.testing.assert_allclose(result.per_function["reward_len"], [6.0, 12.0])  # TRL's own doctest values


def test_trl_extra_keywords_log_metrics_and_columns(trl_file):
    context = RewardContext(TrainerState(global_step=3, max_steps=6, epoch=0.25))
    examples = [{"prompt": "p", "ground_truth": "7"}, {"prompt": "q", "ground_truth": "8"}]
    fns = load(trl_file, "logging_reward_func", "step_shaped")
    result = score_examples(fns, examples, ["\\boxed{7}", "no"], [[1], [2]], context=context)
    np.testing.assert_allclose(result.per_function["logging_reward_func"], [1.0, 0.0])
    np.testing.assert_allclose(result.per_function["step_shaped"], [0.75, 0.75])
    assert result.extra == {"golden_answer": ["7", "8"], "extracted_answer": ["7", "[none]"]}
    score_examples(fns, examples, ["\\boxed{7}", "\\boxed{8}"], [[1], [2]], context=context)
    assert context.metrics() == {"accuracy": 0.75}, "averaged over the step's calls, under TRL's name"
    kept = result.select(slice(1, 2))
    assert kept.extra == {"golden_answer": ["8"], "extracted_answer": ["[none]"]}, "values travel with their rows"


def test_log_extra_must_give_one_value_per_completion():
    def short(completions, log_extra, **kw):
        log_extra("note", ["only one"])
        return [0.0] * len(completions)

    with pytest.raises(rewards.RewardFunctionError, match="logged 1 values of column 'note'"):
        compute_rewards([("short", short)], None, ["p", "q"], ["a", "b"], {})


def test_async_reward_functions_are_awaited_together():
    """Each waits for the other to have started: run one after the other, both would time out."""
    started = {}

    def make(me, other):
        async def fn(completions, **kw):
            started[me] = asyncio.current_task()
            for _ in range(200):  # a guard against hanging, not a timing
                if other in started:
                    return [1.0] * len(completions)
                await asyncio.sleep(0.005)
            raise RuntimeError(f"{other} never started while {me} waited")

        fn.__name__ = me
        return fn

    result = compute_rewards([("a", make("a", "b")), ("b", make("b", "a"))], [1.0, 2.0], ["p"], ["c"], {}, timeout=30)
    assert list(result.per_function) == ["a", "b"] and result.total.tolist() == [3.0]


def test_async_failure_names_the_function(trl_file):
    async def broken(completions, **kw):
        raise ValueError("no judge")

    with pytest.raises(rewards.RewardFunctionError, match="'broken' failed: ValueError: no judge"):
        compute_rewards(load(trl_file, "async_reward_func") + [("broken", broken)], None, ["p"], ["c"], {})


def test_process_isolation_runs_async_functions_and_replays_their_logs(trl_file):
    specs = [f"{trl_file}:async_reward_func", f"{trl_file}:logging_reward_func"]
    fns = reward_worker.isolate(specs, [rewards.resolve_reward(s) for s in specs], timeout=60)
    try:
        context = RewardContext(TrainerState(1, 2, 0.0))
        result = compute_rewards(
            fns, None, ["p", "q"], ["\\boxed{7}", ""], {"ground_truth": ["7", "8"]}, context=context
        )
        np.testing.assert_allclose(result.per_function["async_reward_func"], [1.0, 0.0])
        assert context.metrics() == {"accuracy": 0.5}
        assert result.extra["extracted_answer"] == ["7", "[none]"]
    finally:
        reward_worker.close_all(fns)


# ------------------------------------------------------------------ refused before training


def test_rewards_that_need_a_missing_column_are_refused(tmp_path):
    rewards.check_columns([rewards.resolve_reward("accuracy")], [{"prompt": "p", "answer": "1"}], "d")
    with pytest.raises(rewards.RewardSpecError, match=r"reward 'accuracy' needs the 'answer' column.*--answer-key"):
        rewards.check_columns([rewards.resolve_reward("accuracy")], [{"prompt": "p", "answer": None}], "d (train)")
    pytest.importorskip("grpo_mlx.sandbox")
    code = ("code", rewards.BUILTIN_REWARDS["code"]())
    with pytest.raises(rewards.RewardSpecError, match="reward 'code' needs the 'tests' column"):
        rewards.check_columns([code], [{"prompt": "p"}], "d (train)")


def test_training_without_answers_is_refused_at_set_up(tmp_path):
    from grpo_mlx.config import DEMO_MODEL, build_config
    from grpo_mlx.trainer import Trainer

    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps({"prompt": f"{i}+1="}) + "\n" for i in range(4)))
    cfg = build_config(dict(model=DEMO_MODEL, data=str(data), adapter_path=str(tmp_path / "run"), eval_limit=0))
    trainer = Trainer(cfg)
    with pytest.raises(rewards.RewardSpecError, match="'accuracy' needs the 'answer' column, but no example of"):
        trainer.setup()
    assert not hasattr(trainer, "model"), "refused before the model loads"


# ------------------------------------------------------------------ in a training run (the demo model)

RUN_REWARD = textwrap.dedent(
    """
    def tracked(completions, trainer_state, log_metric, log_extra, **kwargs):
        log_metric("tracked/step_seen", float(trainer_state.global_step))
        log_extra("chars", [len(c) for c in completions])
        return [0.0] * len(completions)
    """
)


def test_a_run_logs_what_rewards_log_and_shows_held_out_progress(tmp_path):
    from grpo_mlx.events import EventBus, read_jsonl
    from grpo_mlx.trainer import Trainer
    from tests.test_trainer import small_config

    path = tmp_path / "tracked.py"
    path.write_text(RUN_REWARD)
    seen = []
    bus = EventBus()
    bus.subscribe(seen.append)
    cfg = small_config(tmp_path, iters=2, eval_limit=4, reward_functions=["accuracy", f"{path}:tracked"])
    Trainer(cfg, bus).run()
    steps = [e["metrics"] for e in read_jsonl(str(tmp_path / "run" / "metrics.jsonl")) if e["type"] == "step"]
    assert [m["tracked/step_seen"] for m in steps] == [0.0, 1.0], "trainer_state.global_step = steps done"
    groups = [g for e in read_jsonl(str(tmp_path / "run" / "samples.jsonl")) for g in e["groups"]]
    completion = groups[0]["completions"][0]
    assert completion["extra"] == {"chars": len(completion["text"])}, "log_extra values sit with their sample"
    progress = [e["text"] for e in seen if e["type"] == "message" and e["text"].startswith("held-out evaluation")]
    assert "held-out evaluation: 4/4 prompts" in progress and "held-out evaluation: 0/4 prompts (greedy)" in progress
