"""Markdown tables in the README and docs render on GitHub: every row has as many cells as its header.

GitHub-flavoured Markdown drops cells beyond the header's count and splits on every unescaped
`|`, code spans included, so a row with an extra cell (or a bare `|` inside backticks) hides text.
"""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").glob("*.md"))]
UNESCAPED_PIPE = re.compile(r"(?<!\\)\|")


def gfm_cell_count(row: str) -> int:
    """Cells GitHub sees in a table row: unescaped pipes split it; a leading/trailing pipe opens/closes it."""
    body = row.strip()
    body = body[1:] if body.startswith("|") else body
    body = body[:-1] if body.endswith("|") and not body.endswith("\\|") else body
    return len(UNESCAPED_PIPE.split(body))


def tables(text: str):
    """Yield (line number of the header, header, rows) for each pipe table outside fenced code."""
    lines, in_fence, i = text.splitlines(), False, 0
    while i < len(lines):
        if lines[i].lstrip().startswith("```"):
            in_fence = not in_fence
        elif not in_fence and lines[i].lstrip().startswith("|") and i + 1 < len(lines):
            if re.fullmatch(r"\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*", lines[i + 1]):
                rows, j = [], i + 2
                while j < len(lines) and lines[j].lstrip().startswith("|"):
                    rows.append((j + 1, lines[j]))
                    j += 1
                yield i + 1, lines[i], rows
                i = j
                continue
        i += 1


def test_gfm_cell_count_counts_as_github_does():
    assert gfm_cell_count("| a | b | c |") == 3
    assert gfm_cell_count("| a | b | c | d") == 4
    assert gfm_cell_count("| `x \\| y` | b |") == 2
    assert gfm_cell_count("| `&`/`|` | b |") == 3


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_table_row_has_the_header_cell_count(path):
    bad = []
    for header_line, header, rows in tables(path.read_text()):
        want = gfm_cell_count(header)
        bad += [
            f"{path.name}:{n} has {gfm_cell_count(r)} cells, header (line {header_line}) has {want}"
            for n, r in rows
            if gfm_cell_count(r) != want
        ]
    assert not bad, "\n".join(bad)
