"""A run directory has one owner and one history.

`claim(cfg)` runs before the model loads. It refuses a run directory that is a file, that is
(or lies inside) the model or data directory, that cannot be written, that already holds another
run (unless the run is resumed or `overwrite` starts it over), or a resumed one without a
complete checkpoint; then it takes an exclusive lock (fcntl.flock on `.lock`, released by the
kernel when the process ends however it ends) that records the owner's pid and host, so a second
trainer on the same directory is refused naming the first. No MLX import here.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
from pathlib import Path

from grpo_mlx.errors import UserError

LOCK_NAME = ".lock"
# What a run writes; `overwrite` deletes exactly these, never other files a user keeps there.
RUN_FILES = (
    "config.json",
    "metrics.jsonl",
    "samples.jsonl",
    "summary.json",
    "adapters.safetensors",
    "adapter_config.json",
    "judge_cache.jsonl",
    "trackers.json",
)
RUN_DIRS = ("checkpoints",)


class RunDirError(UserError, RuntimeError):
    """The run directory cannot be used: another run owns it, or it is the wrong place."""


def holds_run(run_dir: Path) -> bool:
    return any((run_dir / name).exists() for name in RUN_FILES + RUN_DIRS)


def has_checkpoint(run_dir: Path) -> bool:
    root = run_dir / "checkpoints"
    return root.is_dir() and any((p / "state.json").is_file() for p in root.glob("step_*"))


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_place(run_dir: Path, model: str | None, data: str | None) -> None:
    """Refuse a run directory that would write into the model or the data, or that is a file."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--adapter-path {run_dir}: is a file, not a directory; name a directory for the run")
    target = run_dir.expanduser().resolve()
    for what, value in (("model", model), ("data", data)):
        if not value:
            continue
        local = Path(value).expanduser()
        if not local.is_dir():
            continue  # a Hub id or one data file: no directory to protect
        folder = local.resolve()
        if _inside(target, folder):
            raise RunDirError(
                f"--adapter-path {run_dir}: is inside the {what} directory {folder}; "
                f"choose a run directory outside it (adapters and logs would mix with the {what})"
            )


def check_writable(folder: Path, what: str = "--adapter-path") -> None:
    """Create the folder and write a probe file in it, so a read-only or full filesystem is found
    now, not at the first checkpoint."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"x" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise RunDirError(
            f"{what} {folder}: cannot write there ({e.strerror or e}); "
            "free space, fix the permissions or choose another directory"
        ) from None


class RunLock:
    """An exclusive flock on `run_dir/.lock`; the file says who holds it."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirError(f"{self.path}: cannot lock the run directory ({e.strerror or e})") from None
            holder = self.holder() or "another process"
            raise RunDirError(
                f"{self.path.parent}: another trainer ({holder}) is using this run directory; "
                "wait for it to end or stop it, or choose another --adapter-path"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self.fd = fd
        return self

    def holder(self) -> str:
        try:
            return self.path.read_text(encoding="utf-8").strip()
        except OSError:
            return ""

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


def clear_run(run_dir: Path) -> None:
    """Delete the files of the run in run_dir (for `overwrite`), nothing else."""
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for name in RUN_DIRS:
        shutil.rmtree(run_dir / name, ignore_errors=True)


def claim(cfg, run_dir: str | os.PathLike) -> RunLock:
    """Check the run directory for this config and lock it; call before the model loads and
    `release()` the result when the run ends."""
    run_dir = Path(run_dir)
    check_place(run_dir, cfg.model, cfg.data)
    if cfg.resume and not run_dir.is_dir():
        raise RunDirError(f"--resume {run_dir}: no such directory")
    check_writable(run_dir, "--resume" if cfg.resume else "--adapter-path")
    lock = RunLock(run_dir).acquire()
    try:
        if cfg.resume:
            if not has_checkpoint(run_dir):
                raise RunDirError(
                    f"--resume {run_dir}: no complete checkpoint in {run_dir / 'checkpoints'} "
                    f"(start over with --adapter-path {run_dir} --overwrite)"
                )
        elif holds_run(run_dir):
            if not cfg.overwrite:
                what = "a run" if has_checkpoint(run_dir) else "the files of a run that saved no checkpoint"
                raise RunDirError(
                    f"--adapter-path {run_dir}: already holds {what}; continue it with "
                    f"--resume {run_dir}, start over with --overwrite (deletes its checkpoints "
                    "and logs), or choose another directory"
                )
            clear_run(run_dir)
    except BaseException:
        lock.release()
        raise
    return lock
