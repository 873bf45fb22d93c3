"""Checkpoint pruning orders by step and never removes what `latest` points to; MLX write
errors become an OSError the trainer turns into one sentence."""

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest

from grpo_mlx import checkpoint


def fake(root, step):
    path = root / "checkpoints" / f"step_{step:07d}"
    path.mkdir(parents=True)
    (path / "state.json").write_text("{}")
    return path


def test_pruning_orders_by_step_not_by_name(tmp_path):
    for step in (9_999_997, 9_999_998, 9_999_999, 10_000_000):
        fake(tmp_path, step)
    (tmp_path / "checkpoints" / "latest").write_text("step_10000000\n")
    checkpoint.prune(tmp_path / "checkpoints", keep=3)
    left = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert "step_10000000" in left and "step_9999997" not in left and len(left) == 3
    assert checkpoint.latest_checkpoint(tmp_path).name == "step_10000000"


def test_latest_fallback_is_the_highest_step(tmp_path):
    for step in (9_999_999, 10_000_000):
        fake(tmp_path, step)
    assert checkpoint.latest_checkpoint(tmp_path).name == "step_10000000"


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = [nn.Linear(4, 4)]


def save(run, step):
    model = Tiny()
    return checkpoint.save_checkpoint(run, step, model, {"fine_tune_type": "lora"}, optim.AdamW(1e-3), {})


def test_pruning_never_removes_what_latest_points_to(tmp_path):
    for step in (20, 30, 40):
        fake(tmp_path, step)
    path = save(tmp_path, 5)  # a lower step than the ones already there
    assert path.exists() and checkpoint.latest_checkpoint(tmp_path) == path


def test_mlx_write_error_is_an_oserror_and_leaves_no_temporary(tmp_path, monkeypatch):
    def failing(*a, **k):
        raise RuntimeError("[write] Unable to write 100 bytes to file.")

    monkeypatch.setattr(mx, "save_safetensors", failing)
    with pytest.raises(OSError, match="MLX could not write"):
        save(tmp_path, 1)
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
