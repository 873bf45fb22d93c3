"""Use a system OpenBLAS for MLX's CPU backend on Linux.

The Linux `mlx[cpu]` wheel ships a reference BLAS (about 3-5 GFLOP/s for fp32 matmul on a laptop
core). Loading an optimised BLAS into the global symbol scope *before* MLX is imported makes MLX
resolve `cblas_sgemm` to it: 20-50x faster matmuls (measured by `grpo-mlx bench`). Nothing happens on
macOS, where MLX runs on Metal and Accelerate.
"""

from __future__ import annotations

import ctypes
import os
import sys

# Debian/Ubuntu (libopenblas0-pthread / libopenblas0), Fedora, then a generic name.
CANDIDATES = [
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
    "libopenblas.so.0",
]

_loaded: str | None = None
_tried = False


def use_system_blas() -> str | None:
    """Load OpenBLAS globally if this is Linux and MLX is not imported yet; return its path.

    Set GRPO_MLX_NO_BLAS=1 to skip (for comparing against the bundled BLAS).
    """
    global _loaded, _tried
    if _tried:
        return _loaded
    _tried = True
    if not sys.platform.startswith("linux") or os.environ.get("GRPO_MLX_NO_BLAS"):
        return None
    if "mlx.core" in sys.modules:  # too late: MLX already bound its BLAS symbols
        return None
    for path in CANDIDATES:
        if path.startswith("/") and not os.path.exists(path):
            continue
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        _loaded = path
        return path
    return None


def blas_name() -> str:
    """A short description of the BLAS MLX's CPU backend uses, for logs and `bench`."""
    if sys.platform == "darwin":
        return "Accelerate (macOS)"
    return f"OpenBLAS ({_loaded})" if _loaded else "bundled reference BLAS"


# The demo run (`grpo-mlx train`, its default settings, as a new user first runs it) on this
# project's 2-core Linux machine, with GRPO_MLX_NO_BLAS=1 and without (shortened runs, the machine
# shared with other jobs): start-up 47 s and each 200-prompt held-out evaluation 21-22 s either
# way (greedy decoding does not wait on the BLAS); a step 48 s on the bundled BLAS (median of 6)
# and 3.9 s on OpenBLAS (median of 62): 200 steps and two evaluations come to ~9,700 s vs ~870 s.
BUNDLED_SLOWDOWN = 11.0
INSTALL_HINT = "sudo apt install libopenblas0-pthread"  # Debian/Ubuntu; the first of CANDIDATES


def blas_hint() -> str | None:
    """One line for a run on Linux's CPU backend with MLX's bundled reference BLAS: how much
    faster it would be with the system OpenBLAS and how to get it; None otherwise (macOS, a GPU,
    or OpenBLAS loaded). Call it once MLX is imported."""
    if not sys.platform.startswith("linux") or _loaded:
        return None
    import mlx.core as mx

    if mx.default_device() != mx.cpu:
        return None
    gain = f"runs about {BUNDLED_SLOWDOWN:.0f}x faster on the system OpenBLAS (measured on the demo)"
    if os.environ.get("GRPO_MLX_NO_BLAS") and any(os.path.exists(p) for p in CANDIDATES if p.startswith("/")):
        return f"MLX is on its bundled reference BLAS because GRPO_MLX_NO_BLAS is set: this {gain}; unset it"
    return f"MLX is on its bundled reference BLAS: this {gain}; install it with `{INSTALL_HINT}`"
