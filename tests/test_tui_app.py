"""The dashboard app driven by scripted events (Textual's Pilot, no MLX): the configuration
screen, the dashboard's panels, the controls, quitting, attaching, snapshots, and the import
rules (the library never imports Textual; the first screen paints before MLX is imported).

Snapshots are our own: the screen rendered as plain text (the same compositor output that
`App.export_screenshot` turns into SVG) compared with files in tests/test_tui_snapshots/.
After an intended change, regenerate them with GRPO_TUI_UPDATE_SNAPSHOTS=1 and review the diff.
"""

import asyncio
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from grpo_mlx.config import build_config
from tui.app import ConfirmQuit, DashboardScreen, GrpoApp
from tui.config_form import ConfigScreen
from tui.widgets import Chart

SNAPSHOTS = Path(__file__).parent / "test_tui_snapshots"
SIZE = (120, 40)


def run(coro):
    return asyncio.run(coro)


def screen_text(app) -> str:
    width, height = app.size
    console = Console(
        width=width,
        height=height,
        file=io.StringIO(),
        force_terminal=True,
        record=True,
        color_system=None,
        legacy_windows=False,
    )
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return "\n".join(line.rstrip() for line in console.export_text().splitlines())


async def press(pilot, *keys) -> str:
    """Press the keys, let the app settle, and return the screen's text."""
    await pilot.press(*keys)
    await pilot.pause()
    return screen_text(pilot.app)


def check_snapshot(app, name: str) -> None:
    text = screen_text(app)
    path = SNAPSHOTS / f"{name}.txt"
    if os.environ.get("GRPO_TUI_UPDATE_SNAPSHOTS"):
        SNAPSHOTS.mkdir(exist_ok=True)
        path.write_text(text + "\n", encoding="utf-8")
    assert path.exists(), f"no snapshot {path}; create it with GRPO_TUI_UPDATE_SNAPSHOTS=1"
    assert text + "\n" == path.read_text(encoding="utf-8"), f"screen differs from {path}"


# ------------------------------------------------------------------ scripted events


def completion(text, reward, advantage, length=3, finish="stop"):
    return {
        "text": text,
        "rewards": {"accuracy": reward, "format": 0.5},
        "reward": reward + 0.5,
        "advantage": advantage,
        "length": length,
        "finish_reason": finish,
    }


def scripted_run(steps=12, total=20, zero_std=0.25):
    """Events as the trainer emits them: start, eval, and per step its samples then the step."""
    events = [
        {
            "type": "start",
            "run_dir": "runs/demo",
            "model": "demo-model",
            "blas": "OpenBLAS",
            "config": {"batch_size": 2, "group_size": 4, "loss_type": "grpo", "beta": 0.04},
            "total_steps": total,
            "start_step": 0,
        },
        {"type": "eval", "step": 0, "name": "before", "metrics": {"n": 20, "accuracy": 0.45, "mean_reward": 0.45}},
    ]
    for i in range(steps):
        acc = 0.4 + 0.04 * i
        groups = [
            {
                "prompt": f"{10 + i}+{20 + i}",
                "prompt_text": f"{10 + i}+{20 + i}=",
                "answer": str(30 + 2 * i),
                "completions": [
                    completion(str(30 + 2 * i), 1.0, 0.87),
                    completion("31", 0.0, -0.87),
                    completion(str(30 + 2 * i), 1.0, 0.87),
                    completion("2", 0.0, -0.87, 8, "length"),
                ],
            },
            {
                "prompt": "5+5",
                "prompt_text": "5+5=",
                "answer": "10",
                "completions": [completion("10", 1.0, 0.0) for _ in range(4)],
            },
        ]
        events.append({"type": "samples", "step": i + 1, "groups": groups})
        events.append(
            {
                "type": "step",
                "step": i + 1,
                "metrics": {
                    "reward": acc + 0.5,
                    "reward_std": 0.4 - 0.01 * i,
                    "frac_reward_zero_std": zero_std,
                    "kl": 0.001 * i,
                    "loss": 0.01 * ((-1) ** i),
                    "grad_norm": 2.0 - 0.1 * i,
                    "learning_rate": 1e-4,
                    "completions/mean_length": 3.0 + 0.1 * i,
                    "completions/clipped_ratio": 0.125,
                    "clip_ratio/region_mean": 0.0,
                    "step_time": 0.5,
                    "tokens_per_second": 1200.0,
                    "peak_memory_gb": 0.16,
                    "rewards/accuracy/mean": acc,
                    "rewards/format/mean": 0.5,
                },
            }
        )
    return events


