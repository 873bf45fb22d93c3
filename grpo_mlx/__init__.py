"""grpo-mlx: GRPO training of language models with LoRA adapters on MLX."""

from grpo_mlx.blas import use_system_blas

__version__ = "0.1.0"

# On Linux, bind MLX's CPU backend to a system OpenBLAS before anything imports MLX: every entry
# point (CLI, TUI, a user's script) then gets the same fast and bit-identical matmuls.
use_system_blas()
