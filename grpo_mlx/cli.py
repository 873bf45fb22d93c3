"""`grpo-mlx` command line. Flags are generated from `TrainConfig`, so the dataclass stays the
single source of truth; `-c run.yaml` fills what flags leave unset.

Heavy imports (MLX, mlx-lm) happen only inside the command that needs them, after the system
BLAS has been loaded (grpo_mlx.blas).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import signal
import sys
import time
from pathlib import Path

from grpo_mlx import metric_names as M
from grpo_mlx.config import FIELDS, ConfigError, TrainConfig, build_config, build_resumed_config, flag_name

EXIT_USAGE = 2
EXIT_FAILURE = 1
WRITE_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM}


class Parser(argparse.ArgumentParser):
    """argparse with two additions, for the top-level parser and (as its class) each subcommand's:
    an unknown option is refused by the subcommand that got it, with its own usage line and the
    closest of its own flags; and `add_synonym` gives a flag a second spelling (TRL's, mlx-lm's)
    that must not disagree with the first."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.synonyms: list[tuple[str, str, str]] = []  # (synonym dest, canonical dest, synonym flag)

    def error(self, message: str):
        """One short usage line and the sentence, not argparse's full list of every flag (train
        has a hundred; `--help` shows them grouped)."""
        self.exit(2, f"usage: {self.prog} [options]  (see {self.prog} --help)\n{self.prog}: error: {message}\n")

    def add_synonym(self, flag: str, canonical: str, group=None) -> None:
        """`flag` as a hidden second spelling of the existing option `canonical`."""
        action = self._option_string_actions[canonical]
        dest = f"synonym:{flag}"
        kw: dict = {"dest": dest, "default": None, "help": argparse.SUPPRESS}
        if isinstance(action, argparse.BooleanOptionalAction):
            kw["action"] = argparse.BooleanOptionalAction
        elif isinstance(action, argparse._StoreTrueAction):
            kw["action"] = "store_true"
        else:
            kw.update(nargs=action.nargs, type=action.type, choices=action.choices, metavar=action.metavar)
        (group or self).add_argument(flag, **kw)
        action.help = f"{action.help or ''} (also {flag})".strip()
        self.synonyms.append((dest, action.dest, flag))

    def parse_known_args(self, args=None, namespace=None):
        namespace, unknown = super().parse_known_args(args, namespace)
        if unknown and getattr(self, "is_subcommand", False):
            self.refuse_unknown(unknown)  # here, not in the top parser: this usage line, these flags
        self._fold_synonyms(namespace)
        return namespace, unknown

    def _fold_synonyms(self, namespace) -> None:
        for dest, canonical, flag in self.synonyms:
            value = getattr(namespace, dest, None)
            if hasattr(namespace, dest):
                delattr(namespace, dest)
            if value is None:
                continue
            current, default = getattr(namespace, canonical, None), self.get_default(canonical)
            if current not in (None, default) and current != value:
                first = next(a for a in self._actions if a.dest == canonical).option_strings[-1]
                self.error(f"{flag} {value} and {first} {current} are two spellings of one option; give one")
            setattr(namespace, canonical, value)

    def refuse_unknown(self, unknown: list[str]) -> None:
        """argparse says only "unrecognized arguments"; name the closest valid flag too, or, for a
        name that means something else here (TRL's per_device_train_batch_size), the conversion."""
        import difflib

        from grpo_mlx.config import DIFFERENT_MEANING

        flags = [o for o in self._option_string_actions if o.startswith("--")]
        for arg in unknown:
            if arg.startswith("--"):
                name = arg.split("=")[0]
                key = name[2:].replace("-", "_")
                if key in DIFFERENT_MEANING and "--batch-size" in flags:
                    self.error(f"unknown option {name}: {DIFFERENT_MEANING[key]}")
                match = difflib.get_close_matches(name, flags, n=1, cutoff=0.6)
                hint = f" (did you mean {match[0]}?)" if match else ""
                self.error(f"unknown option {arg}{hint}")
        self.error(f"unexpected arguments: {' '.join(unknown)}")


def add_config_flags(parser: Parser) -> None:
    """One flag per TrainConfig field, named as mlx-lm names its flags (--batch-size ...), in the
    help groups of config.OPTION_GROUPS, with TRL's and mlx-lm's other spellings (config.SYNONYMS)."""
    from grpo_mlx.config import OPTION_GROUPS, SYNONYMS

    parser.add_argument("-c", "--config", help="YAML file with any of the options below (flags win).")
    parser.add_argument("--debug", action="store_true", help="Show Python tracebacks on errors.")
    group_of = {name: title for title, names in OPTION_GROUPS.items() for name in names}
    groups = {title: parser.add_argument_group(title) for title in OPTION_GROUPS}
    for f in sorted(
        dataclasses.fields(TrainConfig),
        key=lambda f: list(group_of).index(f.name) if f.name in group_of else len(group_of),
    ):
        group = groups.get(group_of.get(f.name)) or groups.setdefault("other", parser.add_argument_group("other"))
        _add_field_flag(group, f)
    for synonym, name in SYNONYMS.items():
        parser.add_synonym(flag_name(synonym), flag_name(name), group=groups.get(group_of.get(name)))


