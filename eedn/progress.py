"""Progress reporting: rich bars on a terminal, silence in tests and library use by default."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


class Progress:
    """``track`` wraps an iterable with a bar; ``log`` prints a line. ``enabled=False`` is silent."""

    def __init__(self, enabled: bool = False, console=None):
        self.enabled = enabled
        self._console = console
        self._progress = None

    @property
    def console(self):
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=True)
        return self._console

    @contextmanager
    def session(self) -> Iterator["Progress"]:
        if not self.enabled:
            yield self
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn

        with RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          console=self.console, transient=False) as p:
            self._progress = p
            try:
                yield self
            finally:
                self._progress = None

    def track(self, iterable: Iterable[T], description: str, total: int | None = None) -> Iterable[T]:
        if not self.enabled or self._progress is None:
            yield from iterable
            return
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        task = self._progress.add_task(description, total=total)
        for item in iterable:
            yield item
            self._progress.advance(task)

    def epoch(self, stage: str, epoch: int, epochs: int, **metrics: float) -> None:
        """One finished epoch of a training stage, with its loss / val accuracy."""
        if self.enabled:
            parts = [f"{k.replace('_', ' ')} {v:.4g}" for k, v in metrics.items() if v is not None]
            self.log(f"{stage} epoch {epoch + 1}/{epochs}: " + ", ".join(parts))

    def log(self, message: str) -> None:
        if self.enabled:
            (self._progress.console if self._progress is not None else self.console).print(message)
