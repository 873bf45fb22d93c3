"""The sandbox, attacked as an attacker would: reads, writes, network, processes, signals,
resources, privileges and forged verdicts, as root and as an unprivileged user (Linux,
bubblewrap); plus the interface, the refusal without an OS sandbox and the macOS profile text."""

import contextlib
import json
import os
import platform
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from grpo_mlx import sandbox
from grpo_mlx.sandbox import Limits, SandboxUnavailable, extract_code, run, run_tests
from grpo_mlx.sandbox_profiles import seatbelt_profile, seccomp_filter

LINUX = sys.platform.startswith("linux")
BWRAP = shutil.which("bwrap")
PROJECT = Path(__file__).resolve().parent.parent
if LINUX and not BWRAP and os.environ.get("CI") == "true":  # CI installs it (.ci/run): a missing one must show
    pytest.fail("bubblewrap (bwrap) is not installed: the sandbox tests require it on Linux CI", pytrace=False)
needs_bwrap = pytest.mark.skipif(not (LINUX and BWRAP), reason="the Linux sandbox needs bubblewrap")
UNPRIVILEGED = "sbxtest"


def attempt(body: str) -> str:
    """Attack code that prints ESCAPED when `body` ran without raising."""
    body = "\n".join("    " + line for line in body.strip().splitlines())
    return f"import os, sys, socket, ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\ntry:\n{body}\n    print('ESCAPED')\nexcept Exception as e:\n    print('blocked', type(e).__name__)\n"


