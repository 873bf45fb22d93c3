"""The operating-system policies of the sandbox, generated from code so that tests can read them.

- `seccomp_filter(machine)`: a classic-BPF seccomp program for bubblewrap's `--seccomp FD`. It
  refuses every way to start a process (fork, vfork, clone without CLONE_THREAD, clone3) while
  threads still work, and ptrace / process_vm_readv / process_vm_writev, and kills the process
  on a syscall of another ABI (32-bit or x32 entry points, which a filter for one ABI's numbers
  would not cover). Refusing process creation in
  the kernel bounds fork bombs even as root, where RLIMIT_NPROC does not apply.
- `seatbelt_profile(...)`: the macOS `sandbox-exec` profile: deny by default, no network, no new
  processes, file reads only from an allow-list, writes only in the work directory.
"""

from __future__ import annotations

import errno
import struct

# BPF opcodes and seccomp return values (linux/filter.h, linux/seccomp.h).
LD_ABS_W, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
ALLOW, KILL_PROCESS, RET_ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
CLONE_THREAD = 0x00010000
X32_BIT = 0x40000000
# (audit arch, clone, clone3, refused: fork-like ones, ptrace, process_vm_readv/writev) per machine;
# ptrace too, or the child could stop or steer bubblewrap's pid 1 beside it. seccomp_data: nr @0, arch @4, args[0] @16
ABIS = {
    "x86_64": (0xC000003E, 56, 435, (57, 58, 101, 310, 311)),  # fork, vfork, ptrace, process_vm_*
    "aarch64": (0xC00000B7, 220, 435, (117, 270, 271)),  # no fork/vfork syscalls there
}
ABIS["amd64"], ABIS["arm64"] = ABIS["x86_64"], ABIS["aarch64"]


def seccomp_filter(machine: str) -> bytes:
    """The filter program as bytes of `struct sock_filter`; KeyError for an unknown machine."""
    arch, clone, clone3, refused = ABIS[machine.lower()]
    # (opcode, true target, false target, k); targets are labels or None (= the next instruction)
    prog = [(LD_ABS_W, None, None, 4), (JEQ, None, "kill", arch), (LD_ABS_W, None, None, 0)]
    if machine.lower() in ("x86_64", "amd64"):
        prog.append((JGE, "kill", None, X32_BIT))
    prog.append((JEQ, "enosys", None, clone3))  # glibc then falls back to clone for threads
    prog += [(JEQ, "eperm", None, nr) for nr in refused]
    prog += [(JEQ, None, "allow", clone), (LD_ABS_W, None, None, 16), (JSET, "allow", "eperm", CLONE_THREAD)]
    labels = {
        "allow": (RET, ALLOW),
        "eperm": (RET, RET_ERRNO | errno.EPERM),
        "enosys": (RET, RET_ERRNO | errno.ENOSYS),
        "kill": (RET, KILL_PROCESS),
    }
    where = {name: len(prog) + i for i, name in enumerate(labels)}
    out = []
    for i, (code, jt, jf, k) in enumerate(prog):
        jump = [0 if t is None else where[t] - i - 1 for t in (jt, jf)]  # relative to the next one
        out.append(struct.pack("=HBBI", code, jump[0], jump[1], k))
    out += [struct.pack("=HBBI", code, 0, 0, k) for code, k in labels.values()]
    return b"".join(out)


def _quote(path: str) -> str:
    return '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _ancestors(path: str) -> list[str]:
    parts = path.rstrip("/").split("/")
    return ["/".join(parts[:i]) or "/" for i in range(1, len(parts))]


def seatbelt_profile(reads: list[str], work: str, python: str) -> str:
    """A `sandbox-exec -p` profile: `reads` (real paths) and `work` readable, only `work`
    writable, `python` the one program that may be executed; everything else denied."""
    read_rules = " ".join(f"(subpath {_quote(p)})" for p in [*reads, work])
    # Resolving a path stats its parents; allowing that metadata (not contents) keeps Python's
    # start-up working without listing those directories.
    parents = sorted({a for p in [*reads, work] for a in _ancestors(p)})
    return "\n".join(
        [
            "(version 1)",
            "(deny default)",
            "(deny network*)",
            "(deny process-fork)",
            f"(allow process-exec (literal {_quote(python)}))",
            f"(allow file-read* {read_rules})",
            "(allow file-read-metadata " + " ".join(f"(literal {_quote(a)})" for a in parents) + ")",
            '(allow file-read* (literal "/dev/null") (literal "/dev/urandom") (literal "/dev/random"))',
            f'(allow file-write* (subpath {_quote(work)}) (literal "/dev/null"))',
            "(allow sysctl-read)",
            "(allow signal (target self))",
            "",
        ]
    )
