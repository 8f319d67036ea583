"""Progress reporting: one live bar per stage on a terminal, plain lines in a log, silence when disabled.

A *stage* is one named piece of work ("backbone", a strategy's "λ=0.5" setting, "features: train"). Each stage
gets one line, however many epochs it runs: :meth:`Progress.track` drives its bar through the batches of
the current epoch and :meth:`Progress.epoch` shows the epoch's loss and val accuracy on the same line.
On a non-terminal (a CI log, a pipe) the same calls print one readable line per finished epoch (and per
finished stage without epochs), with no control characters. Library use is silent unless asked
(``Progress(enabled=True)``).
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterable, Iterator, TypeVar

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console

T = TypeVar("T")


def format_metrics(metrics: dict[str, float | None]) -> str:
    """``loss 0.412, val accuracy 0.9344`` (None values are left out)."""
    return ", ".join(f"{k.replace('_', ' ')} {v:.4g}" for k, v in metrics.items() if v is not None)


def _epoch_text(epoch: int | None, epochs: int | None) -> str:
    if epoch is None:
        return ""
    return f"epoch {epoch + 1}/{epochs}" if epochs else f"epoch {epoch + 1}"


class Progress:
    """Stage bars (``track``), per-epoch metrics (``epoch``) and messages (``log``).

    ``enabled=False`` prints nothing. Otherwise ``live`` picks rich bars (default: when the console is a
    terminal) or plain lines. Output goes to stderr, so a command's result on stdout stays clean.
    """

    def __init__(self, enabled: bool = False, console: Console | None = None, live: bool | None = None):
        self.enabled = enabled
        self._console = console
        self._live = live
        self._bars: Any = None  # the rich Progress while a live session runs
        self._stages: dict[str, dict[str, Any]] = {}  # stage -> {"task", "epoch", "metrics"}

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
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn

        columns = (TextColumn("{task.description}"), BarColumn(bar_width=30), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("{task.fields[status]}", markup=False))
        with RichProgress(*columns, console=self.console, transient=False) as bars:
            self._bars, self._stages = bars, {}
            try:
                yield self
            finally:
                self._bars, self._stages = None, {}

    def _show(self, stage: str, restart: bool, **update: Any) -> Any:
        """Create the one bar of ``stage`` or update it (``restart``: back to 0 for a new epoch).

        ``epoch`` and ``metrics`` in ``update`` set the status text; other keys go to the bar."""
        state = self._stages.setdefault(stage, {"epoch": "", "metrics": ""})
        for key in ("epoch", "metrics"):
            if key in update:
                state[key] = update.pop(key)
        status = " · ".join(t for t in (state["epoch"], state["metrics"]) if t)
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
        if self._bars is None:  # plain lines: a stage without epochs gets one line when it finishes
            start, count = time.perf_counter(), 0
            for item in iterable:
                yield item
                count += 1
            if epoch is None:
                self.log(f"{stage}: {count} steps in {time.perf_counter() - start:.1f} s")
            return
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        task = self._show(stage, True, total=total, epoch=_epoch_text(epoch, epochs))
        for item in iterable:
            yield item
            self._bars.advance(task)

    def epoch(self, stage: str, epoch: int, epochs: int, **metrics: float | None) -> None:
        """One finished epoch of a training stage with its metrics (e.g. ``loss``, ``val_accuracy``): shown
        on the stage's bar, or printed as one line when plain."""
        if not self.enabled:
            return
        text = format_metrics(metrics)
        if self._bars is None:
            self.log(f"{stage} epoch {epoch + 1}/{epochs}: {text}")
        elif "task" in self._stages.get(stage, {}) and not self._stages[stage].get("by_epoch"):
            self._show(stage, False, epoch=_epoch_text(epoch, epochs), metrics=text)
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
