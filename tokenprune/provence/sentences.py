"""A rule-based sentence splitter that returns character spans (no downloads, no nltk).

The splitter is deliberately conservative: it splits

* after ``.``, ``!``, ``?`` or ``…`` (possibly repeated, possibly followed by closing quotes or
  brackets and by numeric citations such as ``[3]`` or ``[4, 7-9]``) when whitespace follows and
  the next visible character is not a lowercase letter;
* after the CJK full stops ``。！？`` (no whitespace needed);
* at line breaks (``split_newlines=True``, the default), so titles and list items on their own
  line are sentences of their own.

It does not split after common abbreviations (``Dr.``, ``e.g.``, ``et al.``, ``Fig.``, ...),
single-letter initials (``J. Smith``) or inside decimals (``3.14``: no whitespace follows).

Every sentence is returned as a ``(start, end)`` pair of character offsets into the input with
surrounding whitespace excluded, so ``text[start:end]`` is an exact substring.
"""

from __future__ import annotations

import re

__all__ = ["split_sentences", "sentence_texts", "ABBREVIATIONS"]

#: Lowercased words (without their final dot) after which a period does not end a sentence.
ABBREVIATIONS = frozenset(
    """
    mr mrs ms dr prof sr jr st mt vs etc e.g eg i.e ie al fig figs eq eqs no nos vol vols pp p
    approx ca cf inc ltd co corp dept univ est min max resp ref refs sec chap ed eds rev gen col
    jan feb mar apr jun jul aug sep sept oct nov dec u.s u.k u.n ph.d m.d b.sc m.sc a.m p.m
    viz lit lt sgt capt cmdr gov sen rep supp suppl
    """.split()
)

# terminal punctuation, closing quotes/brackets, optional numeric citations, then whitespace
_LATIN_END = re.compile(
    r"[.!?\u2026]+[\"'\u201d\u2019\u00bb)\]]*"
    r"(?:\s?\[\d+(?:\s*[,\u2013-]\s*\d+)*\])*"
    r"(?=\s)"
)
_CJK_END = re.compile(r"[\u3002\uff01\uff1f]+[\u300d\u300f\uff09\"'\u201d]*")
_OPENERS = "\"'\u201c\u2018\u00ab([{"
_WORD_BEFORE = re.compile(r"([\w.]+)$")


def _strip_span(text: str, start: int, end: int) -> tuple[int, int] | None:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return (start, end) if end > start else None


def _next_visible(text: str, pos: int, stop: int) -> str:
    """First character at or after ``pos`` that is neither whitespace nor an opening quote."""
    while pos < stop and (text[pos].isspace() or text[pos] in _OPENERS):
        pos += 1
    return text[pos] if pos < stop else ""


def _is_abbreviation(text: str, line_start: int, dot_pos: int) -> bool:
    if text[dot_pos] != ".":
        return False
    match = _WORD_BEFORE.search(text, line_start, dot_pos)
    if match is None:
        return False
    word = match.group(1).lower().strip(".")
    if not word:
        return False
    if word in ABBREVIATIONS:
        return True
    # single-letter initials ("J. Smith") and dotted acronyms ("U.S.A.")
    return (len(word) == 1 and word.isalpha()) or bool(re.fullmatch(r"(?:\w\.)+\w", word))


def _line_boundaries(text: str, start: int, stop: int) -> list[int]:
    """Character positions (exclusive ends) where a sentence ends inside ``text[start:stop]``."""
    cuts = []
    for m in _LATIN_END.finditer(text, start, stop):
        nxt = _next_visible(text, m.end(), stop)
        if not nxt or nxt.islower():
            continue
        if _is_abbreviation(text, start, m.start()) and (m.end() - m.start()) == 1:
            continue
        cuts.append(m.end())
    for m in _CJK_END.finditer(text, start, stop):
        cuts.append(m.end())
    return sorted(set(cuts))


def split_sentences(text: str, *, split_newlines: bool = True) -> list[tuple[int, int]]:
    """Split ``text`` into sentences.

    Args:
        text: any string (may be empty).
        split_newlines: treat every line break as a sentence boundary.

    Returns:
        list of ``(start, end)`` character offsets, ascending and non-overlapping, each
        non-empty and without leading/trailing whitespace.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if split_newlines:
        lines, pos = [], 0
        for m in re.finditer(r"\r\n|\r|\n", text):
            lines.append((pos, m.start()))
            pos = m.end()
        lines.append((pos, len(text)))
    else:
        lines = [(0, len(text))]
    spans: list[tuple[int, int]] = []
    for a, b in lines:
        prev = a
        for cut in _line_boundaries(text, a, b) + [b]:
            span = _strip_span(text, prev, cut)
            if span is not None:
                spans.append(span)
            prev = cut
    return spans


def sentence_texts(text: str, **kwargs) -> list[str]:
    """The sentences of ``text`` as strings (exact substrings); see :func:`split_sentences`."""
    return [text[a:b] for a, b in split_sentences(text, **kwargs)]
