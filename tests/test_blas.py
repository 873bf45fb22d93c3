import os
import subprocess
import sys

import pytest

from grpo_mlx import blas
from grpo_mlx.config import build_config
from grpo_mlx.events import EventBus
from grpo_mlx.trainer import Trainer

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the system OpenBLAS is a Linux matter")
HAS_OPENBLAS = any(os.path.exists(p) for p in blas.CANDIDATES if p.startswith("/"))


def hint_in_subprocess(no_blas: bool) -> str:
    """blas_hint() of a fresh interpreter, where grpo_mlx loads (or skips) OpenBLAS before MLX."""
    env = dict(os.environ)
    env.pop("GRPO_MLX_NO_BLAS", None)
    if no_blas:
        env["GRPO_MLX_NO_BLAS"] = "1"
    code = "import grpo_mlx, mlx.core; from grpo_mlx.blas import blas_hint; print(repr(blas_hint()))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.strip().splitlines()[-1]


@linux_only
def test_the_bundled_blas_gets_one_line_with_the_measured_figure():
    line = eval(hint_in_subprocess(no_blas=True))
    assert line is not None and "\n" not in line
    assert f"{blas.BUNDLED_SLOWDOWN:.0f}x faster" in line and blas.BUNDLED_SLOWDOWN > 1


@linux_only
@pytest.mark.skipif(not HAS_OPENBLAS, reason="needs the system OpenBLAS")
def test_no_hint_when_the_system_openblas_is_loaded():
    assert hint_in_subprocess(no_blas=False) == "None"


@linux_only
def test_without_the_library_the_hint_names_the_package(monkeypatch):
    monkeypatch.setattr(blas, "_loaded", None)
    monkeypatch.setattr(blas, "CANDIDATES", ["/nonexistent/libopenblas.so.0"])
    monkeypatch.delenv("GRPO_MLX_NO_BLAS", raising=False)
    assert "apt install libopenblas0-pthread" in blas.blas_hint()


@linux_only
@pytest.mark.skipif(not HAS_OPENBLAS, reason="needs the system OpenBLAS on disk")
def test_when_switched_off_on_purpose_the_hint_says_how_to_switch_back(monkeypatch):
    monkeypatch.setattr(blas, "_loaded", None)
    monkeypatch.setenv("GRPO_MLX_NO_BLAS", "1")
    line = blas.blas_hint()
    assert "GRPO_MLX_NO_BLAS" in line and "apt install" not in line


def test_never_on_macos(monkeypatch):
    monkeypatch.setattr(blas, "_loaded", None)
    monkeypatch.setattr(sys, "platform", "darwin")
    assert blas.blas_hint() is None


@linux_only
@pytest.mark.parametrize("bundled", [True, False])
def test_a_run_says_it_at_start_only_on_the_bundled_blas(tmp_path, monkeypatch, bundled):
    monkeypatch.setattr(blas, "_loaded", None if bundled else "/usr/lib/libopenblas.so.0")
    cfg = build_config({"adapter_path": str(tmp_path / "run"), "iters": 1, "eval_limit": 0, "batch_size": 2,
                        "group_size": 2})  # fmt: skip
    seen = []
    bus = EventBus()
    bus.subscribe(seen.append)
    Trainer(cfg, bus).run()
    lines = [e["text"] for e in seen if e["type"] == "message" and "bundled reference BLAS" in e["text"]]
    assert len(lines) == (1 if bundled else 0)
    if bundled:  # at start: right after the start event, before any step
        kinds = [e["type"] if "bundled reference BLAS" not in e.get("text", "") else "hint" for e in seen]
        assert kinds.index("start") < kinds.index("hint") < kinds.index("step")
