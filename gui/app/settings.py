"""What the app remembers between runs (paths, aggregator URL, budget, window geometry).

An INI file in the user's config folder, so hospital IT can read, back up or pre-seed
it; `HEMAFED_CONFIG_DIR` or `hemafed gui --config-dir` moves it (tests use a temporary one).
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs
from PySide6.QtCore import QSettings

FILE_NAME = "hemafed-app.ini"


def config_dir(override: str | os.PathLike[str] | None = None) -> Path:
    if override is not None:
        path = Path(override)
    elif os.environ.get("HEMAFED_CONFIG_DIR"):
        path = Path(os.environ["HEMAFED_CONFIG_DIR"])
    else:
        path = Path(platformdirs.user_config_dir("hemafed"))
    path.mkdir(parents=True, exist_ok=True)
    return path


class Settings:
    """Typed access to the few values the app keeps."""

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.path = config_dir(directory) / FILE_NAME
        self._qs = QSettings(str(self.path), QSettings.Format.IniFormat)

    def get_str(self, key: str, default: str = "") -> str:
        value = self._qs.value(key, default)
        return str(value) if value is not None else default

    def get_float(self, key: str, default: float) -> float:
        try:
            return float(self._qs.value(key, default))
        except (TypeError, ValueError):
            return default

    def get_bytes(self, key: str) -> bytes | None:
        value = self._qs.value(key)
        return bytes(value) if value is not None else None

    def set(self, key: str, value: object) -> None:
        self._qs.setValue(key, value)

    def sync(self) -> None:
        self._qs.sync()
