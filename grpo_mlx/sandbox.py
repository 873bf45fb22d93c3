"""Run model-written Python inside an operating-system sandbox, and judge it against tests.

The wall is the OS, not Python (an audit hook is bypassed by ctypes and by patching it):
- Linux: bubblewrap. New user, pid, network, ipc, uts and cgroup namespaces (no network at
  all; signals reach only the sandbox's own processes); a root of nothing but read-only binds
  of an allow-list (/usr, /lib*, the base interpreter's prefix without its site-packages,
  ld.so.cache, localtime) and a size-limited tmpfs as the work dir, the only writable place;
  no /proc, no /tmp, no home, no project; a seccomp filter that refuses to start processes
  (bounds fork bombs even as root, where RLIMIT_NPROC does not apply); --die-with-parent.
- macOS: `sandbox-exec` with a generated Seatbelt profile (grpo_mlx/sandbox_profiles.py).
- Both: CPU, address-space, file-size and open-file limits, set by the harness before any
  model code runs; a wall-clock limit that kills the whole tree; bounded output capture.
Without an OS sandbox nothing runs: `backend()` raises, naming what to install, unless
GRPO_MLX_UNSAFE_NO_SANDBOX=1 (rlimits only, with a warning).

The verdict of `run_tests` is not the exit status nor anything printed: the harness runs every
test statement and only then reads a per-run random token from an inherited descriptor and
writes it on a second one that only the parent reads. Limits: the solution runs in the same
interpreter, so code that knows this protocol can read the token descriptor itself.
"""

from __future__ import annotations

import ast
import contextlib
import os
import platform
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from grpo_mlx.errors import UserError
from grpo_mlx.sandbox_profiles import seatbelt_profile, seccomp_filter

UNSAFE_ENV = "GRPO_MLX_UNSAFE_NO_SANDBOX"
BOX = "/box"  # the work dir inside the Linux sandbox
FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)
# Runs first in the child, as `python -I -S -B -c HARNESS mode limits... token_fd verdict_fd`.
HARNESS = r"""
import ast, builtins, os, resource, sys
def main():
    mode, *nums = sys.argv[1:]
    cpu, mem, fsize, nofile, token_fd, verdict_fd = map(int, nums)
    for kind, soft, hard in ((resource.RLIMIT_CPU, cpu, cpu + 1), (resource.RLIMIT_AS, mem, mem),
                             (resource.RLIMIT_FSIZE, fsize, fsize), (resource.RLIMIT_CORE, 0, 0)):
        try:
            resource.setrlimit(kind, (soft, hard))
        except (ValueError, OSError):
            pass  # macOS does not enforce RLIMIT_AS
    keep = sorted({token_fd, verdict_fd})
    os.closerange(3, keep[0]); os.closerange(keep[0] + 1, keep[-1]); os.closerange(keep[-1] + 1, 4096)
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    ns = {"__name__": "__main__", "__builtins__": builtins}
    with open("main.py", encoding="utf-8") as f:
        source = f.read()
    if mode == "run":
        exec(compile(source, "main.py", "exec"), ns)
        return
    read, write, stop, exec_, compile_ = os.read, os.write, os._exit, exec, compile
    pristine = dict(vars(builtins))
    with open(".tests.py", encoding="utf-8") as f:  # compiled before the solution can touch it
        tests = [(s.lineno, compile_(ast.Module([s], []), "tests", "exec")) for s in ast.parse(f.read()).body]
    os.remove(".tests.py")
    del sys.settrace, sys.setprofile  # a tracer could jump over a test's asserts
    def fail(why):
        write(verdict_fd, ("FAIL " + why.replace("\n", " ")[:300] + "\n").encode())
        stop(1)
    try:
        exec_(compile_(source, "main.py", "exec"), ns)
    except BaseException as e:  # SystemExit too: leaving early is failing
        fail("the solution raised " + type(e).__name__ + ": " + str(e))
    # The tests see the solution's names, not its shadowing of builtins nor a patched builtins module.
    scope = {k: v for k, v in ns.items() if k not in pristine}
    scope.update(__name__="__main__", __builtins__=pristine)
    for i, (line, code) in enumerate(tests):
        try:
            exec_(code, scope)
        except BaseException as e:
            fail("test " + str(i + 1) + " (line " + str(line) + ") raised " + type(e).__name__ + ": " + str(e))
    token = read(token_fd, 64).decode()  # only now, after the last test
    write(verdict_fd, ("PASS " + token + " " + str(len(tests)) + "\n").encode())
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    stop(0)
main()
"""


