"""The dashboard's widgets. Each draws from a `RunState` (tui/state.py) and does no arithmetic
beyond placing text: the numbers come from the trainer's events, the plots from tui/plot.py."""

from __future__ import annotations

from rich.text import Text
from textual.containers import Grid
from textual.widget import Widget
from textual.widgets import Static

from grpo_mlx import metric_names as M
from tui.health import Alert
from tui.plot import bar, braille_chart, columns_text, compact, histogram, value_range
from tui.state import RunState, finite

# (metric, title, note shown when the metric is not logged); reward functions' charts are
# inserted after the total reward as soon as their `rewards/<fn>/mean` metric appears.
CHARTS = [
    (M.REWARD, "reward (total)", ""),
    (M.REWARD_STD, "reward std (in group)", ""),
    (M.FRAC_REWARD_ZERO_STD, "groups with zero reward std", ""),
    (M.KL, "KL to the reference", "not logged: beta = 0"),
    (M.LOSS, "loss", ""),
    (M.GRAD_NORM, "grad norm", ""),
    (M.CLIP_REGION, "clip ratio", ""),
    (M.ENTROPY, "token entropy", "not logged"),
    (M.MEAN_LENGTH, "mean completion length", ""),
    (M.CLIPPED_RATIO, "cut at the length limit", ""),
    (M.LEARNING_RATE, "learning rate", ""),
    (M.PEAK_MEMORY_GB, "peak memory (GB)", ""),
]
# charts of the objective's options, added when their metric first appears (most runs never log them)
OPTION_CHARTS = [
    (M.ENTROPY_COEF, "entropy coefficient"),
    (M.ENTROPY_KEPT, "tokens kept by the entropy mask"),
    (M.OFF_POLICY_DROPPED, "tokens dropped off-policy"),
    (M.CISPO_CLIP, "cispo: ratio at the cap"),
    (M.VESPO_PHI, "vespo: sequence weight"),
    (M.SAMPLING_LOGP_DIFF, "sampler/trainer log-prob gap"),
    (M.IS_RATIO_MEAN, "mismatch weight (mean)"),
    (M.JUDGE_TIME, "judge time (s)"),
    (M.JUDGE_UNPARSEABLE, "unreadable judgments"),
    (M.TOOL_CALLS, "tool calls per episode"),
    (M.TOOL_ERRORS, "failed tool calls per episode"),
    (M.TOOL_TURNS, "turns per episode"),
    (M.TOOL_CUT, "episodes cut at max turns"),
]
USER_CHARTS = 8  # at most this many charts of what reward functions log (log_metric)
CHART_MIN_WIDTH = 36  # cells; the grid shows as many columns as fit
LABEL_WIDTH = 10  # y-axis labels: compact() numbers are at most 9 characters

STATUS_STYLE = {
    "ready": "dim",
    "loading": "yellow",
    "running": "bold green",
    "pausing": "yellow",
    "paused": "bold yellow",
    "stopping": "yellow",
    "finished": "bold cyan",
    "stopped": "bold yellow",
    "failed": "bold red",
    "interrupted": "bold red",
    "waiting": "dim",
}


def advantage_style(advantage: float) -> str:
    """Green for positive, red for negative; brighter the larger, dim near zero."""
    if not finite(advantage) or abs(advantage) < 0.05:
        return "dim"
    colour = "green" if advantage > 0 else "red"
    if abs(advantage) >= 1.0:
        return f"bold {colour}"
    return colour if abs(advantage) >= 0.3 else f"dim {colour}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Chart(Widget):
    """One metric over steps: a title line with the latest value, then a braille line chart
    with its y range on the left."""

    def __init__(self, metric: str, title: str, note: str = "", **kwargs):
        super().__init__(**kwargs)
        self.metric, self.title, self.note = metric, title, note
        self.steps: list[int] = []
        self.values: list = []

    def show(self, steps: list[int], values: list) -> None:
        self.steps, self.values = steps, values
        self.refresh()

    def render(self) -> Text:
        width, height = self.content_size
        logged = [v for v in self.values if v is not None]
        latest = next((v for v in reversed(logged) if finite(v)), None)
        head = Text(self.title, style="bold")
        value = compact(latest) if latest is not None else ""
        if any(not finite(v) for v in logged):
            value = f"NaN! {value}"
        head.append(" " * max(1, width - len(self.title) - len(value)))
        head.append(value, style="bold red" if value.startswith("NaN") else "bold")
        out = [head]
        body = max(height - 1, 1)
        found = value_range(self.values)
        if found is None:
            out.append(Text(self.note if self.steps and self.note else "", style="dim italic"))
            return Text("\n").join(out)
        lo, hi = found
        lines = braille_chart(self.values, max(width - LABEL_WIDTH, 1), body, lo, hi)
        for i, line in enumerate(lines):
            label = compact(hi) if i == 0 else compact(lo) if i == len(lines) - 1 else ""
            row = Text(label.rjust(LABEL_WIDTH - 1)[: LABEL_WIDTH - 1] + " ", style="dim")
            row.append(line, style="cyan")
            out.append(row)
        return Text("\n").join(out)


