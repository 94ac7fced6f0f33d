"""The one exception type for a user's mistake.

Raised anywhere a file, a flag or a request is wrong in a way the user can fix. The CLI prints its
message (no traceback) and exits with status 2; the API turns it into a 4xx response.
"""

from __future__ import annotations


class HetserveError(Exception):
    """A user-facing error: the message names the file/field and what would fix it."""

    def __init__(self, message: str, *, source: str | None = None):
        self.source = source
        super().__init__(f"{source}: {message}" if source else message)


class OutOfTime(Exception):
    """A computation passed its wall-clock deadline (a caller's time limit) before it finished. Not a
    user's mistake: the caller that set the deadline decides what to do without the result."""


def suggest(word: str, choices) -> str:
    """' (did you mean X?)' for a near miss among ``choices``, else ''. Names of the same family come
    first: a word that starts one or more names ('h100' -> 'h100-pcie', 'h100-sxm') names those."""
    import difflib

    names = sorted(str(c) for c in choices)
    w = str(word).strip().lower()
    family = [n for n in names if w and n.lower().startswith(w)] if len(w) >= 2 else []
    if 1 <= len(family) <= 4:
        return " (did you mean " + " or ".join(f"'{n}'" for n in family) + "?)"
    close = difflib.get_close_matches(str(word), names, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def allowed(choices, limit: int = 30) -> str:
    names = sorted(str(c) for c in choices)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


#: Largest seed the random generators take (NumPy's and torch's accept 0 .. 2**32 - 1 alike).
MAX_SEED = 2**32 - 1


def seed_value(text: str) -> int:
    """An argparse ``type`` for ``--seed``: an integer in [0, 2**32 - 1], or argparse's one-line error."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{value} is outside 0 .. {MAX_SEED}")
    return value