class SandboxUnavailable(UserError, RuntimeError):
    """No OS sandbox can be used here; generated code is not run with less."""


@dataclass(frozen=True)
class Limits:
    timeout: float = 5.0  # wall-clock seconds; the whole process tree is killed after
    memory_mb: int = 512  # address space
    file_mb: int = 16  # largest file written
    disk_mb: int = 64  # the work dir's tmpfs (Linux)
    open_files: int = 64
    output_bytes: int = 64_000  # captured per stream; more output kills the run


@dataclass
class RunResult:
    status: str  # "ok" | "error" (non-zero exit) | "timeout" | "killed" (signal, limit) | "blocked" (seccomp)
    exit_code: int | None  # None when killed by a signal
    stdout: str
    stderr: str
    duration: float  # seconds
    reason: str = ""


@dataclass
class TestVerdict:
    passed: bool  # the harness ran every test and proved it with the run's token
    n_tests: int  # test statements (top-level statements of the tests) that ran to their end
    reason: str
    run: RunResult | None = field(default=None, repr=False)


def extract_code(text: str) -> str:
    """The last fenced Python block of a completion, or the whole text when there is none."""
    blocks = FENCE.findall(text)
    return blocks[-1] if blocks else text


# ---------------------------------------------------------------------------------------------
# Which sandbox, and what it lets the child read


def _base_python() -> tuple[str, str]:
    """(real base prefix, interpreter inside it). Never the venv: it lives inside the project."""
    prefix = os.path.realpath(sys.base_prefix)
    exe = os.path.realpath(sys.executable)
    if not exe.startswith(prefix + os.sep):  # a venv made with --copies
        exe = os.path.join(prefix, "bin", f"python{sys.version_info[0]}.{sys.version_info[1]}")
    if not os.access(exe, os.X_OK):
        raise SandboxUnavailable(
            f"the sandbox needs the base interpreter of {sys.executable}, and {exe} is not executable"
        )
    return prefix, exe


def read_allow_list() -> list[str]:
    """Paths the child may read: system libraries and the base interpreter (stdlib only)."""
    prefix, _ = _base_python()
    system = ["/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/etc/ld.so.cache", "/etc/localtime"]
    if sys.platform == "darwin":
        system = ["/usr/lib", "/usr/share", "/System", "/private/var/db/dyld", "/dev"]
    inside = any(prefix == p or prefix.startswith(p + "/") for p in system)
    return [p for p in system if os.path.lexists(p)] + ([] if inside else [prefix])


_probed: dict[str, str] = {}


def backend() -> str:
    """ "bwrap", "seatbelt" or "unsafe"; raises SandboxUnavailable (one sentence saying what to
    install) where no OS sandbox works. Probes once per process by running a trivial program."""
    if os.environ.get(UNSAFE_ENV) == "1":
        if "unsafe" not in _probed:
            sys.stderr.write(
                f"warning: {UNSAFE_ENV}=1: generated code runs WITHOUT an OS sandbox "
                "(only resource limits); it can read your files and use the network\n"
            )
            _probed["unsafe"] = "unsafe"
        return "unsafe"
    if sys.platform.startswith("linux"):
        kind, tool, hint = "bwrap", shutil.which("bwrap"), "install bubblewrap (apt-get install bubblewrap)"
    elif sys.platform == "darwin":
        kind, tool, hint = (
            "seatbelt",
            shutil.which("sandbox-exec"),
            "sandbox-exec (/usr/bin/sandbox-exec, part of macOS) is missing",
        )
    else:
        kind, tool, hint = "", None, f"there is no OS sandbox for {sys.platform}"
    if tool is None:
        raise SandboxUnavailable(
            f"the code reward runs generated Python in an OS sandbox and none is available: {hint}, "
            f"or set {UNSAFE_ENV}=1 to run it without isolation"
        )
    if tool not in _probed:
        result = _run(kind, tool, "pass", "", {}, Limits(timeout=20), None)
        if result.status != "ok":
            why = (result.stderr.strip().splitlines() or [result.reason or result.status])[-1]
            raise SandboxUnavailable(
                f"{tool} cannot create a sandbox here ({why}); allow unprivileged user namespaces "
                f"(sysctl kernel.unprivileged_userns_clone=1) or set {UNSAFE_ENV}=1"
            )
        _probed[tool] = kind
    return kind