# ------------------------------------------------------------------ configuration screen


def test_config_screen_edits_validates_and_starts(monkeypatch):
    started = []
    monkeypatch.setattr(GrpoApp, "start_run", lambda self, cfg: started.append(cfg))

    async def go():
        app = GrpoApp(config=build_config({}))
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            screen = app.screen
            assert isinstance(screen, ConfigScreen)
            assert app.screen.query_one("#field-group_size").value == "8"
            assert "valid" in str(app.screen.query_one("#error").render())
            app.screen.query_one("#field-group_size").value = "1"
            await pilot.pause()
            error = str(app.screen.query_one("#error").render())
            assert "'group_size' = 1: must be at least 2" in error
            await pilot.press("ctrl+s")
            assert started == []  # refused while invalid
            app.screen.query_one("#field-group_size").value = "4"
            app.screen.query_one("#field-iters").value = "3"
            await pilot.pause()
            await pilot.press("ctrl+s")
            assert len(started) == 1 and started[0].group_size == 4 and started[0].iters == 3

    run(go())


def test_config_screen_refuses_a_run_the_memory_plan_refuses(tmp_path, monkeypatch):
    from grpo_mlx.config import DEMO_DATA

    model = tmp_path / "huge"  # a 72B-like float32 config.json, no weights: far more than any machine has
    model.mkdir()
    config = {"model_type": "qwen2", "hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80,
              "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 152064}  # fmt: skip
    (model / "config.json").write_text(json.dumps(config), encoding="utf-8")
    started = []
    monkeypatch.setattr(GrpoApp, "start_run", lambda self, cfg: started.append(cfg))

    async def go():
        app = GrpoApp(config=build_config({"model": str(model), "data": DEMO_DATA}))
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            await pilot.press("ctrl+s")
            await pilot.pause()
            assert started == []  # refused before the model loads
            error = str(app.screen.query_one("#error").render())
            assert "predicted to need" in error and "--ignore-memory-plan" in error

    run(go())


def test_config_screen_starts_with_one_key(monkeypatch):
    started = []
    monkeypatch.setattr(GrpoApp, "start_run", lambda self, cfg: started.append(cfg))

    async def go():
        app = GrpoApp(config=build_config({}))
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            await pilot.press("s")
            assert [c.iters for c in started] == [200]

    run(go())


def test_config_screen_shows_a_config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("batch_size: 3\nloss_type: dapo\nreward_functions: [accuracy, format]\n")

    async def go():
        app = GrpoApp(config=build_config({}, str(path)), source=str(path))
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            assert app.screen.query_one("#field-batch_size").value == "3"
            assert app.screen.query_one("#field-loss_type").value == "dapo"
            assert app.screen.query_one("#field-reward_functions").value == "accuracy format"
            assert str(path) in str(app.screen.query_one("#intro").render())

    run(go())


def test_config_screen_snapshot():
    async def go():
        app = GrpoApp(config=build_config({}))
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            text = screen_text(app)
            # the demo's absolute paths differ between checkouts: compare the rest
            app.screen.query_one("#field-model").value = "demo-model"
            app.screen.query_one("#field-data").value = "demo-data"
            await pilot.pause()
            check_snapshot(app, "config")
            assert "group size (G)" in text

    run(go())


# ------------------------------------------------------------------ dashboard


def test_dashboard_shows_progress_charts_advantages_and_samples(tmp_path):
    async def go():
        app = GrpoApp(attach=str(tmp_path))
        async with app.run_test(size=SIZE) as pilot:
            app.feed_many(scripted_run())
            await pilot.pause()
            text = screen_text(app)
            assert "step 12/20" in text and "1,200 tok/s" in text and "ETA 0:04" in text
            charts = {c.metric for c in app.screen.query(Chart)}
            assert {"rewards/accuracy/mean", "rewards/format/mean", "kl", "completions/clipped_ratio"} <= charts
            assert "reward: accuracy" in text and "0.84" in text  # the accuracy chart's latest value
            text = await press(pilot, "2")
            assert "distribution of 8 advantages (2 groups)" in text
            assert "group 1: 21+31   answer 52" in text and "+0.87" in text  # the question, not prompt_text
            text = await press(pilot, "3")
            assert "step 12  (latest)" in text and "prompt: 21+31=" in text
            assert "advantage -0.870  total 0.5  accuracy 0  format 0.5  len 8  length (cut)" in text
            text = await press(pilot, "left_square_bracket", "left_square_bracket")
            assert "step 10  (10 of 12 logged)" in text and "prompt: 19+29=" in text
            app.feed_many(scripted_run(steps=13)[-2:])  # a new step arrives while browsing
            await pilot.pause()
            assert "step 10  (10 of 13 logged)" in screen_text(app)
            await press(pilot, "end")
            assert "step 13  (latest)" in screen_text(app)
            await press(pilot, "4")
            assert "held-out (before, 20 prompts, greedy): accuracy 45.0%" in screen_text(app)

    run(go())


def test_option_charts_appear_when_their_metric_is_logged(tmp_path):
    async def go():
        app = GrpoApp(attach=str(tmp_path))
        async with app.run_test(size=SIZE) as pilot:
            events = scripted_run(steps=3)
            app.feed_many(events)
            await pilot.pause()
            charts = {c.metric for c in app.screen.query(Chart)}
            assert "entropy_coef" not in charts and "sampling/sampling_logp_difference/mean" not in charts
            step = {**events[-1], "step": 4}
            step["metrics"] = {**step["metrics"], "entropy_coef": 0.03, "sampling/sampling_logp_difference/mean": 2e-6,
                               "concise_correct/mean_tokens": 3.1, "time/rollout": 0.2,
                               "tools/calls": 0.75, "tools/cut_at_max_turns": 0.0}  # fmt: skip
            app.feed_many([step])
            await pilot.pause()
            charts = {c.metric for c in app.screen.query(Chart)}
            assert {"entropy_coef", "sampling/sampling_logp_difference/mean"} <= charts
            assert "concise_correct/mean_tokens" in charts, "what a reward function logs (log_metric) is charted"
            titles = {c.metric: c.title for c in app.screen.query(Chart)}
            assert titles["concise_correct/mean_tokens"] == "logged: concise_correct/mean_tokens"
            assert titles["tools/calls"] == "tool calls per episode"  # the trainer's, not a user's
            assert titles["tools/cut_at_max_turns"] == "episodes cut at max turns" and "tools/errors" not in charts
            assert "time/rollout" not in charts
            assert "entropy_mask/kept_mean" not in charts  # only what the run logs

    run(go())


def test_samples_tab_shows_an_episode_as_turns(tmp_path):
    """A scripted samples event whose completion is a multi-turn episode: the tab shows its
    turns (text, the call with its arguments, the result, a failed call) instead of the flat text."""
    turns = [
        {"role": "tool_call", "text": "", "name": "calculator", "arguments": {"expression": "2 + 3"}, "error": False},
        {"role": "tool", "text": "5", "name": "calculator", "arguments": None, "error": False},
        {"role": "tool_call", "text": "", "name": "nosuch", "arguments": {}, "error": False},
        {"role": "tool", "text": "Error: there is no tool named 'nosuch'", "name": "nosuch", "error": True},
        {"role": "assistant", "text": "The answer is 5.", "name": None, "arguments": None, "error": False},
    ]
    flat = "FLAT TEXT OF THE EPISODE"
    completion = {"text": flat, "rewards": {"accuracy": 1.0}, "reward": 1.0, "advantage": 0.5, "length": 40,
                  "finish_reason": "stop", "turns": turns}  # fmt: skip
    plain = {**completion, "text": "a single-turn answer", "advantage": -0.5, "turns": None}
    group = {"prompt": "What is 2 + 3?", "prompt_text": "What is 2 + 3?", "answer": "5",
             "completions": [completion, plain]}  # fmt: skip

    async def go():
        app = GrpoApp(attach=str(tmp_path))
        async with app.run_test(size=SIZE) as pilot:
            app.feed_many([*scripted_run(steps=1), {"type": "samples", "step": 2, "groups": [group]}])
            await pilot.pause()
            text = await press(pilot, "3")
            assert "step 2  (latest)" in text and flat not in text
            lines = [line.strip() for line in text.splitlines()]
            at = lines.index("→ call calculator(expression='2 + 3')")
            assert lines[at + 1 : at + 5] == [
                "← calculator: 5",
                "→ call nosuch()",
                "← nosuch error: Error: there is no tool named 'nosuch'",
                "The answer is 5.",
            ]
            assert "a single-turn answer" in text  # a completion without turns shows its text

    run(go())


def test_dashboard_snapshots(tmp_path):
    async def go():
        app = GrpoApp(attach=str(tmp_path))
        async with app.run_test(size=SIZE) as pilot:
            app.feed_many(scripted_run())
            await pilot.pause()
            check_snapshot(app, "dashboard_charts")
            await press(pilot, "2")
            check_snapshot(app, "dashboard_advantages")
            await press(pilot, "3")
            check_snapshot(app, "dashboard_samples")

    run(go())


def test_health_warnings_are_visible(tmp_path):
    async def go():
        app = GrpoApp(attach=str(tmp_path))
        async with app.run_test(size=SIZE) as pilot:
            events = scripted_run(steps=4, zero_std=0.75)
            events[-1]["metrics"]["loss"] = None  # NaN, as the run files write it
            app.feed_many(events)
            await pilot.pause()
            text = screen_text(app)
            assert "most groups had identical rewards for 3+ steps (75% in the last)" in text
            assert "✖ loss NaN at 1 step(s) (4)" in text
            assert "NaN! 0.01" in text  # the loss chart's title flags it too

    run(go())


def test_a_burst_of_steps_is_drawn_once(tmp_path, monkeypatch):
    draws = []
    original = DashboardScreen.show
    monkeypatch.setattr(
        DashboardScreen, "show", lambda self, state, events: (draws.append(len(events)), original(self, state, events))
    )

    async def go():
        app = GrpoApp(attach=str(tmp_path))
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            draws.clear()
            for event in scripted_run(steps=200, total=200):  # one message per event, as the bus does
                app.feed(event)
            await pilot.pause()
            assert app.state.step == 200
            assert sum(draws) == 402 and len(draws) <= 3, draws

    run(go())


def test_attach_follows_the_files(tmp_path):
    events = scripted_run(steps=3, total=5)
    metrics = [e for e in events if e["type"] != "samples"]
    samples = [e for e in events if e["type"] == "samples"]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in metrics[:-1]) + '{"type": "st')
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(e) + "\n" for e in samples))

    async def wait_for(pilot, condition):
        for _ in range(50):
            await pilot.pause(0.1)
            if condition():
                return True
        return False

    async def go():
        app = GrpoApp(attach=str(tmp_path))
        async with app.run_test(size=SIZE) as pilot:
            assert await wait_for(pilot, lambda: app.state.step == 2)
            assert "ATTACHED" not in screen_text(app) and "step 2/5" in screen_text(app)
            with open(tmp_path / "metrics.jsonl", "a") as f:  # the writer finishes its line, then ends
                f.write(json.dumps(metrics[-1])[len('{"type": "st') :] + "\n")
                f.write(json.dumps({"type": "end", "step": 3, "summary": {}, "status": "finished"}) + "\n")
            assert await wait_for(pilot, lambda: app.state.status == "finished")
            assert "FINISHED" in screen_text(app) and "step 3/5" in screen_text(app)
            await pilot.press("p")  # controls belong to runs started here
            await pilot.pause()
            assert not app.controls.pause.is_set()
            await pilot.press("q")  # nothing running here: quits without asking
            await pilot.pause()
        assert app.return_code == 0

    run(go())


