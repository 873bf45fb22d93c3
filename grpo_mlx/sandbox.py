"""Run model-written Python against tests, in a separate, limited process.

What confines the child, where the OS allows it:
- an audit hook (PEP 578) installed before the code runs: starting processes, forking, opening
  sockets, sending signals and writing files outside the working directory end the program at
  once with status 99, so such a completion is scored as failing even when its tests would pass;
- its own process group, killed whole at the time limit (endless loops, forked children);
- resource limits: CPU seconds, address space, file size, open files, processes, no core dumps;
- a fresh temporary directory as cwd and HOME, a minimal environment, `python -I` (no user site,
  no PYTHON* variables, the script's directory not on sys.path);
- when run as root on Linux: a new network namespace (no network at all) and the uid of `nobody`,
  so the process limit applies (it does not bind root) and the project's files are read-only.
On macOS the address-space limit is not enforced and there are no namespaces; the time limit,
process group and temporary directory still hold. Not a security boundary against a determined
attacker with kernel exploits: a guard against the accidents and tricks of generated code.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

CLONE_NEWNET = 0x40000000
NOBODY = 65534
BLOCKED_EXIT = 99
BLOCKED_EVENTS = {
    "os.system",
    "os.fork",
    "os.forkpty",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "os.kill",
    "os.killpg",
    "subprocess.Popen",
    "socket.connect",
    "socket.bind",
    "socket.sendto",
    "pty.spawn",
    "os.chmod",
    "os.chown",
    "shutil.rmtree",
    "os.remove",
    "os.rename",
    "os.rmdir",
}
# Runs first in the child: install the hook, then run the solution as __main__.
GUARD = f"""
import os, sys
ROOT = os.path.realpath(os.getcwd())
BLOCKED = {sorted(BLOCKED_EVENTS)!r}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def stop(what):
    sys.stderr.write("sandbox: blocked " + what + "\\n")
    sys.stderr.flush()
    os._exit({BLOCKED_EXIT})

def guard(event, args):
    if event in BLOCKED:
        stop(event)
    if event == "open" and isinstance(args[0], (str, bytes)):
        mode, flags = args[1], args[2]
        writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & WRITE_FLAGS)
        path = os.fsdecode(args[0])
        if writes and not os.path.realpath(path).startswith(ROOT + os.sep):
            stop("write to " + path)

sys.addaudithook(guard)
import runpy
runpy.run_path(sys.argv[1], run_name="__main__")
"""
FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


@dataclass
class RunResult:
    passed: bool
    reason: str  # "passed", "failed", "timeout", "blocked"
    output: str  # the tail of stdout + stderr


def extract_code(text: str) -> str:
    """The last fenced Python block of a completion, or the whole text when there is none."""
    blocks = FENCE.findall(text)
    return blocks[-1] if blocks else text


def _others_can_run(path: str) -> bool:
    """Whether a user with no rights of its own (nobody) can execute `path`."""
    path = os.path.realpath(path)
    parts = path.split(os.sep)
    for i in range(2, len(parts)):
        if not os.stat(os.sep.join(parts[:i])).st_mode & 0o001:
            return False
    return os.stat(path).st_mode & 0o005 == 0o005


def interpreter(drop_privileges: bool) -> str:
    """The Python that runs generated code. As root we switch to `nobody`, who may not reach a
    virtualenv under /root: then the system Python runs it (the code needs only the stdlib)."""
    if not drop_privileges or _others_can_run(sys.executable):
        return sys.executable
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(candidate) and _others_can_run(candidate):
            return candidate
    raise RuntimeError(
        "no Python interpreter that the unprivileged user 'nobody' can run; "
        "install python3 system-wide or run grpo-mlx as a normal user"
    )


def _drop_privileges() -> bool:
    return sys.platform.startswith("linux") and os.geteuid() == 0


def _limit(cpu_seconds: int, memory_mb: int, max_processes: int):
    def apply():
        import resource

        os.setsid()
        limits = [
            (resource.RLIMIT_CPU, cpu_seconds),
            (resource.RLIMIT_FSIZE, 16 * 2**20),
            (resource.RLIMIT_NOFILE, 64),
            (resource.RLIMIT_CORE, 0),
        ]
        if sys.platform.startswith("linux"):
            limits.append((resource.RLIMIT_AS, memory_mb * 2**20))
        for kind, value in limits:
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(kind, (value, value))
        if _drop_privileges():
            ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNET)  # no network; best effort
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NPROC, (max_processes, max_processes))

    return apply


def run_python(
    code: str, tests: str = "", timeout: float = 5.0, memory_mb: int = 512, max_processes: int = 16
) -> RunResult:
    """Run `code` followed by `tests` (e.g. asserts); passed means exit status 0 in time."""
    with tempfile.TemporaryDirectory(prefix="grpo-mlx-sandbox-") as work:
        os.chmod(work, 0o777)  # writable for `nobody` too
        script = os.path.join(work, "solution.py")
        with open(script, "w", encoding="utf-8") as f:
            f.write(code + "\n\n" + tests + "\n")
        guard = os.path.join(work, "_guard.py")
        with open(guard, "w", encoding="utf-8") as f:
            f.write(GUARD)
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}
        proc = subprocess.Popen(
            [interpreter(_drop_privileges()), "-I", "-B", guard, script],
            cwd=work,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=_limit(int(timeout) + 1, memory_mb, max_processes),
        )
        try:
            out, _ = proc.communicate(timeout=timeout)
            reason = {0: "passed", BLOCKED_EXIT: "blocked"}.get(proc.returncode, "failed")
        except subprocess.TimeoutExpired:
            out, reason = b"", "timeout"
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # the child and anything it forked
            proc.wait()
        return RunResult(reason == "passed", reason, out.decode("utf-8", "replace")[-2000:])


def code_reward(timeout: float = 5.0, memory_mb: int = 512, tests_column: str = "tests", **_):
    """Built-in reward `code`: 1.0 when the completion's Python passes the example's tests
    (the `tests` column: code such as asserts, run after the completion's code), else 0.0;
    None for examples without tests."""

    def code(prompts, completions, **columns):
        from grpo_mlx.rewards import completion_text

        tests = columns.get(tests_column) or [None] * len(completions)
        scores = []
        for completion, test in zip(completions, tests):
            if test is None:
                scores.append(None)
                continue
            result = run_python(extract_code(completion_text(completion)), str(test), timeout, memory_mb)
            scores.append(1.0 if result.passed else 0.0)
        return scores

    return code