def _bwrap_argv(tool: str, files: dict[str, int], seccomp_fd: int, limits: Limits) -> list[str]:
    prefix, exe = _base_python()
    argv = [
        tool,
        "--unshare-all",
        "--unshare-user",
        "--disable-userns",
        "--die-with-parent",
        "--new-session",
        "--cap-drop",
        "ALL",
        "--uid",
        "65534",
        "--gid",
        "65534",
        "--hostname",
        "sandbox",
    ]
    for path in read_allow_list():
        link = os.path.islink(path) and os.path.dirname(path) == "/"  # /lib -> usr/lib on merged-/usr systems
        argv += ["--symlink", os.readlink(path), path] if link else ["--ro-bind", path, path]
    site = os.path.join(prefix, "lib", f"python{sys.version_info[0]}.{sys.version_info[1]}", "site-packages")
    if os.path.isdir(site):  # the stdlib is enough; the packages installed there stay unseen
        argv += ["--tmpfs", site, "--remount-ro", site]
    argv += [
        "--dev",
        "/dev",
        "--size",
        str(limits.disk_mb * 2**20),
        "--tmpfs",
        BOX,
        "--chdir",
        BOX,
        "--seccomp",
        str(seccomp_fd),
    ]
    for name, fd in files.items():
        argv += ["--file", str(fd), f"{BOX}/{name}"]
    return argv + [exe]


# ---------------------------------------------------------------------------------------------
# Running