# ------------------------------------------------------------------ controls of a live run


@pytest.fixture
def fake_trainer(monkeypatch):
    """Replaces the training worker: records the controls the trainer would receive."""
    calls = []
    monkeypatch.setattr(GrpoApp, "train", lambda self, cfg, controls: calls.append((cfg, controls)))
    return calls


def test_pause_resume_save_and_stop(fake_trainer):
    async def go():
        app = GrpoApp(config=build_config({"iters": 20}))
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            await pilot.press("s")  # start
            await pilot.pause()
            assert isinstance(app.screen, DashboardScreen) and app.state.status == "loading"
            ((cfg, controls),) = fake_trainer
            assert cfg.iters == 20
            app.feed_many(scripted_run(steps=2))
            await pilot.pause()
            await pilot.press("p")
            assert controls.pause.is_set() and app.state.status == "pausing"
            app.feed_many(scripted_run(steps=3)[-2:])  # the step under way completes
            await pilot.pause()
            assert app.state.status == "paused" and "PAUSED" in screen_text(app)
            await pilot.press("p")
            assert not controls.pause.is_set() and app.state.status == "running"
            await pilot.press("s")
            assert controls.save_now.is_set()
            await pilot.press("x")
            assert controls.stop.is_set() and app.state.status == "stopping"
            assert "stopping after this step" in screen_text(app)
            app.feed({"type": "checkpoint", "step": 4, "path": "runs/demo/checkpoints/step_0000004"})
            app.feed({"type": "end", "step": 4, "summary": {}, "status": "stopped"})
            await pilot.pause()
            assert app.state.status == "stopped" and "STOPPED" in screen_text(app)

    run(go())


