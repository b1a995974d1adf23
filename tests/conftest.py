"""Shared fixtures. Real data lives outside the project (``../shared/data`` or $PRUNEKIT_DATA).

Plain helpers (paths, writers, stand-in models) are in ``tests/helpers``; this file stays free
of heavy imports so that collecting the suite is cheap."""

from pathlib import Path

import pytest

from tests.helpers import shared_data_dir


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("real data folder absent: set PRUNEKIT_DATA or place ../shared/data")
    return path