def _data_fd(data: bytes) -> int:
    """A readable descriptor holding `data`, at offset 0 (never blocks, unlike a pipe)."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("sandbox")
    else:
        fd, path = tempfile.mkstemp()
        os.unlink(path)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _collect(proc, verdict_r: int, limits: Limits, start: float) -> tuple[dict, str]:
    """Read stdout, stderr and the verdict pipe until all end, the time is up, or output is too
    long; returns (bytes per stream, why it stopped early or "")."""
    got = {"stdout": b"", "stderr": b"", "verdict": b""}
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
    sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
    sel.register(verdict_r, selectors.EVENT_READ, "verdict")
    try:
        while sel.get_map():
            left = start + limits.timeout - time.monotonic()
            if left <= 0:
                return got, "timeout"
            for key, _ in sel.select(left):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                got[key.data] += chunk
                if len(got[key.data]) > limits.output_bytes:
                    return got, f"{key.data} over {limits.output_bytes} bytes"
        return got, ""
    finally:
        sel.close()


def _run(
    kind: str, tool: str | None, code: str, stdin: str, files: dict[str, str], limits: Limits, tests: str | None
) -> tuple[RunResult, str] | RunResult:
    token = secrets.token_hex(16)
    contents = {"main.py": code, **files, **({".tests.py": tests} if tests is not None else {})}
    fds = {name: _data_fd(text.encode()) for name, text in contents.items()}
    token_fd, stdin_fd, (verdict_r, verdict_w) = _data_fd(token.encode()), _data_fd(stdin.encode()), os.pipe()
    seccomp_fd = _data_fd(seccomp_filter(platform.machine())) if kind == "bwrap" else -1
    nums = [
        int(limits.timeout) + 1,
        limits.memory_mb * 2**20,
        limits.file_mb * 2**20,
        limits.open_files,
        token_fd,
        verdict_w,
    ]
    harness = ["-I", "-S", "-B", "-c", HARNESS, "run" if tests is None else "tests", *map(str, nums)]
    env = {"PATH": "/usr/bin:/bin", "HOME": BOX, "TMPDIR": BOX, "LANG": "C.UTF-8", "TZ": "UTC"}
    work = None
    if kind == "bwrap":
        argv, cwd = _bwrap_argv(tool, fds, seccomp_fd, limits), None
    else:  # a host directory as the work dir: the Seatbelt profile confines writes to it
        work = cwd = os.path.realpath(tempfile.mkdtemp(prefix="grpo-mlx-sandbox-"))
        env.update(HOME=work, TMPDIR=work)
        for name, fd in fds.items():
            with open(os.path.join(work, name), "wb") as f:
                f.write(os.read(fd, 1 << 30))
        exe = _base_python()[1]
        argv = [tool, "-p", seatbelt_profile(read_allow_list(), work, exe), exe] if kind == "seatbelt" else [exe]
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv + harness,
            stdin=stdin_fd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=env,
            pass_fds=[token_fd, verdict_w, *fds.values(), *([seccomp_fd] * (seccomp_fd >= 0))],
            start_new_session=True,
        )
    finally:
        for fd in [verdict_w, token_fd, stdin_fd, *fds.values(), *([seccomp_fd] * (seccomp_fd >= 0))]:
            os.close(fd)
    try:
        got, early = _collect(proc, verdict_r, limits, start)
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # the tree: bwrap's --die-with-parent and pid 1 do the rest
        proc.wait()
        proc.stdout.close(), proc.stderr.close(), os.close(verdict_r)
        if work:
            shutil.rmtree(work, ignore_errors=True)
    rc = proc.returncode
    sig = -rc if rc < 0 else rc - 128 if kind == "bwrap" and rc > 128 else 0  # bwrap reports 128 + signal
    status = (
        "timeout"
        if early == "timeout"
        else "killed"
        if early
        else "blocked"
        if sig == signal.SIGSYS
        else "killed"
        if sig
        else "ok"
        if rc == 0
        else "error"
    )
    reason = early or (f"signal {signal.Signals(sig).name}" if sig in signal.valid_signals() and sig else "")
    result = RunResult(
        status,
        None if sig or early else rc,
        got["stdout"].decode("utf-8", "replace")[-limits.output_bytes :],
        got["stderr"].decode("utf-8", "replace")[-limits.output_bytes :],
        time.monotonic() - start,
        reason,
    )
    return result if tests is None else (result, _verdict_line(got["verdict"], token))


def _verdict_line(raw: bytes, token: str) -> str:
    lines = raw.decode("utf-8", "replace").splitlines()
    passing = [ln for ln in lines if ln.startswith(f"PASS {token} ")]
    return passing[0] if passing else next((ln for ln in reversed(lines) if ln.startswith("FAIL ")), "")


def run(code: str, *, stdin: str = "", files: dict[str, str] | None = None, limits: Limits = Limits()) -> RunResult:
    """Run `code` as a program (main.py in a fresh work dir, beside `files`) in the sandbox."""
    for name in files or {}:
        if not re.fullmatch(r"[\w][\w.-]*", name) or name == "main.py":
            raise ValueError(f"sandbox file name {name!r}: a plain file name other than main.py")
    kind = backend()
    return _run(kind, _tool(kind), code, stdin, dict(files or {}), limits, None)


def _tool(kind: str) -> str | None:
    return shutil.which({"bwrap": "bwrap", "seatbelt": "sandbox-exec"}.get(kind, "")) if kind != "unsafe" else None


def run_tests(code: str, tests: str, limits: Limits = Limits()) -> TestVerdict:
    """Run `code`, then each top-level statement of `tests` (asserts, check functions)."""
    try:
        n = len(ast.parse(tests).body)
    except SyntaxError as e:
        return TestVerdict(False, 0, f"the tests do not parse: line {e.lineno}: {e.msg}")
    kind = backend()
    result, line = _run(kind, _tool(kind), code, "", {}, limits, tests)
    if line.startswith("PASS ") and line.split()[-1] == str(n):
        return TestVerdict(True, n, "passed", result)
    why = (
        line[5:]
        if line.startswith("FAIL ")
        else (
            f"{result.status}: {result.reason}"
            if result.reason
            else f"ended before the tests finished (exit {result.exit_code})"
        )
    )
    ran = re.match(r"test (\d+) ", why)
    return TestVerdict(False, int(ran.group(1)) - 1 if ran else 0, why, result)


def _text(completion) -> str:  # str, a message dict or a list of messages (rewards' completion_text, not imported)
    if isinstance(completion, dict):
        return str(completion.get("content") or "")
    if isinstance(completion, (list, tuple)):
        return "\n".join(_text(m) for m in completion)
    return "" if completion is None else str(completion)


def code_reward(timeout: float = 5.0, memory_mb: int = 512, tests_column: str = "tests", **_):
    """Built-in reward `code`: 1.0 when the completion's Python passes the example's tests
    (the `tests` column: asserts run after the completion's code), else 0.0; None without tests.
    Raises SandboxUnavailable now, before any model loads, where no OS sandbox works."""
    backend()
    limits = Limits(timeout=float(timeout), memory_mb=int(memory_mb))
    workers = max(1, min(16, os.cpu_count() or 1))  # each run mostly waits on its process

    def score(pair):
        completion, test = pair
        return None if test is None else float(run_tests(extract_code(_text(completion)), str(test), limits).passed)

    def code(prompts, completions, **columns):
        tests = columns.get(tests_column) or [None] * len(completions)
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(score, zip(completions, tests)))

    return code