def test_quitting_an_active_run_asks_first(fake_trainer):
    async def go():
        app = GrpoApp(config=build_config({}))
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            await press(pilot, "s")
            app.feed_many(scripted_run(steps=1))
            await pilot.pause()
            await press(pilot, "q")
            assert isinstance(app.screen, ConfirmQuit)
            await pilot.press("escape")  # cancel
            await pilot.pause()
            assert isinstance(app.screen, DashboardScreen) and app.is_running
            await press(pilot, "q")
            await pilot.click("#stop")  # stop, save, then quit when the run has ended
            await pilot.pause()
            ((_, controls),) = fake_trainer
            assert controls.stop.is_set() and app.is_running
            app.feed({"type": "end", "step": 1, "summary": {}, "status": "stopped"})
            await pilot.pause()
        assert app.return_code == 0 and app.state.status == "stopped"

    run(go())


def test_a_failing_run_is_reported(monkeypatch):
    def failing(self, cfg, controls):  # what the worker feeds when the trainer raises
        self.feed({"type": "message", "level": "error", "text": "model not found: nowhere"})
        self.feed({"type": "end", "step": 0, "summary": {}, "status": "failed"})

    monkeypatch.setattr(GrpoApp, "train", failing)

    async def go():
        app = GrpoApp(config=build_config({}))
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            await press(pilot, "s")
            text = await press(pilot, "4")
            assert "FAILED" in text and "error: model not found: nowhere" in text

    run(go())