WRONG = "def add(a, b):\n    return a - b\n"
TESTS = "assert add(2, 3) == 5\n"
# name -> ("run", code) or ("tests", code, tests). @X@ are filled in per user (see host()).
ATTACKS = {
    # -- reading what is not on the allow-list
    "read_etc_shadow": ("run", attempt("open('/etc/shadow').read()")),
    "read_etc_passwd": ("run", attempt("open('/etc/passwd').read()")),
    "read_home_secret": ("run", attempt("open('@HOME_SECRET@').read()")),
    "list_home": ("run", attempt("assert set(os.listdir('@HOME@')) - {'.pyenv'}")),
    "read_project": ("run", attempt("open('@PROJECT@/pyproject.toml').read()")),
    "read_project_venv": ("run", attempt("open('@PROJECT@/.venv/pyvenv.cfg').read()")),
    "read_tmp_planted": ("run", attempt("open('@TMP_SECRET@').read()")),
    "proc_self_environ": ("run", attempt("open('/proc/self/environ').read()")),
    "proc_listing": ("run", attempt("assert os.listdir('/proc')")),
    "dir_fd_traversal": (
        "run",
        attempt(
            "fd = os.open('/', os.O_RDONLY)\nfor _ in range(8):\n    fd = os.open('..', os.O_RDONLY, dir_fd=fd)\n"
            "os.read(os.open('@TMP_SECRET@'.lstrip('/'), os.O_RDONLY, dir_fd=fd), 100)"
        ),
    ),
    "symlink_out": ("run", attempt("os.symlink('@TMP_SECRET@', 'link')\nopen('link').read()")),
    "ctypes_open": ("run", attempt("assert libc.open(b'@TMP_SECRET@', 0) >= 0")),
    "base_site_packages": ("run", attempt("assert os.listdir('@SITE@')")),
    "host_environment": ("run", attempt("assert 'GRPO_SBX_SECRET' in os.environ")),
    # -- writing outside the work dir
    "write_outside": ("run", attempt("open('@OUTSIDE@/escaped', 'w').write('x')")),
    "write_usr": ("run", attempt("open('/usr/grpo_sbx_escape', 'w').write('x')")),
    "write_prefix": ("run", attempt("open(sys.base_prefix + '/grpo_sbx_escape', 'w').write('x')")),
    "ctypes_creat": ("run", attempt("assert libc.open(b'@OUTSIDE@/escaped2', os.O_WRONLY | os.O_CREAT, 0o644) >= 0")),
    "disk_fill_one_file": (
        "run",
        attempt(
            "n = 0\ntry:\n    with open('big', 'wb') as f:\n        while n < 2**30:\n            f.write(b'x' * 2**20); f.flush(); n += 2**20\n"
            "except OSError:\n    pass\nassert n > 17 * 2**20, n"
        ),
    ),
    "disk_fill_many_files": (
        "run",
        attempt(
            "n = 0\ntry:\n    for i in range(1024):\n        open(f'f{i}', 'wb').write(b'x' * 2**20); n += 2**20\n"
            "except OSError:\n    pass\nassert n > 65 * 2**20, n"
        ),
    ),
    # -- network
    "tcp_loopback": ("run", attempt("socket.create_connection(('127.0.0.1', @PORT@), timeout=2)")),
    "udp_loopback": (
        "run",
        (
            "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "try:\n    s.sendto(b'escaped', ('127.0.0.1', @UDP@))\nexcept OSError:\n    pass\n"
        ),
    ),
    "abstract_unix": ("run", attempt("s = socket.socket(socket.AF_UNIX)\ns.connect('\\0@ABSTRACT@')")),
    "dns": ("run", attempt("socket.getaddrinfo('example.com', 80)")),
    "interfaces": ("run", attempt("assert [n for _, n in socket.if_nameindex() if n != 'lo']")),
    # -- processes
    "os_fork": ("run", attempt("if os.fork() == 0:\n    os._exit(0)")),
    "subprocess": ("run", attempt("import subprocess\nsubprocess.run(['/bin/sh', '-c', 'true'], check=True)")),
    "posix_spawn": ("run", attempt("os.posix_spawn('/bin/true', ['true'], {})")),
    "os_system_touch": ("run", attempt("assert os.system('touch @OUTSIDE@/system') == 0")),
    "ctypes_system": ("run", attempt("assert libc.system(b'touch @OUTSIDE@/csystem') == 0")),
    "ctypes_raw_fork": (
        "run",
        attempt(
            "import platform\nnr = {'x86_64': 56, 'aarch64': 220}[platform.machine()]\n"
            "pid = libc.syscall(nr, 17, 0, 0, 0, 0)  # clone(SIGCHLD): a plain fork\nif pid == 0:\n    os._exit(0)\nassert pid > 0"
        ),
    ),
    "x32_syscall": (
        "run",
        attempt("import platform\nassert platform.machine() == 'x86_64'\nlibc.syscall(0x40000000 | 57)"),
    ),
    "fork_bomb": ("run", attempt("while True:\n    os.fork()")),
    "double_fork_daemon": (
        "run",
        attempt(
            "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        os.execv('/bin/sleep', ['sleep', '987.654'])\n    os._exit(0)"
        ),
    ),
    "ctypes_daemon": ("run", attempt("assert libc.system(b'sleep 987.654 &') == 0")),
    "thread_bomb": (
        "run",
        attempt(
            "import threading, time\nts = []\ntry:\n    while len(ts) < 100000:\n"
            "        t = threading.Thread(target=time.sleep, args=(2,), daemon=True); t.start(); ts.append(t)\n"
            "except RuntimeError:\n    pass\nassert len(ts) >= 100000"
        ),
    ),
    # -- signals
    "kill_sentinel": ("run", attempt("os.kill(@SENTINEL@, 9)")),
    "kill_all": ("run", "import os, signal\ntry:\n    os.kill(-1, signal.SIGKILL)\nexcept OSError:\n    pass\n"),
    "kill_parent": ("run", attempt("os.kill(@PARENT@, signal.SIGTERM)".replace("signal.SIGTERM", "15"))),
    "ptrace_init": ("run", attempt("assert libc.ptrace(16, 1, 0, 0) == 0")),
    "read_init_memory": (
        "run",
        attempt(
            "buf = ctypes.create_string_buffer(16)\n"
            "class IOV(ctypes.Structure):\n    _fields_ = [('base', ctypes.c_void_p), ('len', ctypes.c_size_t)]\n"
            "local, remote = IOV(ctypes.addressof(buf), 16), IOV(0x400000, 16)\n"
            "assert libc.process_vm_readv(1, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0) >= 0 or ctypes.get_errno() != 1"
        ),
    ),
    # -- resources
    "memory_bomb": ("run", attempt("x = bytearray(8 * 2**30)")),
    "memory_growth": (
        "run",
        attempt(
            "chunks = []\ntry:\n    while len(chunks) < 4096:\n        chunks.append(bytearray(2**20))\n"
            "except MemoryError:\n    pass\nassert len(chunks) >= 4096"
        ),
    ),
    "cpu_loop": ("run", "while True:\n    pass\n"),
    "sleep_forever": ("run", "import time\ntime.sleep(1000)\n"),
    "stdout_flood": ("run", "while True:\n    print('x' * 1000)\n"),
    "stderr_flood": ("run", "import sys\nwhile True:\n    sys.stderr.write('x' * 1000)\n"),
    # -- privileges and namespaces
    "unshare_user": ("run", attempt("assert libc.unshare(0x10000000) == 0")),
    "mount_tmpfs": ("run", attempt("assert libc.mount(b'none', b'/box', b'tmpfs', 0, None) == 0")),
    "setuid_root": ("run", attempt("os.setuid(0)")),
    "sethostname": ("run", attempt("socket.sethostname('escaped')")),
    "chroot": ("run", attempt("os.mkdir('r')\nos.chroot('r')")),
    "raw_devices": (
        "run",
        attempt("assert [d for d in os.listdir('/dev') if d.startswith(('sd', 'nvme', 'mem', 'kmsg', 'vd'))]"),
    ),
    # -- forging the verdict: a wrong solution plus tampering
    "verdict_sys_exit": ("tests", WRONG + "import sys\nsys.exit(0)\n", TESTS),
    "verdict_os_exit": ("tests", WRONG + "import os\nos._exit(0)\n", TESTS),
    "verdict_atexit": ("tests", WRONG + "import atexit, os\natexit.register(os._exit, 0)\n", TESTS),
    "verdict_excepthook": (
        "tests",
        WRONG + "import sys, threading\nsys.excepthook = lambda *a: None\nthreading.excepthook = lambda *a: None\n",
        TESTS,
    ),
    "verdict_builtins_len": (
        "tests",
        "import builtins\nbuiltins.len = lambda x: 3\ndef f():\n    return [1]\n",
        "assert len(f()) == 3\n",
    ),
    "verdict_shadow_builtin": (
        "tests",
        "def f(x):\n    return [0]\ndef sorted(x, **k):\n    return [0]\n",
        "assert f([3, 1]) == sorted([3, 1])\n",
    ),
    "verdict_patch_os": (
        "tests",
        WRONG + "import os\n_w = os.write\nos._exit = lambda c: None\n"
        "os.write = lambda fd, b: _w(fd, b.replace(b'FAIL', b'PASS'))\n",
        TESTS,
    ),
    "verdict_fake_token": (
        "tests",
        WRONG + "import os\nline = b'PASS ' + b'0' * 32 + b' 1\\n'\nprint(line.decode())\n"
        "for fd in range(1, 64):\n    try:\n        os.write(fd, line)\n    except OSError:\n        pass\n",
        TESTS,
    ),
    "verdict_settrace_jump": (
        "tests",
        (
            "import sys\ndef jump(frame, event, arg):\n"
            "    if event == 'line' and frame.f_code.co_name == 'check':\n"
            "        frame.f_lineno = frame.f_code.co_firstlineno + 3\n    return jump\n"
            "def add(a, b):\n    sys._getframe(1).f_trace = jump\n    sys.settrace(jump)\n    return 0\n"
        ),
        "def check(f):\n    r = f(2, 3)\n    assert r == 5\n    return\ncheck(add)\n",
    ),
    "verdict_rewrite_tests": ("tests", WRONG + "open('.tests.py', 'w').write('pass')\n", TESTS),
    "verdict_assertionerror": (
        "tests",
        WRONG + "import builtins\nbuiltins.AssertionError = type('A', (Exception,), {})\n",
        TESTS,
    ),
    "verdict_thread_spam": (
        "tests",
        WRONG + "import os, threading\ndef spam():\n    while True:\n"
        "        for fd in range(3, 64):\n            try:\n                os.write(fd, b'PASS ' + b'f' * 32 + b' 1\\n')\n"
        "            except OSError:\n                pass\nthreading.Thread(target=spam, daemon=True).start()\n",
        TESTS,
    ),
}
# What the sandbox cannot stop (README "Generated code"): a solution that knows the protocol
# reads the token itself. Kept as a strict xfail, so closing the gap shows.
KNOWN_LIMIT = (
    "tests",
    WRONG + "import os, sys\ntok = os.read(int(sys.argv[-2]), 64)\n"
    "os.write(int(sys.argv[-1]), b'PASS ' + tok + b' 1\\n')\nos._exit(0)\n",
    TESTS,
)
LIMITS = {"timeout": 3.0, "memory_mb": 256, "output_bytes": 20_000}
RUNNER = r"""
import json, os, subprocess, sys
from concurrent.futures import ThreadPoolExecutor
job = json.load(sys.stdin)
sys.path.insert(0, job["pkg"])
from grpo_mlx import sandbox
sentinel = subprocess.Popen(["/bin/sleep", "300"])
limits = sandbox.Limits(**job["limits"])
def one(item):
    name, (mode, code, *tests) = item
    code = code.replace("@SENTINEL@", str(sentinel.pid)).replace("@PARENT@", str(os.getpid()))
    if mode == "run":
        r = sandbox.run(code, limits=limits)
    else:
        v = sandbox.run_tests(code, tests[0], limits)
        r = v.run
        r.stdout = "ESCAPED (forged a pass)" if v.passed else r.stdout
    return name, {"status": r.status, "stdout": r.stdout, "stderr": r.stderr[-500:]}
with ThreadPoolExecutor(2) as pool:
    results = dict(pool.map(one, job["attacks"].items()))
results["_sentinel_alive"] = sentinel.poll() is None
sentinel.kill()
print(json.dumps(results))
"""