def _add_field_flag(group, f: dataclasses.Field) -> None:
    flag = flag_name(f.name)
    kind = str(f.type)
    help_text = f.metadata.get("help", "")
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if default not in (None, [], ""):
        help_text += f" [default: {default}]"
    if "bool" in kind:
        group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
    elif "list" in kind:
        group.add_argument(flag, nargs="+", default=None, help=help_text, metavar="VALUE")
    else:
        metavar = "N" if "int" in kind else "X" if "float" in kind else "JSON" if "dict" in kind else "TEXT"
        group.add_argument(flag, default=None, help=help_text, metavar=metavar)


# Other commands live in their own modules, each with `HELP`, `add_arguments(parser)` and
# `run(args) -> int`, registered as entry points of this group (pyproject.toml). Those modules
# must import cheaply (MLX only inside `run`).
COMMAND_GROUP = "grpo_mlx.commands"
COMMAND_ORDER = ("tui", "eval", "fuse", "bench", "plan")  # as `grpo-mlx --help` lists them; others after


def make_parser() -> argparse.ArgumentParser:
    from importlib.metadata import entry_points

    parser = Parser(
        prog="grpo-mlx",
        description="GRPO training of language models with LoRA adapters on MLX. "
        "With no options, `grpo-mlx train` runs the embedded demo.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = sub.add_parser("train", help="Train adapters with GRPO (headless, with a progress bar).")
    train.is_subcommand = True
    add_config_flags(train)
    train.add_argument(
        "--dry-run",
        action="store_true",
        help="Load config, rewards, data and tokenizer; show the first rendered prompts and the rewards "
        "of a sample completion; train nothing, write nothing.",
    )
    train.set_defaults(func=cmd_train)
    found = entry_points(group=COMMAND_GROUP)
    rank = {name: i for i, name in enumerate(COMMAND_ORDER)}
    for entry in sorted(found, key=lambda e: (rank.get(e.name, len(rank)), e.name)):
        module = entry.load()
        command = sub.add_parser(entry.name, help=module.HELP, description=module.HELP)
        command.is_subcommand = True
        module.add_arguments(command)
        command.set_defaults(func=module.run)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    flags = {name: getattr(args, name, None) for name in FIELDS}
    if args.resume:  # the recorded run, with only the options that may change (config.RESUME_MAY_CHANGE)
        return build_resumed_config(args.resume, flags, args.config)
    return build_config(flags, args.config)


# ------------------------------------------------------------------ headless progress


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressPrinter:
    """A one-line progress bar on a terminal, one line per step otherwise (logs, CI)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.total = 0
        self.start_step = 0
        self.t0 = time.time()
        self.recent: list[float] = []

    def write(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        self.stream.flush()

    def __call__(self, event: dict) -> None:
        kind = event["type"]
        if kind == "start":
            self.total, self.start_step = event["total_steps"], event["start_step"]
            self.t0 = time.time()
            cfg = event["config"]
            self.write(f"grpo-mlx: run directory {event['run_dir']}")
            self.write(
                f"  model {cfg['model']}  |  {event['train_examples']} train prompts, "
                f"{event['eval_examples']} held-out  |  B={cfg['batch_size']} G={cfg['group_size']} "
                f"loss={cfg['loss_type']} beta={cfg['beta']}  |  BLAS: {event['blas']}"
            )
            if event["start_step"]:
                self.write(f"  resuming at step {event['start_step']}")
        elif kind == "message":
            self.write(f"{event['level']}: {event['text']}")
        elif kind == "eval":
            m = event["metrics"]
            acc = f"accuracy {m['accuracy']:.1%}, " if "accuracy" in m else ""
            calls = f", calls a tool {m['tool_use']:.1%}" if "tool_use" in m else ""  # runs with tools
            self.write(
                f"held-out ({event['name']}, {m['n']} prompts, greedy): {acc}mean reward {m['mean_reward']:.3f}{calls}"
            )
        elif kind == "step":
            self._step(event)
        elif kind == "end":
            s = event["summary"]
            if "accuracy_before" in s and "accuracy_after" in s:
                self.write(f"held-out accuracy: {s['accuracy_before']:.1%} -> {s['accuracy_after']:.1%}")
            if "tool_use_before" in s and "tool_use_after" in s:
                self.write(f"held-out episodes calling a tool: {s['tool_use_before']:.1%} -> {s['tool_use_after']:.1%}")
            self.write(
                f"{event['status']} after {event['step']} steps in {_fmt_time(time.time() - self.t0)}; "
                f"adapters in {s.get('run_dir')}"
            )

    def _step(self, event: dict) -> None:
        step, m = event["step"], event["metrics"]
        if m.get(M.SKIPPED):
            self.write(f"step {step}/{self.total} skipped")
            return
        self.recent = (self.recent + [m[M.STEP_TIME]])[-20:]
        per_step = sum(self.recent) / len(self.recent)
        eta = per_step * (self.total - step)
        frac = step / max(self.total, 1)
        bar = "#" * int(frac * 20) + "-" * (20 - int(frac * 20))
        acc = m.get(M.reward_mean("accuracy"))
        parts = [f"step {step:>{len(str(self.total))}}/{self.total} [{bar}]", f"reward {m[M.REWARD]:.3f}"]
        if acc is not None:
            parts.append(f"acc {acc:.2f}")
        if M.KL in m:
            parts.append(f"kl {m[M.KL]:.4f}")
        parts += [f"len {m[M.MEAN_LENGTH]:.1f}", f"{per_step:.2f}s/step", f"ETA {_fmt_time(eta)}"]
        line = "  ".join(parts)
        if self.tty:
            self.stream.write("\r\033[K" + line)
            self.stream.flush()
            if step == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
            self.stream.flush()


# ------------------------------------------------------------------ commands


def cmd_train(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if getattr(args, "dry_run", False):
        from grpo_mlx.dryrun import dry_run

        return dry_run(cfg, sys.stdout)
    from grpo_mlx.blas import use_system_blas

    use_system_blas()
    import mlx.core as mx

    from grpo_mlx.plan import check_run

    if mx.distributed.init().rank() == 0 and not cfg.resume:
        check_run(cfg)  # the memory plan: refused here, before any weight loads
    from grpo_mlx.events import EventBus
    from grpo_mlx.trainer import Trainer

    bus = EventBus()
    if mx.distributed.init().rank() == 0:  # under mlx.launch, one progress bar, not one per rank
        bus.subscribe(ProgressPrinter())
    trainer = Trainer(cfg, bus)
    main_rank = mx.distributed.init().rank() == 0
    if cfg.push_to_hub and main_rank:  # a missing token is found before the training, not after
        from grpo_mlx import hub

        hub.check_token(cfg.push_to_hub, "nothing was trained")
    try:
        with graceful_stop(trainer.control, started=trainer.control.training.is_set):
            summary = trainer.run()
    except KeyboardInterrupt:
        print(f"\n{abort_message(trainer.run_dir)}", file=sys.stderr)
        return 130
    if summary.get("status") == "stopped":
        return 130
    if cfg.push_to_hub and main_rank:
        url = hub.push_adapters(trainer.run_dir, cfg.push_to_hub)
        print(f"grpo-mlx: adapters uploaded to {url}", file=sys.stderr)
    return 0


def abort_message(run_dir) -> str:
    """What an abort leaves: the --resume hint only when a checkpoint exists to resume from."""
    from grpo_mlx.rundir import has_checkpoint

    if has_checkpoint(Path(run_dir)):
        return f"aborted; the last saved checkpoint is intact (continue with --resume {run_dir})"
    return (
        "aborted before the first checkpoint; nothing to resume "
        "(start again, with --overwrite for the same --adapter-path)"
    )


@contextlib.contextmanager
def graceful_stop(control, started=lambda: True):
    """First Ctrl-C or SIGTERM: finish the current step, save, exit. A second Ctrl-C aborts at
    once (the last saved checkpoint stays intact), and so does the first one before training
    has `started()` (loading a model or evaluating can take minutes)."""

    def handler(signum, frame):
        if control.stop.is_set() or not started():
            raise KeyboardInterrupt
        control.stop.set()
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{name}: stopping after this step and saving (Ctrl-C again to abort now)", file=sys.stderr, flush=True)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input: shown as one sentence, no traceback."""
    from grpo_mlx.errors import UserError

    return (UserError, FileNotFoundError)


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("\naborted", file=sys.stderr)
        return 130
    except Exception as e:
        if getattr(args, "debug", False):
            raise
        if isinstance(e, OSError) and e.errno in WRITE_ERRORS:  # a full or read-only disk is no bug
            place = f" {e.filename}" if e.filename else ""
            print(
                f"grpo-mlx: error: cannot write{place}: {e.strerror or e}; free space or choose "
                "another place (--adapter-path)",
                file=sys.stderr,
            )
            return EXIT_FAILURE
        if not isinstance(e, user_errors()):
            raise
        print(f"grpo-mlx: error: {e}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, ConfigError) else EXIT_FAILURE
