"""Checkpoints that survive a kill at any moment.

Layout of a run directory:
    adapters.safetensors, adapter_config.json   latest adapters, mlx-lm's format
    checkpoints/step_0000050/                   adapters + optimizer.safetensors + state.json
    checkpoints/latest                          name of the newest complete checkpoint

A checkpoint is written into a temporary directory, flushed, then renamed into place; only then
does `latest` move (itself by write-then-rename). A kill or a full disk mid-write leaves the
previous checkpoint untouched and at most a `.tmp-*` directory, which the next save removes.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from grpo_mlx.errors import UserError
from grpo_mlx.policy import save_adapters


class CheckpointError(UserError, RuntimeError):
    """A checkpoint could not be written (full disk, permissions); earlier ones are intact."""


KEEP = 3  # complete checkpoints kept; adapters are small, optimizer state is twice that


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def save_checkpoint(
    run_dir, step: int, model, adapter_config: dict, optimizer, state: dict, extra: dict | None = None
) -> Path:
    """Write checkpoint `step` atomically and publish its adapters at the top of run_dir.
    `extra` maps a name to arrays saved beside them as `<name>.safetensors`."""
    run_dir = Path(run_dir)
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    name = f"step_{step:07d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    try:
        save_adapters(model, adapter_config, tmp)
        opt_state = dict(tree_flatten(optimizer.state))
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), opt_state)
        for extra_name, arrays in (extra or {}).items():
            mx.save_safetensors(str(tmp / f"{extra_name}.safetensors"), arrays)
        _write_text_atomic(tmp / "state.json", json.dumps({**state, "step": step}, indent=2))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for fname in ("adapters.safetensors", "adapter_config.json"):
            _copy_atomic(final / fname, run_dir / fname)
        _write_text_atomic(root / "latest", name + "\n")
    except RuntimeError as e:  # MLX reports a failed write as RuntimeError: "[write] Unable to write ..."
        shutil.rmtree(tmp, ignore_errors=True)
        if not any(word in str(e).lower() for word in ("write", "open")):
            raise
        raise OSError(errno.EIO, f"MLX could not write the arrays ({e}; is the disk full?)", str(tmp)) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(root, keep=KEEP)
    return final


def step_of(path: Path) -> int:
    """The step a checkpoint directory holds, from its name (-1 if it is none)."""
    try:
        return int(path.name.removeprefix("step_"))
    except ValueError:
        return -1


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest step first (by number: names sort wrong past 9,999,999)."""
    found = [p for p in root.glob("step_*") if step_of(p) >= 0 and (p / "state.json").exists()]
    return sorted(found, key=step_of)


def prune(root: Path, keep: int = KEEP) -> None:
    """Keep the `keep` highest steps and, always, the one `latest` names."""
    pointer = root / "latest"
    latest = pointer.read_text(encoding="utf-8").strip() if pointer.exists() else None
    for old in complete_checkpoints(root)[:-keep]:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir) -> Path | None:
    """The newest complete checkpoint: the one `latest` names, else the highest complete step."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if pointer.exists():
        candidate = root / pointer.read_text(encoding="utf-8").strip()
        if (candidate / "state.json").exists():
            return candidate
    complete = complete_checkpoints(root)
    return complete[-1] if complete else None


def load_checkpoint(path, model, optimizer) -> dict:
    """Restore adapter weights and optimizer state in place; return the trainer state."""
    path = Path(path)
    weights = mx.load(str(path / "adapters.safetensors"))
    model.load_weights(list(weights.items()), strict=False)
    opt_file = path / "optimizer.safetensors"
    if opt_file.exists():
        flat = mx.load(str(opt_file))
        if flat:
            optimizer.state = tree_unflatten(list(flat.items()))
    return json.loads((path / "state.json").read_text(encoding="utf-8"))