def _serve(kind):
    if kind == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
    elif kind == "tcp":
        s = socket.create_server(("127.0.0.1", 0))
    else:
        s = socket.socket(socket.AF_UNIX)
        s.bind("\0grpo-sbx-test-" + str(os.getpid()))
        s.listen()
    s.settimeout(0.1)
    return s


@pytest.fixture(scope="module")
def host():
    """Targets the attacks aim at, readable/writable on the host by the attacking user, and
    the attack results per user."""
    tcp, udp, unix = _serve("tcp"), _serve("udp"), _serve("unix")
    seen, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            for s in (tcp, udp, unix):
                with contextlib.suppress(TimeoutError, OSError):
                    seen.append(s.recv(100) if s is udp else s.accept())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    outside = tempfile.mkdtemp(prefix="grpo-sbx-outside-")
    os.chmod(outside, 0o777)
    fd, secret = tempfile.mkstemp(prefix="grpo-sbx-secret-")
    os.write(fd, b"host secret")
    os.close(fd)
    os.chmod(secret, 0o644)
    state = {
        "outside": outside,
        "secret": secret,
        "seen": seen,
        "results": {},
        "homes": [],
        "tcp": tcp.getsockname()[1],
        "udp": udp.getsockname()[1],
        "abstract": unix.getsockname()[1:].decode(),
    }
    os.environ["GRPO_SBX_SECRET"] = "1"
    yield state
    os.environ.pop("GRPO_SBX_SECRET", None)
    stop.set()
    watcher.join()
    for s in (tcp, udp, unix):
        s.close()
    shutil.rmtree(outside, ignore_errors=True)
    os.remove(secret)
    for path in state["homes"]:  # planted secrets and the unprivileged user's package copy
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def _attack_results(host, user: str) -> dict:
    if user in host["results"]:
        return host["results"][user]
    home = os.path.expanduser("~") if user == "root" else pwd.getpwnam(user).pw_dir
    home_secret = os.path.join(home, ".grpo_sbx_secret")
    Path(home_secret).write_text("home secret")
    host["homes"].append(home_secret)
    fills = {
        "@HOME@": home,
        "@HOME_SECRET@": home_secret,
        "@PROJECT@": str(PROJECT),
        "@TMP_SECRET@": host["secret"],
        "@OUTSIDE@": host["outside"],
        "@SITE@": os.path.join(
            os.path.realpath(sys.base_prefix),
            "lib",
            f"python{sys.version_info[0]}.{sys.version_info[1]}",
            "site-packages",
        ),
        "@PORT@": str(host["tcp"]),
        "@UDP@": str(host["udp"]),
        "@ABSTRACT@": host["abstract"],
    }
    attacks = {}
    for name, (mode, code, *tests) in ATTACKS.items():
        for key, value in fills.items():
            code = code.replace(key, value)
        attacks[name] = [mode, code, *tests]
    pkg, cmd = str(PROJECT), [sys.executable, "-c", RUNNER]
    if user != "root":  # a copy of the three modules the sandbox needs, run by the system Python
        pkg = tempfile.mkdtemp(prefix="grpo-sbx-pkg-")
        host["homes"].append(pkg)
        os.mkdir(os.path.join(pkg, "grpo_mlx"))
        Path(pkg, "grpo_mlx", "__init__.py").write_text("")
        for name in ("errors.py", "sandbox.py", "sandbox_profiles.py"):
            shutil.copy(PROJECT / "grpo_mlx" / name, os.path.join(pkg, "grpo_mlx", name))
        subprocess.run(["chmod", "-R", "a+rX", pkg], check=True)
        os.chown(home_secret, pwd.getpwnam(user).pw_uid, -1)
        cmd = ["runuser", "-u", user, "--", "/usr/bin/python3", "-c", RUNNER]
    job = json.dumps({"pkg": pkg, "attacks": attacks, "limits": LIMITS})
    env = {**os.environ, "GRPO_SBX_SECRET": "1"}
    out = subprocess.run(cmd, input=job, capture_output=True, text=True, timeout=600, check=False, env=env, cwd="/")
    assert out.returncode == 0, out.stderr[-2000:]
    host["results"][user] = json.loads(out.stdout)
    return host["results"][user]


