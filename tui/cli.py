"""`grpo-mlx tui`: the dashboard's command. Imports cheaply (Textual and MLX only inside `run`),
as every command module registered in pyproject.toml must."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

HELP = (
    "Terminal dashboard: configure and start a run (the demo by default) and watch it live, "
    "or follow a run directory that `grpo-mlx train` is writing (--attach RUN_DIR)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from grpo_mlx.cli import add_config_flags

    add_config_flags(parser)
    parser.add_argument(
        "--attach", metavar="RUN_DIR", help="Follow (or look back through) the run in RUN_DIR instead of starting one."
    )


def run(args: argparse.Namespace) -> int:
    from grpo_mlx.cli import config_from_args

    config = None
    if args.attach:
        if os.path.exists(args.attach) and not os.path.isdir(args.attach):
            print(f"grpo-mlx: error: --attach {args.attach}: not a directory", file=sys.stderr)
            return 2
        # a missing directory is waited for: `grpo-mlx train` creates it only once the model is loaded
    else:
        config = config_from_args(args)  # a bad flag or -c file is refused as `train` refuses it

    from tui.app import GrpoApp

    app = GrpoApp(config=config, attach=args.attach, source=args.config)
    # Our own loop: asyncio.run() would wait at exit for the worker threads, and the trainer's
    # thread cannot be interrupted mid-step.
    loop = asyncio.new_event_loop()
    app.run(loop=loop)
    if app.training_alive():
        # "Quit now": the trainer thread cannot be cancelled and would keep the process alive.
        # Checkpoints are written atomically, so leaving mid-step keeps the last one intact.
        saved = app.state.checkpoints
        kept = (
            f"the checkpoint of step {saved[-1]['step']} is kept (continue with: grpo-mlx train --resume "
            f"{app.state.run_dir})"
            if saved
            else "no checkpoint had been saved yet"
        )
        print(f"grpo-mlx: quit during training at step {app.state.step}; {kept}", file=sys.stderr, flush=True)
        os._exit(130)
    loop.close()
    return app.return_code or 0
