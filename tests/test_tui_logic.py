"""The dashboard's pure-Python parts: run state from events, health rules, text plots, file
tailing and the configuration form's parsing. No Textual app, no MLX."""

import json
import math

import pytest

from grpo_mlx.config import ConfigError, build_config
from tui import health
from tui.config_form import form_config, shown
from tui.plot import BRAILLE, bar, braille_chart, columns_text, compact, histogram
from tui.state import RunState, describe, malformed
from tui.tail import JsonlTail, RunFollower


def step(n, **metrics):
    return {"type": "step", "step": n, "metrics": metrics}


# ------------------------------------------------------------------ state


def test_state_follows_a_run():
    s = RunState()
    s.apply(
        {
            "type": "start",
            "run_dir": "r",
            "config": {"batch_size": 2},
            "total_steps": 4,
            "start_step": 0,
            "blas": "x",
            "model": "m",
        }
    )
    assert s.status == "running" and s.total_steps == 4 and s.active
    s.apply(step(1, reward=0.5, step_time=2.0, **{"rewards/accuracy/mean": 0.5}))
    s.apply(step(2, reward=None, step_time=4.0, **{"rewards/accuracy/mean": 0.75}))  # null in a file = NaN
    assert s.steps == [1, 2]
    assert math.isnan(s.values("reward")[1]) and s.latest("reward") == 0.5
    assert s.reward_functions() == ["accuracy"]
    assert s.seconds_per_step() == 3.0 and s.eta_seconds() == 6.0
    s.apply({"type": "end", "step": 2, "summary": {}, "status": "stopped"})
    assert s.status == "stopped" and not s.active


def test_state_aligns_metrics_that_come_and_go():
    s = RunState()
    s.apply(step(1, loss=1.0))
    s.apply(step(2, skipped=1))  # a skipped step logs no loss at all
    s.apply(step(3, loss=0.5, kl=0.1))
    assert s.values("loss") == [1.0, None, 0.5]
    assert s.values("kl") == [None, None, 0.1]
    assert s.values("skipped") == [None, 1.0, None]


def test_resumed_run_replaces_repeated_steps():
    s = RunState()
    for n in (1, 2, 3, 4):
        s.apply(step(n, reward=float(n)))
    s.apply({"type": "start", "total_steps": 6, "start_step": 2})
    s.apply(step(3, reward=30.0))  # resumed from the checkpoint at step 2
    assert s.steps == [1, 2, 3] and s.values("reward") == [1.0, 2.0, 30.0]


def test_samples_are_filed_under_the_step_the_user_sees():
    s = RunState()
    s.apply({"type": "samples", "step": 1, "groups": [{"prompt": "p", "completions": []}]})
    s.apply(step(1, reward=1.0))
    assert s.sample_steps() == [1]


def test_pausing_becomes_paused_at_the_next_step():
    s = RunState(status="pausing")
    s.apply(step(1))
    assert s.status == "paused"


def test_log_lines():
    assert (
        describe({"type": "eval", "name": "before", "metrics": {"n": 5, "accuracy": 0.4, "mean_reward": 0.4}})
        == "held-out (before, 5 prompts, greedy): accuracy 40.0%, mean reward 0.400"
    )
    with_tools = {"n": 5, "accuracy": 0.4, "mean_reward": 0.4, "tool_use": 0.6}
    assert describe({"type": "eval", "name": "after", "metrics": with_tools}).endswith(", calls a tool 60.0%")
    summary = {"accuracy_before": 0.0, "accuracy_after": 0.9, "tool_use_before": 0.05, "tool_use_after": 1.0}
    end = describe({"type": "end", "status": "finished", "step": 3, "summary": summary})
    assert end == "finished after 3 steps; held-out accuracy 0.0% -> 90.0%, calling a tool 5.0% -> 100.0%"
    assert describe({"type": "checkpoint", "step": 3, "path": "p"}) == "checkpoint saved at step 3: p"
    assert describe(step(1)) is None
    s = RunState()
    s.apply({"type": "message", "level": "warning", "text": "careful"})
    assert s.log == [("warning", "warning: careful")] and s.log_total == 1


# ------------------------------------------------------------------ health