@pytest.fixture(scope="module", params=["root", UNPRIVILEGED])
def results(request, host):
    user = request.param
    if not LINUX or not BWRAP:
        pytest.skip("the Linux sandbox needs bubblewrap")
    if user == "root" and os.geteuid() != 0:
        user = pwd.getpwuid(os.geteuid()).pw_name  # the tests' own (unprivileged) user
    if user == UNPRIVILEGED:
        if os.geteuid() != 0 or not shutil.which("runuser") or not os.path.exists("/usr/bin/python3"):
            pytest.skip("running as an unprivileged user needs root, runuser and /usr/bin/python3")
        try:
            pwd.getpwnam(UNPRIVILEGED)
        except KeyError:
            subprocess.run(["useradd", "-m", UNPRIVILEGED], check=True)
    return user, _attack_results(host, user)


@needs_bwrap
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_is_blocked(name, results, host):
    user, got = results
    r = got[name]
    assert "ESCAPED" not in r["stdout"], (user, r)
    check = EXTRA.get(name)
    if check:
        check(r, host, user)


def _nothing_reached_the_servers(r, host, user):
    assert host["seen"] == []


def _no_file(*names):
    def check(r, host, user):
        for name in names:
            assert not os.path.exists(os.path.join(host["outside"], name))

    return check


