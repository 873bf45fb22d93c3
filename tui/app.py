"""The Textual app: a configuration screen, then a dashboard fed by the trainer's events.

Live run: a thread worker imports MLX, builds the Trainer and runs it; the trainer's bus hands
each event dict to `GrpoApp.feed`. Attached run: a thread worker tails metrics.jsonl and
samples.jsonl and feeds the same dicts. `feed` queues events and posts one small message that
collapses with any still waiting (`can_replace`), so a burst of steps (a replayed run, a fast
model) costs one redraw, not one per step.

Nothing here imports MLX or mlx-lm at module level: the first screen paints before them.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from collections import deque

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, Footer, Header, Label, TabbedContent, TabPane
from textual.worker import get_current_worker

from grpo_mlx import events
from grpo_mlx.config import TrainConfig
from grpo_mlx.events import Control, Event, EventBus
from tui import health
from tui.config_form import ConfigScreen
from tui.state import RunState
from tui.tail import RunFollower
from tui.widgets import AdvantagePanel, ChartGrid, HealthPanel, LogPanel, ProgressPanel, SamplesPanel

POLL_SECONDS = 0.5  # how often an attached dashboard looks for new lines


class EventsArrived(Message):
    """New events wait in the app's inbox. One such message is as good as many."""

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, EventsArrived)


class DashboardScreen(Screen):
    BINDINGS = [
        Binding("p", "pause", "Pause/resume"),
        Binding("s", "save", "Save now"),
        Binding("x", "stop", "Stop & save"),
        Binding("left_square_bracket", "browse(-1)", "Earlier", key_display="["),
        Binding("right_square_bracket", "browse(1)", "Later", key_display="]"),
        Binding("end", "latest", "Latest", show=False),
        Binding("1", "tab('charts')", "Charts", show=False),
        Binding("2", "tab('advantages')", "Advantages", show=False),
        Binding("3", "tab('samples')", "Samples", show=False),
        Binding("4", "tab('log')", "Log", show=False),
    ]

    def __init__(self, live: bool):
        super().__init__()
        self.live = live
        self.viewing: int | None = None  # the step whose samples are shown; None: follow the latest

    def compose(self) -> ComposeResult:
        yield Header()
        yield ProgressPanel(id="progress")
        yield HealthPanel(id="health")
        with TabbedContent(initial="charts"):
            with TabPane("1 Charts", id="charts"), VerticalScroll():
                yield ChartGrid(id="chart-grid")
            with TabPane("2 Advantages", id="advantages"), VerticalScroll():
                yield AdvantagePanel(id="advantage-panel")
            with TabPane("3 Samples", id="samples"), VerticalScroll():
                yield SamplesPanel(id="samples-panel")
            with TabPane("4 Log", id="log"), VerticalScroll(id="log-scroll"):
                yield LogPanel(id="log-view")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "live run" if self.live else "attached"
        self.show(self.app.state, [])

    # ------------------------------------------------------------------ drawing
    def show(self, state: RunState, new_events: list[Event]) -> None:
        self.query_one(ProgressPanel).show(state, self.live, self.app.quiet_for())
        self.query_one(HealthPanel).show(health.check(state.steps, state.series))
        if any(e.get("type") == "step" for e in new_events) or not new_events:
            self.query_one(ChartGrid).show(state)
        if any(e.get("type") == "samples" for e in new_events) or not new_events:
            self.show_samples()
        if self.query_one(LogPanel).show(state.log, state.log_total):
            self.query_one("#log-scroll", VerticalScroll).scroll_end(animate=False)

    def current_step(self) -> int | None:
        steps = self.app.state.sample_steps()
        if self.viewing in steps:
            return self.viewing
        return steps[-1] if steps else None

    def show_samples(self) -> None:
        state = self.app.state
        step, following = self.current_step(), self.viewing is None
        self.query_one(AdvantagePanel).show(state, step, following)
        self.query_one(SamplesPanel).show(state, step, following)

    # ------------------------------------------------------------------ keys
    def action_browse(self, delta: int) -> None:
        steps = self.app.state.sample_steps()
        if not steps:
            return
        at = steps.index(self.current_step())
        at = max(0, min(len(steps) - 1, at + delta))
        self.viewing = None if at == len(steps) - 1 and delta > 0 else steps[at]
        self.show_samples()

    def action_latest(self) -> None:
        self.viewing = None
        self.show_samples()

    def action_tab(self, tab: str) -> None:
        self.query_one(TabbedContent).active = tab

    def action_pause(self) -> None:
        self.app.toggle_pause()

    def action_save(self) -> None:
        self.app.save_now()

    def action_stop(self) -> None:
        self.app.stop_run()