def rules(series, steps=None):
    n = max(len(v) for v in series.values())
    return {a.rule: a for a in health.check(steps or list(range(1, n + 1)), series)}


def test_healthy_run_has_no_alerts():
    assert rules({"reward": [0.1, 0.2], "loss": [0.1, 0.2], "frac_reward_zero_std": [0.2, 0.3]}) == {}


def test_zero_std_needs_several_steps():
    assert "zero_std" not in rules({"frac_reward_zero_std": [0.9, 0.9]})
    assert "zero_std" not in rules({"frac_reward_zero_std": [0.9, 0.4, 0.9]})
    assert "zero_std" in rules({"frac_reward_zero_std": [0.1, 0.6, 0.75, 0.9]})


def test_nan_loss_is_an_error_while_it_lasts():
    now = rules({"loss": [0.1, math.nan], "grad_norm": [1.0, 2.0]})["non_finite"]
    assert now.level == "error" and "loss NaN at 1 step(s) (2)" in now.text
    earlier = rules({"loss": [math.nan, 0.1], "grad_norm": [math.nan, 1.0]})["non_finite"]
    assert earlier.level == "warning" and "loss and grad_norm" in earlier.text
    # a step that did not log a loss at all (None) is not a NaN
    assert "non_finite" not in rules({"loss": [0.1, None]})


def test_kl_jump():
    calm = [0.010, 0.012, 0.011, 0.009, 0.010, 0.011]
    assert "kl_jump" not in rules({"kl": calm + [0.02]})
    assert "kl_jump" in rules({"kl": calm + [0.2]})
    assert "kl_jump" not in rules({"kl": [0.0, 0.0, 0.0, 0.0, 0.0, 0.001]})  # tiny: below KL_JUMP_MIN
    assert "kl_jump" not in rules({"kl": [0.01, 0.5]})  # too little history to call it a jump


def test_all_clipped():
    assert "all_clipped" in rules({"completions/clipped_ratio": [0.2, 1.0]})
    assert "all_clipped" not in rules({"completions/clipped_ratio": [1.0, 0.5]})


def test_reward_rising_without_correctness():
    flat_acc = [0.5] * 20
    rising = [0.5] * 10 + [0.9] * 10
    alert = rules({"reward": rising, "rewards/accuracy/mean": flat_acc, "rewards/format/mean": rising})
    assert "reward_without_correctness" in alert and "accuracy moved +0.000" in alert["reward_without_correctness"].text
    assert "reward_without_correctness" not in rules(
        {"reward": rising, "rewards/accuracy/mean": rising, "rewards/format/mean": rising}
    )
    # accuracy alone: the reward is the correctness
    assert "reward_without_correctness" not in rules({"reward": rising, "rewards/accuracy/mean": flat_acc})
    assert "reward_without_correctness" not in rules(
        {"reward": rising[-12:], "rewards/accuracy/mean": flat_acc[-12:], "rewards/format/mean": rising[-12:]}
    )


# ------------------------------------------------------------------ plots


def test_braille_chart_draws_a_rising_line():
    # 2 cells x 1 row = 4 x 4 dots: the diagonal from the bottom left to the top right
    (line,) = braille_chart([0.0, 1.0, 2.0, 3.0], width=2, height=1)
    bits = [ord(c) - BRAILLE for c in line]
    assert bits[0] == 0x40 | 0x20  # dot column 0: bottom row; dot column 1: third row
    assert bits[1] == 0x02 | 0x08  # dot column 2: second row; dot column 3: top row
    # a steep step is joined by a vertical stroke, not left as two far-apart dots
    (steep,) = braille_chart([0.0, 3.0], width=1, height=1)
    assert ord(steep) - BRAILLE == 0x40 | 0x08 | 0x10 | 0x20


def test_braille_chart_averages_a_long_run_per_column():
    # 200 values alternating 0 and 1 in 4 dot columns: each column's mean is 0.5, a flat line
    (line,) = braille_chart([0.0, 1.0] * 100, width=2, height=1, lo=0.0, hi=1.0)
    bits = [ord(c) - BRAILLE for c in line]
    assert bits == [0x02 | 0x10, 0x02 | 0x10]  # level round(1.5) = 2 of 0..3: the second dot row from the top