def _no_survivor(r, host, user):
    ps = subprocess.run(["pgrep", "-f", "sleep 987.654"], check=False, capture_output=True, text=True).stdout.split()
    assert ps == []


def _status(*allowed):
    def check(r, host, user):
        assert r["status"] in allowed, r

    return check


def _bounded_output(r, host, user):
    assert r["status"] == "killed" and len(r["stdout"]) <= LIMITS["output_bytes"] and len(r["stderr"]) <= 500


EXTRA = {
    "tcp_loopback": _nothing_reached_the_servers,
    "udp_loopback": _nothing_reached_the_servers,
    "abstract_unix": _nothing_reached_the_servers,
    "write_outside": _no_file("escaped"),
    "ctypes_creat": _no_file("escaped2"),
    "os_system_touch": _no_file("system"),
    "ctypes_system": _no_file("csystem"),
    "write_usr": lambda r, h, u: not os.path.exists("/usr/grpo_sbx_escape") or pytest.fail("wrote /usr"),
    "write_prefix": lambda r, h, u: (
        not os.path.exists(sys.base_prefix + "/grpo_sbx_escape") or pytest.fail("wrote prefix")
    ),
    "double_fork_daemon": _no_survivor,
    "ctypes_daemon": _no_survivor,
    "fork_bomb": _no_survivor,
    "kill_sentinel": lambda r, h, u: h["results"][u]["_sentinel_alive"] or pytest.fail("sentinel killed"),
    "kill_all": lambda r, h, u: h["results"][u]["_sentinel_alive"] or pytest.fail("sentinel killed"),
    **({"x32_syscall": _status("blocked")} if platform.machine() == "x86_64" else {}),
    "cpu_loop": _status("timeout", "killed"),
    "sleep_forever": _status("timeout"),
    "stdout_flood": _bounded_output,
    "stderr_flood": _status("killed"),
}


