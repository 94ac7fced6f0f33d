"""Streaming detokenisation: turn a growing list of generated ids into text deltas.

Decoding each new token alone is wrong for byte-level BPE (a character can span tokens) and for
tokenizers that drop a leading space at the start of a decode. So each step decodes a short window:
the tokens already released plus the new ones, and emits only what extends the released text. A delta
ending in an incomplete UTF-8 character (U+FFFD) is held back until the next token completes it.
"""

from __future__ import annotations

from .model.tokenizer import Tokenizer


class IncrementalDecoder:
    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""
        self._window_start = 0  # first id of the decode window (context for the next delta)
        self._released = 0  # ids before this index are reflected in ``text``

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one id; return the new text it completes (possibly empty)."""
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Release whatever is held back (an incomplete character decodes as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._released == len(self.ids):
            return ""
        context = self._decode(self.ids[self._window_start : self._released])
        window = self._decode(self.ids[self._window_start :])
        if not final and (len(window) <= len(context) or window.endswith("\ufffd")):
            return ""
        delta = window[len(context) :]
        self._window_start, self._released = self._released, len(self.ids)
        self.text += delta
        return delta
