"""Fixtures every unit test gets."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def own_control_lock(tmp_path_factory: pytest.TempPathFactory,
                     monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Each test acts under its own control lock, never the host's
    /run/vmshare/control.lock (another run, or a real act, may hold it)."""
    path = tmp_path_factory.mktemp("lock") / "control.lock"
    monkeypatch.setenv("VMSHARE_CONTROL_LOCK", str(path))
    yield path
