"""Committed blocks -> text: stop strings and the deltas of a stream (pure, framework-free).

A dLLM commits tokens out of order inside a block, so the server only ever sees whole blocks
(everything before them final). :class:`TextAssembler` decodes the tokens so far, cuts the text
at the first stop string, and hands out the part that can no longer change: it holds back a
trailing partial character (``"\\ufffd"``) and any tail that could still grow into a stop
string, so the joined deltas equal the non-streamed text.
"""

from __future__ import annotations

__all__ = ["stop_cut", "held_back", "TextAssembler"]


def stop_cut(text: str, stops: list[str]) -> int | None:
    """The index of the earliest stop string in ``text``, or None."""
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None


def held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of ``text`` that may not be emitted yet: the longest tail that is a
    proper prefix of a stop string, and a trailing replacement character (half a UTF-8 char)."""
    keep = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), keep, -1):
            if text.endswith(s[:n]):
                keep = n
                break
    if text[len(text) - keep - 1 : len(text) - keep] == "\ufffd":
        keep += 1
    return keep


class TextAssembler:
    """Feed generated token blocks, get text deltas; ``text`` / ``tokens_used`` at the end.

    Args:
        decode: ``ids -> str`` (the tokenizer's ``decode`` with ``skip_special_tokens=True``,
            as :func:`pipelines.generate.dllm_generate` decodes).
        stops: stop strings (the text ends before the first one).
    """

    def __init__(self, decode, stops: list[str] | None = None):
        self.decode = decode
        self.stops = [s for s in (stops or []) if s]
        self.tokens: list[int] = []
        self.sent = ""
        self.text = ""
        self.stopped = False

    def feed(self, block: list[int]) -> str:
        """Add a block; returns the new text that is final. Sets ``stopped`` at a stop string."""
        if self.stopped:
            return ""
        self.tokens.extend(block)
        text = self.decode(self.tokens)
        cut = stop_cut(text, self.stops)
        if cut is not None:
            self.text, self.stopped = text[:cut], True
            return self._take(len(self.text))
        self.text = text
        return self._take(len(text) - held_back(text, self.stops))

    def finish(self) -> str:
        """The rest of the text (everything is final at the end)."""
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        """Text ``[sent, upto)``; nothing while a re-decoding changed what was already sent
        (a tokenizer whose decode is not prefix-stable: the rest then comes at the end)."""
        if upto <= len(self.sent) or not self.text.startswith(self.sent):
            return ""
        delta = self.text[len(self.sent) : upto]
        self.sent += delta
        return delta

    def tokens_used(self) -> int:
        """Generated tokens behind ``text``: all of them, or (after a stop string) the fewest
        whose decoding covers the text before the stop."""
        if not self.stopped:
            return len(self.tokens)
        for n in range(len(self.tokens) + 1):
            if len(self.decode(self.tokens[:n])) >= len(self.text):
                return n
        return len(self.tokens)