# ------------------------------------------------------------------ import rules


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent
    )


def test_library_never_imports_textual():
    code = (
        "import importlib, pkgutil, sys, grpo_mlx\n"
        "for m in pkgutil.walk_packages(grpo_mlx.__path__, 'grpo_mlx.'):\n"
        "    if not m.name.endswith('__main__'):\n"
        "        importlib.import_module(m.name)\n"
        "from grpo_mlx.cli import make_parser\n"
        "make_parser()  # imports every command module, tui.cli included\n"
        "print(sorted(k for k in sys.modules if k == 'textual' or k.startswith('textual.')))\n"
    )
    out = python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_first_screen_paints_before_mlx_is_imported():
    code = (
        "import asyncio, sys\n"
        "import tui.app\n"
        "assert 'mlx' not in sys.modules and 'mlx_lm' not in sys.modules, 'imported by tui.app'\n"
        "from grpo_mlx.config import build_config\n"
        "async def main():\n"
        "    app = tui.app.GrpoApp(config=build_config({}))\n"
        "    async with app.run_test() as pilot:\n"
        "        await pilot.pause()\n"
        "        assert type(app.screen).__name__ == 'ConfigScreen'\n"
        "        assert app.screen.query_one('#start').region.area > 0  # laid out and painted\n"
        "        print(sorted(k for k in sys.modules if k.split('.')[0] in ('mlx', 'mlx_lm')))\n"
        "asyncio.run(main())\n"
    )
    out = python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
