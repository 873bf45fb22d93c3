import os

# The hub is unreachable here: fail fast instead of retrying, and never wait on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from grpo_mlx.blas import use_system_blas  # noqa: E402

use_system_blas()  # before any test imports MLX