# ------------------------------------------------------------------ the interface, with no attacker


@needs_bwrap
@pytest.mark.xfail(strict=True, reason="known limit: same-process code that knows the protocol reads the token")
def test_known_limit_reading_the_token_descriptor_forges_a_pass():
    _, code, tests = KNOWN_LIMIT
    assert not run_tests(code, tests).passed


@needs_bwrap
def test_run_returns_output_stdin_files_and_exit_status():
    r = run(
        "import sys\nprint(input().upper(), open('data.txt').read())\nsys.exit(3)",
        stdin="hello\n",
        files={"data.txt": "beside"},
    )
    assert (r.status, r.exit_code, r.stdout) == ("error", 3, "HELLO beside\n")
    ok = run("import json, math, re, tempfile, threading, collections\nprint(tempfile.mkdtemp().startswith('/box'))")
    assert (ok.status, ok.stdout, ok.stderr) == ("ok", "True\n", "")


@needs_bwrap
def test_run_reports_an_exception_on_stderr():
    r = run("raise ValueError('nope')")
    assert r.status == "error" and r.exit_code == 1 and "ValueError: nope" in r.stderr


def test_run_refuses_a_file_name_with_a_path():
    with pytest.raises(ValueError, match="plain file name"):
        run("pass", files={"../x": ""})


@needs_bwrap
def test_run_tests_passes_counts_and_names_the_failing_test():
    good = "def add(a, b):\n    return a + b\n"
    tests = "assert add(1, 2) == 3\ndef check(f):\n    assert f(0, 0) == 0\ncheck(add)\nassert add(2, 2) == 5, 'four'\n"
    passed = run_tests(good, tests.rsplit("assert", 1)[0])
    assert (passed.passed, passed.n_tests, passed.reason) == (True, 3, "passed")
    failed = run_tests(good, tests)
    assert not failed.passed and failed.n_tests == 3 and "test 4 (line 5)" in failed.reason and "four" in failed.reason


@needs_bwrap
def test_run_tests_reports_a_broken_solution_and_broken_tests():
    assert "SyntaxError" in run_tests("def f(:", "assert True").reason
    broken = run_tests("x = 1", "assert (")
    assert not broken.passed and broken.reason.startswith("the tests do not parse: line 1")


@needs_bwrap
def test_a_solution_that_times_out_fails_with_the_reason():
    v = run_tests("import time\ntime.sleep(60)", "assert True", Limits(timeout=1))
    assert not v.passed and v.reason.startswith("timeout")


def test_extract_code_takes_the_last_fenced_block():
    text = "first\n```python\nx = 1\n```\nthen\n```py\ny = 2\n```\n"
    assert extract_code(text) == "y = 2\n"
    assert extract_code("plain = 3") == "plain = 3"


@needs_bwrap
def test_code_reward_scores_passing_failing_and_missing_tests():
    from grpo_mlx.rewards import resolve_reward

    _, fn = resolve_reward("code")
    good = "```python\ndef add(a, b):\n    return a + b\n```"
    bad = "def add(a, b):\n    return a - b"
    chat = [{"role": "assistant", "content": good}]
    scores = fn(prompts=["p"] * 4, completions=[good, bad, chat, good], tests=["assert add(2, 3) == 5"] * 3 + [None])
    assert scores == [1.0, 0.0, 1.0, None]


