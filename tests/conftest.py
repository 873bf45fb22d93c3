import os

import pytest

# The hub is unreachable here: fail fast instead of retrying, and never wait on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from grpo_mlx.blas import use_system_blas  # noqa: E402

use_system_blas()  # before any test imports MLX


@pytest.fixture(scope="module")
def model_and_tokenizer():
    """The demo model in float32 and its tokenizer, loaded once per test module."""
    import mlx.core as mx

    from grpo_mlx.config import DEMO_MODEL
    from grpo_mlx.policy import load_model

    model, tok = load_model(DEMO_MODEL)
    model.set_dtype(mx.float32)
    return model, tok