def test_braille_chart_shapes_and_gaps():
    lines = braille_chart([1.0, None, float("nan"), 1.0] * 30, width=20, height=3)
    assert len(lines) == 3 and all(len(line) == 20 for line in lines)
    assert braille_chart([], 5, 2) == [chr(BRAILLE) * 5] * 2
    flat = braille_chart([2.0, 2.0, 2.0], 3, 1)  # constant: drawn mid-height, not an error
    assert flat[0] != chr(BRAILLE) * 3


def test_histogram_is_symmetric_about_zero():
    bins = histogram([-1.0, -0.1, 0.0, 0.0, 0.2, 1.0, None, float("nan")], bins=5)
    assert [c for _, _, c in bins] == [1, 0, 4, 0, 1]
    assert bins[0][0] == -1.0 and bins[-1][1] == pytest.approx(1.0)
    assert [c for _, _, c in histogram([0.0, 0.0], bins=3)] == [0, 2, 0]


def test_bar_and_numbers():
    assert bar(0.5, 4) == "██  " and bar(0.0, 3) == "   " and bar(2.0, 2) == "██"
    assert len(bar(0.53, 10)) == 10
    assert compact(0.65625) == "0.6562" and compact(1216.8) == "1217" and compact(9.14e-05) == "9.14e-05"
    assert compact(float("nan")) == "NaN" and compact(None) == "-" and compact(0.0) == "0"


# ------------------------------------------------------------------ tailing


def test_tail_reads_only_complete_new_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    tail = JsonlTail(str(path))
    assert tail.read() == []  # not there yet
    with open(path, "w") as f:
        f.write(json.dumps(step(1)) + "\n" + '{"type": "st')
    assert tail.read() == [step(1)]
    assert tail.read() == []
    with open(path, "a") as f:
        f.write('ep", "step": 2, "metrics": {}}\n')
    assert tail.read() == [step(2)]
    path.write_text(json.dumps(step(9)) + "\n")  # replaced by a shorter file: read from the start
    assert tail.read() == [step(9)]


def test_follower_merges_both_files(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps(step(1)) + "\nnot json\n")
    (tmp_path / "samples.jsonl").write_text(json.dumps({"type": "samples", "step": 0, "groups": []}) + "\n")
    assert [e["type"] for e in RunFollower(str(tmp_path)).read()] == ["step", "samples"]


# ------------------------------------------------------------------ the form


def test_form_applies_edits_with_the_cli_rules():
    base = build_config({})
    cfg = form_config(
        base,
        {
            "iters": "7",
            "reward_functions": "accuracy, format",
            "reward_weights": "1 0.5",
            "learning_rate": "3e-4",
            "adapter_path": "",
        },
    )
    assert cfg.iters == 7 and cfg.reward_functions == ["accuracy", "format"] and cfg.reward_weights == [1.0, 0.5]
    assert cfg.learning_rate == 3e-4 and cfg.adapter_path is None and cfg.model == base.model
    with pytest.raises(ConfigError, match="group_size"):
        form_config(base, {"group_size": "1"})
    with pytest.raises(ConfigError, match="reward_weights"):
        form_config(base, {"reward_weights": "1 2"})
    with pytest.raises(ConfigError, match="'iters': expected int"):
        form_config(base, {"iters": "many"})


def test_form_shows_values_as_typed():
    assert shown(None) == "" and shown(1e-4) == "0.0001" and shown(["a", "b"]) == "a b" and shown(8) == "8"


# ------------------------------------------------------------------ attach never crashes on odd lines

ODD_EVENTS = [
    {"type": "step", "step": "three", "metrics": {}},
    {"type": "step", "step": 3, "metrics": [1, 2]},
    {"type": "step", "step": True, "metrics": {}},
    {"type": "samples", "step": 1, "groups": "x"},
    {"type": "samples", "step": 1, "groups": [{"completions": [{"advantage": "high", "text": "t"}]}]},
    {"type": "samples", "step": 1, "groups": [5]},
    {"type": "eval", "step": 1, "name": "before", "metrics": [0.5]},
    {"type": "eval", "step": 1, "name": "before", "metrics": {"accuracy": "most"}},
    {"type": "start", "config": "big", "total_steps": 4},
    {"type": "start", "config": {}, "total_steps": "four"},
    {"type": "end", "summary": [], "status": "finished"},
    {"type": 5},
]