class ConfirmQuit(ModalScreen[str]):
    """Asked when quitting while a run is active."""

    BINDINGS = [Binding("escape", "dismiss('')", "Cancel")]

    def compose(self) -> ComposeResult:
        with Grid(id="confirm"):
            yield Label(
                "A run is in progress.\nStop it after this step and save a checkpoint, or quit now "
                "keeping only the checkpoints already saved?",
                id="confirm-question",
            )
            with Horizontal(id="confirm-buttons"):
                yield Button("Stop, save, quit", variant="primary", id="stop")
                yield Button("Quit now", variant="error", id="now")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#stop").focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id if event.button.id != "cancel" else "")


class GrpoApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "grpo-mlx"
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("ctrl+q", "quit", "Quit", show=False, priority=True),
    ]

    def __init__(self, config: TrainConfig | None = None, attach: str | None = None, source: str | None = None):
        super().__init__()
        self.config = config
        self.attach = attach
        self.source = source  # the -c file, shown on the form
        self.state = RunState()
        self.controls = Control()
        self.live = attach is None
        self.inbox: deque[Event] = deque()
        self.last_event_at: float | None = None
        self.quit_when_ended = False
        self.training_thread: threading.Thread | None = None

    def on_mount(self) -> None:
        if self.attach:
            self.push_screen(DashboardScreen(live=False))
            self.follow(self.attach)
        else:
            self.push_screen(ConfigScreen(self.config, self.source))
        self.set_interval(1.0, self.tick)

    # ------------------------------------------------------------------ events in
    def feed(self, event: Event) -> None:
        """Queue one event; callable from any thread (post_message is thread-safe)."""
        self.inbox.append(event)
        self.post_message(EventsArrived())

    def feed_many(self, events: list[Event]) -> None:
        if events:
            self.inbox.extend(events)
            self.post_message(EventsArrived())

    def on_events_arrived(self, message: EventsArrived) -> None:
        events = []
        while self.inbox:
            events.append(self.inbox.popleft())
        if not events:
            return
        self.last_event_at = time.monotonic()
        for event in events:
            self.state.apply(event)
            if event.get("type") == "checkpoint":
                self.notify(f"checkpoint saved at step {event.get('step')}", title="saved")
            if event.get("type") == "message" and event.get("level") in ("warning", "error"):
                self.notify(str(event.get("text")), severity=event["level"], timeout=8)
        if isinstance(self.screen, DashboardScreen):
            self.screen.show(self.state, events)
        if self.quit_when_ended and not self.state.active:
            self.exit()

    def quiet_for(self) -> float | None:
        return None if self.last_event_at is None else time.monotonic() - self.last_event_at

    def tick(self) -> None:
        # redraw the progress line between events (an attached run gone quiet says so)
        for screen in self.screen_stack:
            if isinstance(screen, DashboardScreen):
                for panel in screen.query(ProgressPanel):  # none until the screen is composed
                    panel.show(self.state, screen.live, self.quiet_for())

    # ------------------------------------------------------------------ live run
    def start_run(self, cfg: TrainConfig) -> None:
        self.config = cfg
        self.state = RunState(status="loading", total_steps=cfg.iters)
        self.controls = Control()
        self.switch_screen(DashboardScreen(live=True))
        self.train(cfg, self.controls)

    @work(thread=True, exclusive=True, group="run", exit_on_error=False)
    def train(self, cfg: TrainConfig, controls: Control) -> None:
        """Runs the whole training in this thread: MLX streams are thread-local, so the model,
        optimizer and every step live here (an array made in one thread cannot be used in another)."""
        self.training_thread = threading.current_thread()
        try:
            from grpo_mlx.blas import use_system_blas

            use_system_blas()  # before MLX is first imported
            from grpo_mlx.trainer import Trainer

            bus = EventBus()
            bus.subscribe(self.feed)
            trainer = Trainer(cfg, bus, controls)
            trainer.run()
        except BaseException as e:  # report every failure on the dashboard, never in a traceback dump
            from grpo_mlx.cli import user_errors

            text = str(e) if isinstance(e, user_errors()) else "".join(traceback.format_exception(e)).rstrip()
            self.feed(events.Message(level="error", text=text or type(e).__name__).to_json())
            self.feed(events.End(step=self.state.step, summary={}, status="failed").to_json())
        finally:
            mx = sys.modules.get("mlx.core")
            if mx is not None and hasattr(mx, "clear_streams"):
                mx.clear_streams()  # this pool thread may run other work later
            self.training_thread = None

    def training_alive(self) -> bool:
        thread = self.training_thread
        return thread is not None and thread.is_alive()

    def toggle_pause(self) -> None:
        if not self.running_here():
            return
        if self.controls.pause.is_set():
            self.controls.pause.clear()
            self.state.status = "running"
            self.notify("resumed")
        else:
            self.controls.pause.set()
            self.state.status = "pausing"
            self.notify("pausing after the current step")
        self.redraw()

    def save_now(self) -> None:
        if not self.running_here():
            return
        self.controls.save_now.set()
        paused = self.controls.pause.is_set()
        # the trainer saves after a step completes, so a paused run saves once resumed
        self.notify("checkpoint after the next step" + (" (resume to save)" if paused else ""))

    def stop_run(self) -> None:
        if not self.running_here():
            return
        self.controls.stop.set()
        self.controls.pause.clear()
        self.state.status = "stopping"
        self.notify("stopping after the current step; a checkpoint will be saved")
        self.redraw()

    def running_here(self) -> bool:
        if not self.live:
            self.notify("attached: pause, save and stop act only on runs started in this dashboard", severity="warning")
            return False
        return self.state.active and self.state.status != "stopping"

    def redraw(self) -> None:
        if isinstance(self.screen, DashboardScreen):
            self.screen.show(self.state, [])

    # ------------------------------------------------------------------ attached run
    @work(thread=True, exclusive=True, group="follow")
    def follow(self, run_dir: str) -> None:
        worker = get_current_worker()
        follower = RunFollower(run_dir)
        while not worker.is_cancelled:
            self.feed_many(follower.read())
            time.sleep(POLL_SECONDS)

    def deliver_screenshot(self, filename=None, path=None, time_format=None):
        # The command palette's "Screenshot" saves to ~/Downloads, which many Linux machines lack:
        # save next to the run (or in the working directory) instead.
        return super().deliver_screenshot(filename, path or self.state.run_dir or os.getcwd(), time_format)

    # ------------------------------------------------------------------ quitting
    async def action_quit(self) -> None:
        if isinstance(self.screen, ConfirmQuit):
            return
        if self.live and self.state.active:
            self.push_screen(ConfirmQuit(), self.quit_choice)
        else:
            self.exit()

    def quit_choice(self, choice: str | None) -> None:
        if choice == "now":
            self.exit()
        elif choice == "stop":
            self.quit_when_ended = True
            self.stop_run()
