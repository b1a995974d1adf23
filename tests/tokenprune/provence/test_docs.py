"""docs/provence.md's examples run as pasted: every ```python block, in order, in one namespace,
in an empty folder (they use the packaged MiniLM and build their own tiny Provence head)."""

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[3] / "docs" / "provence.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


@pytest.mark.slow
def test_doc_examples_run_as_pasted(tmp_path, monkeypatch):
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) == 3  # inference, training, RAG components
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "provence_doc"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{DOC.name}[python block {i}]", "exec"), namespace)
    assert (tmp_path / "my-provence" / "model.safetensors").is_file()
    assert (tmp_path / "my-trained-provence" / "prunekit_provence.json").is_file()
    assert len(namespace["losses"]) == 2
    assert isinstance(namespace["pruned"], list) and isinstance(namespace["result"]["provence"]["documents"], list)
    assert namespace["reloaded"].get_component("provence").pruner == "my-provence"
