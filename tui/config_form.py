"""The configuration screen: the main fields of a run, checked with the CLI's own rules
(`build_config`, `ConfigError`) as they are typed, and the key that starts the run."""

from __future__ import annotations

import re

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Button, Footer, Header, Input, Label, Select, Static

from grpo_mlx.config import FIELDS, LOSS_TYPES, ConfigError, TrainConfig, build_config, to_dict

# The fields on the form, in order; every other option keeps the value it was opened with
# (defaults, -c file, flags).
FORM_FIELDS = [
    ("model", "model"),
    ("data", "data"),
    ("adapter_path", "run directory"),
    ("group_size", "group size (G)"),
    ("batch_size", "batch size (B)"),
    ("loss_type", "loss type"),
    ("beta", "beta (KL)"),
    ("epsilon", "epsilon (clip)"),
    ("learning_rate", "learning rate"),
    ("iters", "steps (iters)"),
    ("max_completion_length", "max completion tokens"),
    ("temperature", "temperature"),
    ("reward_functions", "reward functions"),
    ("reward_weights", "reward weights"),
]
PLACEHOLDERS = {
    "adapter_path": "runs/<timestamp>",
    "reward_weights": "all 1",
    "model": "embedded demo model",
    "data": "embedded demo task",
}


def shown(value) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def form_config(base: TrainConfig, edits: dict[str, str]) -> TrainConfig:
    """The configuration the form describes: `base` with the edited fields, validated by
    build_config exactly as `grpo-mlx train` validates flags. Raises ConfigError."""
    flags = {k: v for k, v in to_dict(base).items() if v is not None}
    for name, text in edits.items():
        text = text.strip()
        if "list" in str(FIELDS[name].type):
            flags[name] = [v for v in re.split(r"[\s,]+", text) if v] or None
        else:
            flags[name] = text or None
        if flags[name] is None:
            flags.pop(name)
    return build_config(flags)


class ConfigScreen(Screen):
    BINDINGS = [
        Binding("ctrl+s", "start", "Start", priority=True),
        Binding("s", "start", "Start", show=False),
    ]

    def __init__(self, config: TrainConfig, source: str | None = None):
        super().__init__()
        self.base = config
        self.source = source

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll(id="form"), Grid(id="fields"):
            for name, label in FORM_FIELDS:
                yield Label(label, classes="field-label")
                value = getattr(self.base, name)
                if name == "loss_type":
                    yield Select(
                        [(t, t) for t in LOSS_TYPES],
                        value=value,
                        allow_blank=False,
                        compact=True,
                        id=f"field-{name}",
                    )
                else:
                    yield Input(shown(value), placeholder=PLACEHOLDERS.get(name, ""), compact=True, id=f"field-{name}")
        with Vertical(id="side"):
            yield Static(self.intro(), id="intro")
            yield Static("", id="field-help")
            yield Static("", id="error")
            yield Button("Start training", variant="success", id="start")
        yield Footer()

    def intro(self) -> str:
        where = (
            f"read from {self.source}"
            if self.source
            else "of the embedded demo"
            if self.base.is_demo
            else "from the flags"
        )
        return (
            f"The configuration {where}. Edit any field; every other option keeps its value "
            "(grpo-mlx train --help lists them). Start: s or Enter on the button, ctrl+s anywhere."
        )

    def on_mount(self) -> None:
        self.sub_title = "configure a run"
        self.check()
        self.query_one("#start").focus()

    def edits(self) -> dict[str, str]:
        out = {}
        for name, _ in FORM_FIELDS:
            widget = self.query_one(f"#field-{name}")
            out[name] = str(widget.value) if isinstance(widget, Select) else widget.value
        return out

    def check(self) -> TrainConfig | None:
        """Validate the form; show the problem next to it. Returns the config when valid."""
        error = self.query_one("#error", Static)
        try:
            cfg = form_config(self.base, self.edits())
        except ConfigError as e:
            error.update(f"✖ {e}")
            error.set_class(True, "invalid")
            return None
        error.update(f"✓ valid: {cfg.iters} steps of {cfg.batch_size}×{cfg.group_size} completions")
        error.set_class(False, "invalid")
        return cfg

    def on_input_changed(self) -> None:
        self.check()

    def on_select_changed(self) -> None:
        self.check()

    def on_descendant_focus(self, event) -> None:
        name = (event.widget.id or "").removeprefix("field-")
        help_text = FIELDS[name].metadata.get("help", "") if name in FIELDS else ""
        self.query_one("#field-help", Static).update(f"{name}: {help_text}" if help_text else "")

    def on_input_submitted(self) -> None:
        self.action_start()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "start":
            self.action_start()

    def action_start(self) -> None:
        cfg = self.check()
        if cfg is None or not self.plan_allows(cfg):
            self.app.bell()
            return
        self.app.start_run(cfg)

    def plan_allows(self, cfg: TrainConfig) -> bool:
        """The memory plan refuses here, before the model loads, what `grpo-mlx train` refuses;
        its sentence is shown as the form's other errors are."""
        import io

        from grpo_mlx.errors import UserError
        from grpo_mlx.plan import check_run

        if cfg.resume:  # as train: a resumed run was planned when it started
            return True
        try:
            check_run(cfg, out=io.StringIO())  # the short plan is for a terminal; the form shows the refusal
        except UserError as e:
            error = self.query_one("#error", Static)
            error.update(f"✖ {e}")
            error.set_class(True, "invalid")
            return False
        return True
