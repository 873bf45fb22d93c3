"""Custom reward functions in a worker process of their own (`reward_isolation: process`).

A function that calls os._exit(), segfaults, or hangs past the timeout then costs only that
call: the worker is gone (or killed), the call fails like a function that raised (a
RewardFunctionError naming the function, so the trainer saves a checkpoint and stops or skips
the step), and the next call starts a fresh worker. The worker imports the function again from
its spec (file.py:fn or module:fn), so nothing needs pickling but the batch. The 'spawn' start
method is used: a forked copy of a process running MLX threads is unsafe, and spawn is what
macOS uses anyway. No MLX import here or in the worker.
"""

from __future__ import annotations

import asyncio
import inspect
import multiprocessing
import signal
from typing import Any

from grpo_mlx.rewards import BUILTIN_REWARDS, RewardFn
from grpo_mlx.rewards.context import extra_logger


class WorkerDied(RuntimeError):
    """The worker process ended without a result (os._exit, a crash, a kill)."""


def _serve(conn, spec: str, options: dict) -> None:
    """Worker loop: resolve the function once, then answer one batch per request with
    ("ok", values) or ("error", (exception type name, message))."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle
    from grpo_mlx.rewards import resolve_reward

    try:
        _, fn = resolve_reward(spec, **options)
    except Exception as e:
        fn, failure = None, (type(e).__name__, f"in its worker process: {e}")
    while True:
        try:
            kwargs = conn.recv()
        except EOFError:
            return
        if fn is None:
            conn.send(("error", failure))
            continue
        metrics, extra = [], {}  # what the function logs, replayed in the trainer with the result
        kwargs.update(log_metric=lambda name, value, into=metrics: into.append((name, value)))
        kwargs.update(log_extra=extra_logger(extra))
        try:
            values = fn(**kwargs)
            if inspect.isawaitable(values):  # an async def function: its own loop, in its own process
                values = asyncio.run(values)
            conn.send(("ok", (values, metrics, extra)))
        except BaseException as e:  # noqa: BLE001 - sys.exit() and KeyboardInterrupt are the function's failures too
            message = f"called sys.exit({e.code!r})" if isinstance(e, SystemExit) else str(e)
            conn.send(("error", (type(e).__name__, message)))


def _remote_error(type_name: str, message: str) -> Exception:
    """An exception that reads like the one the worker saw (its class cannot always be pickled)."""
    return type(type_name, (RuntimeError,), {})(message)


class ProcessReward:
    """A callable with a reward function's signature that runs it in a worker process."""

    runs_in_process = True  # rewards._call_with_timeout leaves the time limit to it

    def __init__(self, spec: str, name: str, options: dict, timeout: float | None):
        self.spec, self.__name__, self.options = spec, name, options
        self.timeout = timeout or None
        self.context = multiprocessing.get_context("spawn")
        self.process = None
        self.conn = None

    def _start(self) -> None:
        parent, child = self.context.Pipe()
        self.process = self.context.Process(
            target=_serve, args=(child, self.spec, self.options), daemon=True, name=f"reward-{self.__name__}"
        )
        self.process.start()
        child.close()
        self.conn = parent

    def _died(self) -> WorkerDied:
        self.process.join(1)
        code = self.process.exitcode
        if code is not None and code < 0:
            try:
                how = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"killed by signal {-code}"
        else:
            how = f"exit status {code}"
        self.close()
        return WorkerDied(f"its worker process ended without a result ({how})")

    def __call__(self, **kwargs: Any):
        # the logging callables cannot cross to the worker: it records the calls, they are replayed here
        log_metric, log_extra = kwargs.pop("log_metric", None), kwargs.pop("log_extra", None)
        if self.process is None or not self.process.is_alive():
            self._start()
        try:
            self.conn.send(kwargs)
            ready = self.conn.poll(self.timeout)
        except (BrokenPipeError, EOFError, ConnectionResetError):
            raise self._died() from None
        if not ready:
            self.close()  # unlike a thread, a process can be stopped: the next call starts afresh
            raise TimeoutError(f"no result after {self.timeout:g} s (its worker process was stopped)")
        try:
            status, value = self.conn.recv()
        except (EOFError, ConnectionResetError, OSError):
            raise self._died() from None
        if status == "error":
            raise _remote_error(*value)
        values, metrics, extra = value
        for name, number in metrics:
            if log_metric is not None:
                log_metric(name, number)
        for column, column_values in extra.items():
            if log_extra is not None:
                log_extra(column, column_values)
        return values

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.process is not None:
            if self.process.is_alive():
                self.process.kill()
            self.process.join(5)
            self.process = None


def isolate(
    specs: list[str], reward_fns: list[tuple[str, RewardFn]], timeout: float | None, **options
) -> list[tuple[str, RewardFn]]:
    """The same (name, function) list with every custom function moved to a worker process;
    built-ins stay in the trainer (they are ours, and `code` has its own sandbox)."""
    out = []
    for spec, (name, fn) in zip(specs, reward_fns, strict=True):
        if spec.strip() in BUILTIN_REWARDS:
            out.append((name, fn))
        else:
            out.append((name, ProcessReward(spec.strip(), name, options, timeout)))
    return out


def close_all(reward_fns: list[tuple[str, RewardFn]]) -> None:
    for _, fn in reward_fns:
        if isinstance(fn, ProcessReward):
            fn.close()