def test_odd_events_are_skipped_and_said_once():
    s = RunState()
    s.apply(step(1, reward=0.5))
    for event in ODD_EVENTS:
        s.apply(event)
    assert s.steps == [1] and s.status != "finished" and not s.samples and not s.evals
    warnings = [line for level, line in s.log if level == "warning"]
    assert len(warnings) == 1 and "skipped" in warnings[0]
    assert s.skipped_events == len(ODD_EVENTS)


def test_tail_skips_json_that_is_no_event_and_says_so_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('[1, 2]\n7\n"text"\n' + json.dumps(step(1, reward=1.0)) + "\nnull\n")
    events = JsonlTail(str(path)).read()
    assert [e["type"] for e in events] == ["message", "step"]
    assert "metrics.jsonl:1" in events[0]["text"] and events[0]["level"] == "warning"
    s = RunState()
    for e in RunFollower(str(tmp_path)).read():
        s.apply(e)
    assert s.steps == [1]


def test_group_headers_show_the_question_not_the_template():
    from tui.widgets import question

    rendered = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "2+2?"},
    ]
    assert question({"prompt": conversation, "prompt_text": rendered}) == "2+2?"  # the last user message
    assert question({"prompt": "12+34=", "prompt_text": rendered}) == "12+34="
    assert question({"prompt_text": "only the text"}) == "only the text"  # an older samples.jsonl


def test_the_form_keeps_the_prompt_options_it_was_opened_with():
    """The TUI runs the trainer with the form's config: chat_template_kwargs and friends from the
    flags or -c file must survive an edit of the form."""
    from grpo_mlx import cli

    args = cli.make_parser().parse_args(
        ["tui", "--chat-template-kwargs", '{"enable_thinking": false}', "--ignore-chat-template"]
    )
    cfg = form_config(cli.config_from_args(args), {"iters": "5"})
    assert cfg.iters == 5 and cfg.chat_template_kwargs == {"enable_thinking": False} and cfg.ignore_chat_template


def test_logged_columns_show_beside_a_completion():
    line = columns_text({"judge_score": 7.0, "judge_reason": "polite\nand short", "other": None}, width=10)
    assert line == "judge_score 7  judge_reason polite an…  other n/a"


EPISODE = [
    {"role": "assistant", "text": "Let me add.", "name": None, "arguments": None, "error": False},
    {"role": "tool_call", "text": "", "name": "calculator", "arguments": {"expression": "2 + 3"}, "error": False},
    {"role": "tool", "text": "5", "name": "calculator", "arguments": None, "error": False},
    {"role": "tool_call", "text": "arguments are not JSON", "name": "calculator", "arguments": {}, "error": True},
    {"role": "tool", "text": "Error: the tool call could not be parsed", "name": "?", "arguments": None, "error": True},
    {"role": "assistant", "text": "It is 5.", "name": None, "arguments": None, "error": False},
]


def test_an_episode_shows_as_turns_told_apart_and_errors_in_red():
    from tui.widgets import ERROR_STYLE, episode_lines

    lines = episode_lines(EPISODE)
    assert [line.plain.strip() for line in lines] == [
        "Let me add.",
        "→ call calculator(expression='2 + 3')",
        "← calculator: 5",
        "→ call calculator()  arguments are not JSON",
        "← ? error: Error: the tool call could not be parsed",
        "It is 5.",
    ]
    styles = [str(line.style) for line in lines]
    assert styles[1] != styles[2] != styles[0] and ERROR_STYLE not in styles[:3] + styles[5:]
    assert styles[3] == styles[4] == ERROR_STYLE


def test_a_samples_event_with_malformed_turns_is_refused():
    event = {"type": "samples", "step": 1, "groups": [{"completions": [{"advantage": 0.0, "reward": 1.0}]}]}
    assert malformed(event) is None
    event["groups"][0]["completions"][0]["turns"] = ["not a turn"]
    assert "wrong type" in malformed(event)
