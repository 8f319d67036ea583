"""Progress reporting: one live bar per stage on a terminal, plain lines in a log, silence when disabled.

A *stage* is one named piece of work ("backbone", a strategy's "λ=0.5" setting, "features: train"). Each stage
gets one line, however many epochs it runs: :meth:`Progress.track` drives its bar through the batches of
the current epoch and :meth:`Progress.epoch` shows the epoch's loss and val accuracy on the same line.
A training loop feeds each batch's loss to :meth:`Progress.step`: the bar then shows the epoch's running loss
next to the time left in the epoch. On a non-terminal (a CI log, a pipe, nohup) the same calls print one readable
line per finished epoch (and per finished stage without epochs), with no control characters, plus a line with the
running loss and the time left whenever ``interval`` seconds (30) pass inside an epoch, so a long epoch is never
silent. Library use is silent unless asked (``Progress(enabled=True)``).

Listeners (:meth:`Progress.add_listener`) receive every finished epoch's numbers whether or not anything is
shown: experiment trackers subscribe this way, so training loops report an epoch once.
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, TypeVar

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console

T = TypeVar("T")

#: what a listener receives for one finished epoch: ``(stage, epoch (0-based), {metric: value})``
EpochListener = Callable[[str, int, dict[str, float]], None]
#: seconds between two progress lines inside an epoch when the output is not a terminal
PLAIN_INTERVAL = 30.0


def format_metrics(metrics: dict[str, float | None]) -> str:
    """``loss 0.412, val accuracy 0.9344`` (None values are left out)."""
    return ", ".join(f"{k.replace('_', ' ')} {v:.4g}" for k, v in metrics.items() if v is not None)


def format_duration(seconds: float) -> str:
    """``0:01:05`` (hours:minutes:seconds)."""
    seconds = max(round(seconds), 0)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _epoch_text(epoch: int | None, epochs: int | None) -> str:
    if epoch is None:
        return ""
    return f"epoch {epoch + 1}/{epochs}" if epochs else f"epoch {epoch + 1}"


class Progress:
    """Stage bars (``track``), per-epoch metrics (``epoch``) and messages (``log``).

    ``enabled=False`` prints nothing. Otherwise ``live`` picks rich bars (default: when the console is a
    terminal) or plain lines. Output goes to stderr, so a command's result on stdout stays clean. Plain lines
    inside an epoch come every ``interval`` seconds of ``clock`` (default ``time.monotonic``; injectable, so tests
    need no real minute).
    """

    def __init__(self, enabled: bool = False, console: Console | None = None, live: bool | None = None, *,
                 interval: float = PLAIN_INTERVAL, clock: Callable[[], float] | None = None):
        self.enabled = enabled
        self._console = console
        self._live = live
        self.interval = interval
        self.clock = clock or time.monotonic
        self._bars: Any = None  # the rich Progress while a live session runs
        self._stages: dict[str, dict[str, Any]] = {}  # stage -> {"task", "epoch", "metrics", "running"}
        self._running: dict[str, list[float]] = {}  # stage -> [loss sum, steps] of the current epoch
        self._listeners: list[EpochListener] = []

    def add_listener(self, listener: EpochListener) -> None:
        """Call ``listener(stage, epoch, metrics)`` after every finished epoch, shown or not."""
        self._listeners.append(listener)

    def remove_listener(self, listener: EpochListener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def step(self, stage: str, loss: float) -> None:
        """One training step's loss: kept as the running mean of the current epoch of ``stage`` and shown on
        its bar (terminal) or in its next interim line (plain)."""
        if not self.enabled:
            return
        run = self._running.setdefault(stage, [0.0, 0])
        run[0] += float(loss)
        run[1] += 1

    def running_loss(self, stage: str) -> float | None:
        """The mean of the losses :meth:`step` received in the current epoch of ``stage`` (None: none yet)."""
        run = self._running.get(stage)
        return run[0] / run[1] if run and run[1] else None

    @property
    def console(self) -> Console:
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=True)
        return self._console

    @property
    def live(self) -> bool:
        """True: rich bars redrawn in place; False: plain lines (logs, pipes)."""
        return self.console.is_terminal if self._live is None else self._live

    @contextmanager
    def session(self) -> Iterator[Progress]:
        """Keep the live bars on screen for the duration of a command (re-entrant; a no-op when plain)."""
        if not self.enabled or not self.live or self._bars is not None:
            yield self
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        columns = (TextColumn("{task.description}"), BarColumn(bar_width=30), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                   TextColumn("{task.fields[status]}", markup=False))
        with RichProgress(*columns, console=self.console, transient=False) as bars:
            self._bars, self._stages = bars, {}
            try:
                yield self
            finally:
                self._bars, self._stages = None, {}

    def _show(self, stage: str, restart: bool, **update: Any) -> Any:
        """Create the one bar of ``stage`` or update it (``restart``: back to 0 for a new epoch).

        ``epoch``, ``running`` and ``metrics`` in ``update`` set the status text; other keys go to the bar."""
        state = self._stages.setdefault(stage, {"epoch": "", "running": "", "metrics": ""})
        for key in ("epoch", "running", "metrics"):
            if key in update:
                state[key] = update.pop(key)
        last = f"last epoch: {state['metrics']}" if state["metrics"] and state["running"] else state["metrics"]
        status = " · ".join(t for t in (state["epoch"], state["running"], last) if t)
        if "task" not in state:
            state["task"] = self._bars.add_task(stage, status=status, **update)
        elif restart:
            self._bars.reset(state["task"], status=status, **update)
        else:
            self._bars.update(state["task"], status=status, **update)
        return state["task"]

    def track(self, iterable: Iterable[T], stage: str, total: int | None = None, *, epoch: int | None = None,
              epochs: int | None = None) -> Iterator[T]:
        """Yield ``iterable``'s items while advancing the bar of ``stage``.

        In a training stage pass ``epoch`` (0-based) and ``epochs``: the stage keeps one bar, which shows
        the current epoch (next to the last finished epoch's metrics) and restarts at each epoch;
        :meth:`epoch` reports an epoch's metrics when it ends.
        """
        if not self.enabled:
            yield from iterable
            return
        self._running.pop(stage, None)  # a new epoch: its running loss starts afresh
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        if self._bars is None:
            yield from self._track_plain(iterable, stage, total, epoch, epochs)
            return
        task = self._show(stage, True, total=total, epoch=_epoch_text(epoch, epochs), running="")
        for item in iterable:
            yield item
            loss = self.running_loss(stage)
            if loss is not None:
                self._show(stage, False, advance=1, running=f"loss {loss:.4g} (running)")
            else:
                self._bars.advance(task)

    def _track_plain(self, iterable: Iterable[T], stage: str, total: int | None, epoch: int | None,
                     epochs: int | None) -> Iterator[T]:
        """Plain lines: one every ``interval`` seconds inside the stage (steps done, running loss, time left),
        and for a stage without epochs one when it finishes."""
        start = last = self.clock()
        count = 0
        for item in iterable:
            yield item
            count += 1
            now = self.clock()
            if now - last >= self.interval:
                last = now
                self.log(self._interim_line(stage, count, total, now - start, epoch, epochs))
        if epoch is None:
            self.log(f"{stage}: {count} steps in {self.clock() - start:.1f} s")

    def _interim_line(self, stage: str, count: int, total: int | None, elapsed: float, epoch: int | None,
                      epochs: int | None) -> str:
        where = " ".join(t for t in (stage, _epoch_text(epoch, epochs)) if t)
        parts = [f"{count}/{total} steps" if total else f"{count} steps"]
        loss = self.running_loss(stage)
        if loss is not None:
            parts.append(f"running loss {loss:.4g}")
        parts.append(f"{format_duration(elapsed)} elapsed")
        if total and count < total:
            parts.append(f"about {format_duration(elapsed / count * (total - count))} left")
        return f"{where}: {', '.join(parts)}"

    def epoch(self, stage: str, epoch: int, epochs: int, *, record: dict[str, float | None] | None = None,
              **metrics: float | None) -> None:
        """One finished epoch of a training stage with its metrics (e.g. ``loss``, ``val_accuracy``): shown
        on the stage's bar, or printed as one line when plain. Listeners get ``metrics`` plus ``record``
        (numbers worth tracking but too many to show, e.g. every exit's accuracy)."""
        numbers = {k: float(v) for k, v in {**metrics, **(record or {})}.items() if v is not None}
        for listener in list(self._listeners):
            listener(stage, epoch, numbers)
        if not self.enabled:
            return
        text = format_metrics(metrics)
        if self._bars is None:
            self.log(f"{stage} epoch {epoch + 1}/{epochs}: {text}")
        elif "task" in self._stages.get(stage, {}) and not self._stages[stage].get("by_epoch"):
            self._show(stage, False, epoch=_epoch_text(epoch, epochs), metrics=text, running="")
        else:  # no batches tracked for this stage: its bar counts epochs
            self._show(stage, False, total=epochs, completed=epoch + 1, epoch=_epoch_text(epoch, epochs),
                       metrics=text)
            self._stages[stage]["by_epoch"] = True

    def log(self, message: str) -> None:
        """A line of text above the bars (or on stderr when plain); never read as markup."""
        if not self.enabled:
            return
        if self._bars is not None:
            self._bars.console.print(message, markup=False, highlight=False)
        elif self.live:
            self.console.print(message, markup=False, highlight=False)
        else:
            print(message, file=sys.stderr, flush=True)
