"""The real `grpo-mlx tui` in a real terminal (tmux): start the demo with one key, watch a short
run reach its last step and end, then quit. Runs real training, so it is marked slow."""

import os
import shutil
import subprocess
import sys
import time

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (.ci/run installs it)"),
]


class Tmux:
    """One detached tmux session on a private server socket, so the command inherits this
    test's environment and the user's own tmux sessions are left alone."""

    def __init__(self, name: str):
        self.socket = f"grpo-tui-test-{os.getpid()}-{name}"

    def __call__(self, *args: str) -> str:
        out = subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, timeout=30)
        return out.stdout

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "tui")

    def wait_for(self, *texts: str, timeout: float = 120) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            screen = self.screen()
            if all(t in screen for t in texts):
                return screen
            time.sleep(0.5)
        raise AssertionError(f"never saw {texts} on screen; last screen:\n{self.screen()}")

    def kill(self) -> None:
        self("kill-server")


def test_real_app_runs_the_demo_in_tmux(tmp_path):
    run_dir = tmp_path / "run"
    command = (
        f"{sys.executable} -m grpo_mlx tui --iters 3 --eval-limit 20 --adapter-path {run_dir}; echo EXITED-$?; sleep 60"
    )
    tmux = Tmux("demo")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TERM": "xterm-256color"}
    subprocess.run(
        ["tmux", "-L", tmux.socket, "new-session", "-d", "-s", "tui", "-x", "120", "-y", "40", command],
        check=True,
        env=env,
        cwd=tmp_path,
        timeout=30,
    )
    try:
        tmux.wait_for("Start training", "steps (iters)", timeout=60)
        tmux("send-keys", "-t", "tui", "s")
        screen = tmux.wait_for("FINISHED", "step 3/3", timeout=180)
        assert "reward (total)" in screen and "✓ no warnings" in screen
        tmux("send-keys", "-t", "tui", "3")  # the samples of the last step
        screen = tmux.wait_for("step 3  (latest)", "prompt:", timeout=30)
        assert "advantage" in screen
        tmux("send-keys", "-t", "tui", "q")  # the run has ended: quits without asking
        tmux.wait_for("EXITED-0", timeout=30)
    finally:
        tmux.kill()
    assert (run_dir / "adapters.safetensors").exists() and (run_dir / "summary.json").exists()
