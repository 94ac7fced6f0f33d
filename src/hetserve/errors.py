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
    """' (did you mean X?)' for a near miss among ``choices``, else ''."""
    import difflib

    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def allowed(choices, limit: int = 30) -> str:
    names = sorted(str(c) for c in choices)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")
