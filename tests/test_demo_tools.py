"""The tool demo: shipped model and splits, its tool calls through mlx-lm's parser, a short run."""

import json

import numpy as np
import pytest

from grpo_mlx.demo import tools as demo


@pytest.fixture(scope="module")
def loaded():
    from mlx_lm import load

    from grpo_mlx.demo import pretrain_tools  # noqa: F401  loads OpenBLAS before MLX

    return load(str(demo.MODEL_DIR))  # (model, TokenizerWrapper)


def ids(tok, text):
    return tok.encode(text, add_special_tokens=False)


def test_shipped_files_load_and_are_small(loaded):
    names = {p.name for p in demo.MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert sum(p.stat().st_size for p in demo.MODEL_DIR.iterdir()) <= 4 * 2**20
    names = ("train", "valid", "test")
    splits = {n: [json.loads(line) for line in (demo.DATA_DIR / f"{n}.jsonl").open()] for n in names}
    assert [len(splits[n]) for n in ("test", "valid", "train")] == [demo.N_TEST, demo.N_VALID, demo.N_TRAIN]
    prompts = [{ex["prompt"] for ex in rows} for rows in splits.values()]
    assert not (prompts[0] & prompts[1]) and not (prompts[0] & prompts[2]) and not (prompts[1] & prompts[2])
    assert all(str(eval(ex["prompt"])) == ex["answer"] for rows in splits.values() for ex in rows)


def test_tokenizer_has_single_token_tool_markers(loaded):
    _, tok = loaded
    assert tok.has_tool_calling and tok.tool_call_start == demo.TOOL_CALL and tok.tool_call_end == demo.TOOL_CALL_END
    assert len(tok.tool_call_start_tokens) == 1 and len(tok.tool_call_end_tokens) == 1
    call = ids(tok, demo.call_text("123+456"))
    assert len(call) == 1 + 1 + 7 + 3 + 1  # the JSON head is one token
    assert tok.decode(call) == demo.call_text("123+456")
    user = [{"role": "user", "content": "123+456"}]
    prompt = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    assert prompt == "123+456="


def test_a_call_from_the_model_runs_the_calculator(loaded):
    from grpo_mlx.episodes import ResultRenderer, generate_episodes, turn_entry
    from grpo_mlx.tools import Toolbox, parse_calls

    model, tok = loaded
    box = Toolbox.from_specs(["calculator"])
    text = tok.decode(ids(tok, demo.call_text("123+456")))
    (call,) = parse_calls(text, tok.tool_call_start, tok.tool_call_end, tok.tool_parser, box.schemas)
    assert (call.name, call.arguments, call.parse_error) == ("calculator", {"expression": "123+456"}, "")

    call_ids = ids(tok, demo.call_text("123+456"))
    prompt = ids(tok, "123+456=")

    def force(rows, pos):  # the call is scripted; what follows the result is the model's own
        return np.array([call_ids[p] if p < len(call_ids) else -1 for p in pos])

    roll, stats = generate_episodes(model, tok, [prompt], 1, 32, box, ResultRenderer(tok, box.schemas), 1,
                                    temperature=0.0, force=force)  # fmt: skip
    assert stats.calls.tolist() == [1] and stats.errors.tolist() == [0]
    assert stats.log[0][1] == turn_entry("tool", "579", name="calculator")  # the result, as samples show it
    appended = roll.tokens[0][roll.env_mask[0]].tolist()
    assert appended == ids(tok, demo.response_text("579"))
    answer = demo.final_answer(roll.texts[0])  # the model's own turn after the result, learned from
    assert answer.isdigit() and roll.finish_reasons[0] == "stop"
    n = int(roll.lengths[0])
    assert not roll.env_mask[0][n - len(answer) - 1 : n].any()  # its answer and EOS are its own tokens


def test_shipped_model_answers_badly_alone(loaded):
    from grpo_mlx import prompts
    from grpo_mlx.episodes import Agent, ResultRenderer
    from grpo_mlx.evaluate import held_out
    from grpo_mlx.tools import Toolbox

    model, tok = loaded
    box = Toolbox.from_specs(["calculator"])
    agent = Agent(box, ResultRenderer(tok, box.schemas), 1)
    rows = [json.loads(line) for line in (demo.DATA_DIR / "test.jsonl").open()][:100]
    examples = prompts.prepare_examples(rows, tok, tools=agent.schemas)
    m = held_out(model, tok, examples, 32, agent=agent)  # the trainer's before/after evaluation
    assert m["n"] == 100 and m["accuracy"] <= 0.5 and m["tool_use"] <= 0.2


def test_results_are_shown_right_aligned():
    assert [demo.result_field(r) for r in ("3", "579", "1910", "Error: x")] == ["   3", " 579", "1910", "Error: x"]
    assert demo.response_text("579") == "<tool_response> 579</tool_response>="


def test_shipped_model_writes_the_call_and_copies_the_result(loaded):
    from grpo_mlx.demo.pretrain_tools import report

    model, tok = loaded
    pairs = demo.split_pairs()["test"][:50]  # held-out sums
    stats = report(model, tok, pairs)
    assert stats["call_written"] >= 0.98 and stats["copy_accuracy"] >= 0.98  # greedy, after "<tool_call>"
    assert stats["direct_accuracy"] <= 0.5 and stats["call_probability"] <= 0.2  # alone: wrong, rarely calls


def test_final_answer_reward():
    call = demo.call_text("1+2") + demo.response_text("3")
    done = ["3", "4", call + "3", call, call + "33"]
    assert demo.tool_answer(None, done, answer=["3"] * 5) == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert demo.tool_answer(None, ["3"], answer=[None]) == [None]


def test_demo_tools_trains_and_records_the_figures(tmp_path):
    from grpo_mlx import cli

    run = tmp_path / "run"
    flags = ["--iters", "2", "--batch-size", "2", "--group-size", "4", "--eval-limit", "20"]
    assert cli.main(["train", "--demo", "tools", *flags, "--adapter-path", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2
    for key in ("accuracy_before", "accuracy_after", "tool_use_before", "tool_use_after"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["eval_examples"] == 20  # --eval-limit holds for the demo's episodes too
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").exists() else None
    if config is not None:
        assert config["tools"] == ["calculator"] and config["demo"] == "tools"
