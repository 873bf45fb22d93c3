"""grpo-mlx: GRPO training of language models with LoRA adapters on MLX."""

__version__ = "0.1.0"
