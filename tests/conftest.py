"""Shared fixtures. Real data lives outside the project (``../shared/data`` or $PRUNEKIT_DATA)."""

import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tokenprune.provence.model import ProvenceModel

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """Folder with the read-only real data (CIFAR-10 shards, MNIST, QA, text), or None."""
    env = os.environ.get("PRUNEKIT_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(REPO.parent / "shared" / "data")
    for path in candidates:
        if path.is_dir():
            return path
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("real data folder absent: set PRUNEKIT_DATA or place ../shared/data")
    return path


def artifact_bytes(out: Path) -> dict[str, bytes]:
    """Every artifact file under ``out`` except the stage records (which hold timings) and the
    marker and lock of the folder (which hold a creation time and the last run's pid)."""
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name not in ("_stage.json", ".prunekit.json", ".prunekit.lock")
    }


class KeywordProvence(ProvenceModel):
    """Deterministic stand-in model: keep tokens of the word 'zebra'; score = their count."""

    def __init__(self, tokenizer):
        from transformers import BertConfig

        nn.Module.__init__(self)
        self.config = BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8)
        self.zebra = tokenizer.convert_tokens_to_ids("zebra")
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        hit = (input_ids == self.zebra) & attention_mask.bool()
        if token_type_ids is not None:
            hit &= token_type_ids.bool()  # count context tokens only
        logits = torch.stack([torch.zeros(hit.shape), torch.where(hit, 4.6, -4.6)], -1)
        return hit.sum(1).float() + self.dummy, logits


# the prunekit CLI in a child process that SIGKILLs itself once a stage reports ``count``
# samples done (a progress observer: pipelines.shards.progress); argv: "STAGE:COUNT", CLI args
KILL_AFTER_CLI = """
import os, signal, sys
from pipelines.cli import main
from pipelines.shards.progress import watch_progress
stage, _, count = sys.argv[1].partition(":")
def kill(name, done):
    if name == stage and done >= int(count):
        os.kill(os.getpid(), signal.SIGKILL)
with watch_progress(kill):
    sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture
def cli_command():
    """``cli_command(die)``: the argv prefix that runs ``prunekit`` in a child process; with
    ``die="embed:120"`` the child SIGKILLs itself once the embed stage has done 120 samples
    (the kill/resume tests)."""

    def command(die: str | None = None) -> list[str]:
        if die is None:
            return [sys.executable, "-m", "pipelines.cli"]
        return [sys.executable, "-c", KILL_AFTER_CLI, die]

    return command