class ChartGrid(Grid):
    """Every chart; reward functions' and options' charts are added when their metric first appears."""

    def compose(self):
        for metric, title, note in CHARTS:
            yield Chart(metric, title, note, id=chart_id(metric))

    def show(self, state: RunState) -> None:
        after = self.query_one(f"#{chart_id('reward')}", Chart)
        for fn in state.reward_functions():
            metric = M.reward_mean(fn)
            if not self.query(f"#{chart_id(metric)}"):
                chart = Chart(metric, f"reward: {fn}", id=chart_id(metric))
                self.mount(chart, after=after)
                after = chart
            else:
                after = self.query_one(f"#{chart_id(metric)}", Chart)
        logged = state.series
        user = [m for m in logged if M.is_logged_by_user(m)][:USER_CHARTS]
        for metric, title in [*OPTION_CHARTS, *((m, f"logged: {m}") for m in user)]:
            if metric in logged and not self.query(f"#{chart_id(metric)}"):
                self.mount(Chart(metric, title, id=chart_id(metric)))
        for chart in self.query(Chart):
            chart.show(state.steps, state.values(chart.metric))

    def on_resize(self) -> None:
        self.styles.grid_size_columns = max(1, self.size.width // CHART_MIN_WIDTH)


def chart_id(metric: str) -> str:
    return "chart-" + "".join(c if c.isascii() and c.isalnum() else "-" for c in metric)  # a valid widget id


class ProgressPanel(Static):
    """Status, step x/N with a bar, seconds per step, ETA and tokens per second."""

    def show(self, state: RunState, live: bool, quiet_for: float | None = None) -> None:
        status = state.status
        if not live and status == "ready":
            status = "waiting"
        line = Text()
        line.append(f" {status.upper()} ", style=f"reverse {STATUS_STYLE.get(status, '')}")
        total = state.total_steps
        line.append(f"  step {state.step}/{total or '?'}  ", style="bold")
        frac = state.step / total if total else 0.0
        line.append(bar(frac, 24), style="green")
        line.append(f" {frac:4.0%}", style="bold")
        per_step = state.seconds_per_step()
        line.append(f"   {per_step:.2f} s/step" if per_step else "   - s/step")
        line.append(f"   ETA {duration(state.eta_seconds()) if status == 'running' else '-'}")
        tps = state.latest(M.TOKENS_PER_SECOND)
        line.append(f"   {tps:,.0f} tok/s" if tps is not None else "   - tok/s")
        hint = ""
        if status == "loading":
            hint = "loading the model and data..."
        elif state.active and not state.steps:
            hint = "held-out evaluation before training..."
        elif status == "pausing":
            hint = "pausing after this step..."
        elif status == "stopping":
            hint = "stopping after this step, then saving..."
        elif status == "waiting":
            hint = "waiting for the run to write metrics.jsonl..."
        elif not live and state.active and quiet_for is not None and quiet_for > 60:
            hint = f"no new step for {duration(quiet_for)}"
        second = Text(f" {state.run_dir or ''}", style="dim")
        if state.model:
            second.append(f"  |  {state.model}", style="dim")
        if hint:
            second.append(f"  {hint}", style="italic yellow")
        self.update(Text("\n").join([line, second]))


class HealthPanel(Static):
    def show(self, alerts: list[Alert]) -> None:
        if not alerts:
            self.update(Text(" ✓ no warnings", style="green"))
            return
        lines = [
            Text(
                f" {'✖' if a.level == 'error' else '⚠'} {a.text}", style="bold red" if a.level == "error" else "yellow"
            )
            for a in alerts
        ]
        self.update(Text("\n").join(lines))


def prompt_text(group: dict) -> str:
    if group.get("prompt_text"):
        return str(group["prompt_text"])
    prompt = group.get("prompt")
    if isinstance(prompt, list):  # chat messages
        return "\n".join(f"[{m.get('role')}] {m.get('content')}" for m in prompt if isinstance(m, dict))
    return str(prompt)


def question(group: dict) -> str:
    """What a group was asked: the last user message of a conversation (the start of a rendered
    template is the same system preamble for every group), else the prompt string itself."""
    prompt = group.get("prompt")
    if isinstance(prompt, list):
        users = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        if users:
            return str(users[-1])
    if isinstance(prompt, str) and prompt:
        return prompt
    return prompt_text(group)


def step_header(state: RunState, step: int | None, following: bool) -> Text:
    steps = state.sample_steps()
    if step is None:
        return Text("no samples yet", style="dim italic")
    where = "latest" if following else f"{steps.index(step) + 1} of {len(steps)} logged"
    head = Text(f"step {step}", style="bold")
    head.append(f"  ({where})   [ earlier   ] later   end: follow the latest", style="dim")
    return head


class AdvantagePanel(Static):
    """The advantages of one step: their histogram, then each group's completions ranked."""

    def show(self, state: RunState, step: int | None, following: bool) -> None:
        parts = [step_header(state, step, following)]
        groups = state.samples.get(step, []) if step is not None else []
        advantages = [c.get("advantage") for g in groups for c in g.get("completions", [])]
        if groups:
            parts.append(Text(f"\ndistribution of {len(advantages)} advantages ({len(groups)} groups)", style="bold"))
            bins = histogram(advantages, bins=9)
            most = max(c for _, _, c in bins) or 1
            for lo, hi, count in bins:
                row = Text(f"  {lo:+6.2f} .. {hi:+6.2f} ")
                row.append(bar(count / most, 30), style=advantage_style((lo + hi) / 2))
                row.append(f" {count}")
                parts.append(row)
        for i, group in enumerate(groups, 1):
            parts.append(Text(f"\ngroup {i}: {one_line(question(group), 60)}", style="bold"))
            if group.get("answer") is not None:
                parts[-1].append(f"   answer {group['answer']}", style="dim")
            comps = sorted(group.get("completions", []), key=lambda c: c.get("advantage") or 0.0, reverse=True)
            top = max((abs(c.get("advantage") or 0.0) for c in comps), default=0.0) or 1.0
            for c in comps:
                adv = c.get("advantage")
                style = advantage_style(adv)
                label = f"{adv:+.2f}" if finite(adv) else "NaN"
                row = Text(f"  {label:>6} ", style=style)
                row.append(bar(abs(adv or 0.0) / top, 10), style=style)
                row.append(f"  reward {compact(c.get('reward')):>6}  ")
                row.append(one_line(c.get("text", ""), 50))
                parts.append(row)
        self.update(Text("\n").join(parts))


class SamplesPanel(Static):
    """The groups of one step: the prompt, then every completion in full with its rewards."""

    def show(self, state: RunState, step: int | None, following: bool) -> None:
        parts = [step_header(state, step, following)]
        groups = state.samples.get(step, []) if step is not None else []
        for i, group in enumerate(groups, 1):
            parts.append(Text(f"\n━━ group {i} " + "━" * 40, style="bold blue"))
            parts.append(Text("prompt: ", style="bold").append(prompt_text(group), style="default"))
            if group.get("answer") is not None:
                parts.append(Text("answer: ", style="bold").append(str(group["answer"])))
            for j, c in enumerate(group.get("completions", []), 1):
                adv = c.get("advantage")
                head = Text(f"  #{j} ", style="bold")
                head.append(f"advantage {'NaN' if not finite(adv) else f'{adv:+.3f}'}", style=advantage_style(adv))
                head.append(f"  total {compact(c.get('reward'))}")
                for name, value in (c.get("rewards") or {}).items():
                    head.append(f"  {name} {compact(value) if value is not None else 'n/a'}", style="dim")
                head.append(f"  len {c.get('length')}  {c.get('finish_reason')}", style="dim")
                if c.get("finish_reason") == "length":
                    head.append(" (cut)", style="yellow")
                parts.append(head)
                if c.get("extra"):  # what reward functions logged beside it (a judge's score and reason)
                    parts.append(Text("     " + columns_text(c["extra"]), style="italic cyan"))
                if c.get("turns"):  # a multi-turn episode: each turn on its own, by role
                    parts += episode_lines(c["turns"])
                    continue
                text = c.get("text", "")
                parts.append(
                    Text(
                        "     " + text.replace("\n", "\n     ") if text else "     (empty)",
                        style="" if text else "dim italic",
                    )
                )
        self.update(Text("\n").join(parts))


TURN_STYLE = {"assistant": "", "tool_call": "bold magenta", "tool": "cyan"}
ERROR_STYLE = "bold red"


def episode_lines(turns: list[dict]) -> list[Text]:
    """An episode's turns (samples.jsonl's `turns`), one block each, told apart by a marker and
    a colour: the model's text, its tool calls with their arguments, the tools' results; a
    failed call or result in red."""
    lines = []
    for turn in turns:
        role, text, error = turn.get("role"), str(turn.get("text") or ""), bool(turn.get("error"))
        style = ERROR_STYLE if error else TURN_STYLE.get(role, "")
        if role == "tool_call":
            args = ", ".join(f"{k}={v!r}" for k, v in (turn.get("arguments") or {}).items())
            line = Text(f"     → call {turn.get('name')}({args})", style=style)
            if text:  # why it did not parse
                line.append(f"  {text}", style=style)
        elif role == "tool":
            line = Text(f"     ← {turn.get('name')}{' error' if error else ''}: ", style=style)
            line.append(text.replace("\n", "\n       "), style=style)
        else:
            body = text.replace("\n", "\n     ") if text else "(empty)"
            line = Text("     " + body, style=style if text else "dim italic")
        lines.append(line)
    return lines


def one_line(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


LOG_STYLE = {"warning": "yellow", "error": "bold red"}


class LogPanel(Static):
    """Messages, evaluations, checkpoints and the end of the run, as the CLI prints them."""

    shown_total = -1

    def show(self, log: list[tuple[str, str]], total: int) -> bool:
        """Redraw when lines were added; True if so (the caller then scrolls to the end)."""
        if total == self.shown_total:
            return False
        self.shown_total = total
        self.update(Text("\n").join(Text(line, style=LOG_STYLE.get(level, "")) for level, line in log))
        return True
