"""Progress on long commands: a transient rich bar on the terminal's stderr, nothing elsewhere.

``progress(label, total, enabled)`` is a context manager. Entering it gives an update function, or None
when the bar is off (``enabled`` false, e.g. ``--json``, or stderr not a terminal), so piped output and
JSON stay clean:

- ``total`` a count: ``update(n=1, note=None)`` advances by ``n`` and shows ``note`` beside the label
  (e.g. a live TTFT p50);
- ``total`` 1.0: ``update(description, fraction)`` for work measured as a share of a budget (the
  planner's time limit).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from .tables import err_console


class progress:
    def __init__(self, label: str, total: float, enabled: bool = True):
        self.label, self.total, self.enabled = label, total, enabled and sys.stderr.isatty()
        self.bar = None

    def __enter__(self) -> Callable | None:
        if not self.enabled:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        counted = self.total != 1.0
        columns = [TextColumn("{task.description}"), BarColumn()]
        if counted:
            columns += [MofNCompleteColumn(), TextColumn("ETA"), TimeRemainingColumn()]
        self.bar = Progress(*columns, transient=True, console=err_console)
        self.bar.start()
        task = self.bar.add_task(self.label, total=self.total)
        if not counted:
            return lambda what, frac: self.bar.update(task, completed=frac, description=what)

        def advance(n: int = 1, note: str | None = None) -> None:
            description = self.label if note is None else f"{self.label} ({note})"
            self.bar.update(task, advance=n, description=description)

        return advance

    def __exit__(self, *exc) -> bool:
        if self.bar is not None:
            self.bar.stop()
        return False


def note(message: str, enabled: bool = True) -> None:
    """One line on stderr for a terminal user (``loading smollm2-135m ...``); silent when piped."""
    if enabled and sys.stderr.isatty():
        err_console.print(message, highlight=False)
