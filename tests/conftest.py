"""Shared fixtures. Real data lives outside the project (``../shared/data`` or $PRUNEKIT_DATA).

Plain helpers (paths, writers, stand-in models) are in ``tests/helpers``; this file stays free
of heavy imports so that collecting the suite is cheap."""

import sys
from pathlib import Path

import pytest

from tests.helpers import shared_data_dir


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("real data folder absent: set PRUNEKIT_DATA or place ../shared/data")
    return path


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
