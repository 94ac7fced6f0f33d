"""Terminal tables (rich) and JSON output shared by the CLI verbs."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

# Not a terminal (a pipe, a file, CI): wide enough that tables are not folded.
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True)


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=_default)
    sys.stdout.write("\n")


def _default(o):
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"cannot serialise {type(o).__name__}")


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, overflow="fold")
    for row in rows:
        t.add_row(*(fmt(v) for v in row))
    console.print(t)


def key_values(title: str, items: Iterable[tuple[str, Any]]) -> None:
    console.print(title, style="bold", highlight=False)
    t = Table(show_header=False)
    t.add_column("key", style="bold")
    t.add_column("value")
    for k, v in items:
        t.add_row(k, fmt(v))
    console.print(t)


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(str(x) for x in v)
    return str(v)


def human_bytes(n: float | None) -> str:
    """'0 B', '512 B', '12.3 MB', '4.56 GB' (decimal units, as GPU memory and link speeds are quoted)."""
    if n is None:
        return "-"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"
