"""`grpo-mlx tui`: a Textual dashboard for GRPO runs, live (in-process) or attached to a run
directory. Pure-Python parts (state, health rules, plotting, file tailing) import no Textual,
so they are unit-tested on their own; nothing here imports MLX at start-up."""