@pytest.fixture
def no_probe(monkeypatch):
    monkeypatch.setattr(sandbox, "_probed", {})
    monkeypatch.delenv(sandbox.UNSAFE_ENV, raising=False)


@pytest.mark.skipif(not LINUX, reason="names the Linux package")
def test_without_bwrap_the_code_reward_refuses_to_start_and_says_what_to_install(no_probe, monkeypatch):
    from grpo_mlx.errors import UserError
    from grpo_mlx.rewards import resolve_reward

    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    with pytest.raises(SandboxUnavailable, match=r"apt-get install bubblewrap") as e:
        resolve_reward("code")
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)


@pytest.mark.skipif(not LINUX, reason="Linux")
def test_a_bwrap_that_cannot_create_namespaces_is_refused(no_probe, monkeypatch, tmp_path):
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to creating new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: str(fake))
    with pytest.raises(SandboxUnavailable, match="No permissions to creating new namespace"):
        sandbox.backend()


def test_the_unsafe_opt_out_is_explicit_and_warns(no_probe, monkeypatch, capsys):
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    monkeypatch.setenv(sandbox.UNSAFE_ENV, "1")
    r = run("print(6 * 7)")
    assert (r.status, r.stdout) == ("ok", "42\n")
    assert "WITHOUT an OS sandbox" in capsys.readouterr().err


# ------------------------------------------------------------------ the policies as text


def _instructions(program: bytes):
    import struct

    return [struct.unpack("=HBBI", program[i : i + 8]) for i in range(0, len(program), 8)]


def test_seccomp_filter_checks_the_abi_and_refuses_process_creation():
    prog = _instructions(seccomp_filter("x86_64"))
    assert prog[0] == (0x20, 0, 0, 4) and prog[1][3] == 0xC000003E  # load arch, compare with x86_64
    compared = {k for code, _, _, k in prog if code == 0x15}
    assert {56, 57, 58, 435, 101} <= compared  # clone, fork, vfork, clone3, ptrace
    returns = {k for code, _, _, k in prog if code == 0x06}
    assert 0x80000000 in returns and 0x00050000 | 1 in returns  # kill (other ABI), EPERM
    assert any(code == 0x45 and k == 0x00010000 for code, _, _, k in prog)  # CLONE_THREAD still allowed
    for i, (code, jt, jf, _) in enumerate(prog):  # every jump lands inside the program
        assert code == 0x06 or i + 1 + max(jt, jf) < len(prog)
    assert {220, 435} <= {k for code, _, _, k in _instructions(seccomp_filter("aarch64")) if code == 0x15}
    with pytest.raises(KeyError):
        seccomp_filter("mips")


def test_seatbelt_profile_denies_by_default_and_allows_only_the_lists():
    import re

    profile = seatbelt_profile(["/usr/lib", "/opt/py"], "/private/var/w", "/opt/py/bin/python3")
    lines = profile.splitlines()
    assert lines[:4] == ["(version 1)", "(deny default)", "(deny network*)", "(deny process-fork)"]
    assert "(allow network" not in profile and "process-fork)" not in profile.replace("(deny process-fork)", "")
    reads = next(ln for ln in lines if ln.startswith("(allow file-read* (subpath"))
    assert re.findall(r'subpath "([^"]*)"', reads) == ["/usr/lib", "/opt/py", "/private/var/w"]
    writes = [ln for ln in lines if "file-write" in ln]
    assert writes == ['(allow file-write* (subpath "/private/var/w") (literal "/dev/null"))']
    assert '(allow process-exec (literal "/opt/py/bin/python3"))' in lines
    metadata = next(ln for ln in lines if ln.startswith("(allow file-read-metadata"))
    assert "subpath" not in metadata and '"/private/var"' in metadata  # parents' metadata, not their contents
    assert '\\"' in seatbelt_profile(['/a"b'], "/w", "/p")  # a quote in a path cannot end the string
