"""Token ids in, text out, as they come: what is safe to show now, and where a stop string ends the text.

Text is decoded from all the ids so far (a character may span tokens), and held back while it could
still turn into a stop string or ends in half a UTF-8 character, so a client never sees text that a
stop string later removes.  OpenAI's rule: the text ends just before the first stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT = "\ufffd"  # what a tokenizer decodes half a UTF-8 character to


def _held(text: str, stops: Sequence[str]) -> int:
    """How many characters at the end of `text` must wait: a possible start of a stop string, or a
    half-decoded character."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    tail = len(text) - len(text.rstrip(REPLACEMENT))
    return max(hold, tail)


class TextStream:
    """Feed token ids with `push`; it returns the new text to show and sets `stopped` at a stop string."""

    def __init__(self, tokenizer: Any, stops: Sequence[str] = ()) -> None:
        self.tokenizer, self.stops = tokenizer, tuple(stops)
        self.ids: list[int] = []
        self.shown = ""  # what was handed out so far
        self.text = ""  # the whole text so far (cut at the stop string once one appeared)
        self.stopped = False

    def push(self, tid: int) -> str:
        """Add one token; return the text that became safe to show (maybe empty)."""
        if self.stopped:
            return ""
        self.ids.append(tid)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cuts = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.text, self.stopped = self.text[: min(cuts)], True
            return self._show(self.text)
        return self._show(self.text[: len(self.text) - _held(self.text, self.stops)])

    def flush(self) -> str:
        """At the end of the generation: whatever was held back."""
        return self._show(self.text)

    def _show(self, safe: str) -> str:
        if len(safe) <= len(self.shown) or not safe.startswith(self.shown):
            return ""  # nothing new (or a decode that rewrote the past: never take back what was shown)
        new, self.shown = safe[len(self.shown):], safe
        return new
