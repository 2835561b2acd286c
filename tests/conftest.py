from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared development data; tests that need it skip only when it is absent."""
    from hemafed.core.paths import dev_data_dir

    path = dev_data_dir()
    if path is None or not path.is_dir():
        pytest.skip("shared data not available (set HEMAFED_DATA_DIR)")
    return path


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test touches the user's real state or cache directories."""
    monkeypatch.setenv("HEMAFED_STATE_DIR", str(tmp_path_factory.mktemp("state")))
    monkeypatch.setenv("HEMAFED_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
