"""Custom rewards in a worker process: os._exit, a segfault or a hang costs only that call (a
RewardFunctionError naming the function), the next call gets a fresh worker, results match."""

import textwrap

import pytest

from grpo_mlx import reward_worker
from grpo_mlx.rewards import RewardFunctionError, compute_rewards, resolve_reward

BODIES = {
    "os_exit": ("import os; os._exit(7)", "exit status 7"),
    "segfault": ("import ctypes; ctypes.string_at(0)", "SIGSEGV"),
    "sys_exit": ("import sys; sys.exit(4)", "sys.exit(4)"),
    "interrupt": ("raise KeyboardInterrupt", "KeyboardInterrupt"),
    "raises": ("raise ValueError('no')", "ValueError: no"),
    "hangs": ("import time; time.sleep(60)", "no result after 3 s"),
}


def isolated(tmp_path, body, name="bad"):
    path = tmp_path / f"{name}.py"
    path.write_text(
        textwrap.dedent(f"""
        calls = []
        def {name}(prompts, completions, **kw):
            if kw.get("answer") == ["crash"]:
                {body}
            return [float(len(c)) for c in completions]
    """)
    )
    spec = f"{path}:{name}"
    fns = reward_worker.isolate([spec], [resolve_reward(spec)], timeout=3.0)
    assert isinstance(fns[0][1], reward_worker.ProcessReward)
    return fns


@pytest.mark.parametrize("kind", sorted(BODIES))
def test_a_crash_costs_only_that_call(kind, tmp_path):
    body, expected = BODIES[kind]
    fns = isolated(tmp_path, body)
    try:
        with pytest.raises(RewardFunctionError) as e:
            compute_rewards(fns, None, ["p"], ["abc"], {"answer": ["crash"]}, timeout=3.0)
        assert "'bad'" in str(e.value) and expected in str(e.value), str(e.value)
        again = compute_rewards(fns, None, ["p", "p"], ["ab", "abcd"], {"answer": ["ok", "ok"]}, timeout=3.0)
        assert again.total.tolist() == [2.0, 4.0]  # the trainer process, and the next call, are fine
    finally:
        reward_worker.close_all(fns)


def test_builtins_stay_in_the_trainer(tmp_path):
    fns = reward_worker.isolate(["accuracy"], [resolve_reward("accuracy")], timeout=1.0)
    assert not isinstance(fns[0][1], reward_worker.ProcessReward)


def test_a_worker_that_cannot_import_says_so(tmp_path):
    path = tmp_path / "gone.py"
    path.write_text("def f(prompts, completions, **kw):\n    return [0.0] * len(completions)\n")
    fn = reward_worker.ProcessReward(f"{path}:f", "f", {}, timeout=30)
    path.unlink()
    try:
        with pytest.raises(RuntimeError, match="in its worker process"):
            fn(prompts=["p"], completions=["c"])
    finally:
        fn.close()
