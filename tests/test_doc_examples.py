"""Every ```python block of README.md and docs/*.md is executed by a test or tagged as not runnable.

A page's runnable blocks run in order, in one namespace, in an empty folder, offline, after the
page's SETUP (the tiny inputs its examples refer to: an embedding file, an attention tensor).
A block that cannot run here (a real checkpoint, a GPU, a placeholder) carries the comment
``<!-- not-run: REASON -->`` on the line just above its fence. Pages whose examples a dedicated
test already runs (with its own checks) are listed in DELEGATED and are not run twice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python([^\n]*)\n(.*?)^```", re.S | re.M)
NOT_RUN = re.compile(r"^<!--\s*not-run:\s*(\S.*?)\s*-->\s*$")

# page -> the test that runs its examples (and the marker it uses to skip a block)
DELEGATED = {
    "docs/localleap.md": "tests/tokenprune/localleap/test_docs.py",
    "docs/provence.md": "tests/tokenprune/provence/test_docs.py",
}

# page -> code run first in the page's namespace: the inputs its examples name
SETUP = {
    "README.md": """
import numpy as np
np.save("img_emb.npy", np.random.default_rng(0).standard_normal((3000, 16)).astype(np.float32))
""",
    "docs/dataprune.md": """
import os
import numpy as np, prunecore, dataprune
emb = np.random.default_rng(0).standard_normal((3000, 16)).astype(np.float32)
clustering = prunecore.kmeans(emb, k=1000, seed=1234)
os.makedirs("emb")
np.save("emb/img_emb_0.npy", emb[:1500])
np.save("emb/img_emb_1.npy", emb[1500:])
""",
    "docs/fopru.md": """
import torch
attn = torch.rand(2, 4, 577, 577, generator=torch.Generator().manual_seed(0)).softmax(-1)
""",
}


@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository root
    line: int  # of the opening fence
    info: str  # what follows ```python on the fence line
    code: str
    not_run: str | None  # the reason of a <!-- not-run: ... --> tag, or None


def blocks_of(page: Path, root: Path = REPO) -> list[Block]:
    """The ``python`` blocks of one Markdown page (named relative to ``root``), with their not-run tags."""
    text = page.read_text()
    lines = text.splitlines()
    found = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        above = NOT_RUN.match(lines[line - 2]) if line >= 2 else None
        rel = page.relative_to(root).as_posix()
        found.append(Block(rel, line, match.group(1).strip(), match.group(2), above.group(1) if above else None))
    return found


ALL_BLOCKS = [block for page in PAGES for block in blocks_of(page)]


def test_the_extraction_sees_the_fences_and_tags(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "text\n```python\nx = 1\n```\n\n<!-- not-run: needs a GPU -->\n```python\ny = 2\n```\n"
        "```bash\nls\n```\n<!-- a comment -->\n```python no-run\nz\n```\n"
    )
    found = blocks_of(page, root=tmp_path)
    assert {b.page for b in found} == {"page.md"}
    assert [(b.line, b.code, b.not_run, b.info) for b in found] == [
        (2, "x = 1\n", None, ""),
        (7, "y = 2\n", "needs a GPU", ""),
        (14, "z\n", None, "no-run"),
    ]


def test_every_block_runs_somewhere_or_is_tagged_with_a_reason():
    """A block of a delegated page that its test skips (``no-run``) still needs a not-run tag."""
    assert len(ALL_BLOCKS) >= 10
    untagged = [
        f"{b.page}:{b.line}"
        for b in ALL_BLOCKS
        if b.not_run is None and "no-run" in b.info  # skipped by the page's own test, reason unsaid
    ]
    assert not untagged, f"add <!-- not-run: REASON --> above: {untagged}"
    for page, test in DELEGATED.items():
        assert (REPO / page).is_file() and (REPO / test).is_file(), (page, test)
        assert Path(page).name in (REPO / test).read_text(), f"{test} does not read {page}"


def runnable_pages() -> list[str]:
    pages = sorted({b.page for b in ALL_BLOCKS if b.page not in DELEGATED})
    return [p for p in pages if any(b.not_run is None for b in ALL_BLOCKS if b.page == p)]


@pytest.mark.slow
@pytest.mark.parametrize("page", runnable_pages())
def test_page_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    namespace: dict = {"__name__": "doc_example"}
    exec(compile(SETUP.get(page, ""), f"{page}[setup]", "exec"), namespace)
    ran = 0
    for block in ALL_BLOCKS:
        if block.page != page or block.not_run is not None:
            continue
        exec(compile(block.code, f"{page}:{block.line}", "exec"), namespace)
        ran += 1
    assert ran >= 1
