"""Progress on stderr: one rich progress bar per pipeline phase plus one-line log messages."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class Reporter:
    """Phase-by-phase display on stderr; silent when ``enabled`` is False."""

    def __init__(self, enabled: bool = True, console: Console | None = None):
        self.enabled = enabled
        self.console = console or Console(stderr=True, highlight=False, soft_wrap=True)

    def log(self, msg: str, *, always: bool = False) -> None:
        """Print one line to stderr (``always``: even when progress is off, e.g. --quiet)."""
        if self.enabled or always:
            self.console.print(msg, markup=False)

    @contextmanager
    def phase(self, title: str, total: int) -> Iterator[Callable[..., None]]:
        """Yields ``advance(n=1, note="")``; the bar disappears and one summary line stays."""
        if not self.enabled:
            yield lambda n=1, note="": None
            return
        prog = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                        MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.fields[note]}"), console=self.console, transient=True)
        with prog:
            task = prog.add_task(title, total=total, note="")

            def advance(n: int = 1, note: str = "") -> None:
                prog.update(task, advance=n, note=note)

            yield advance
