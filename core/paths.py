"""Where hemafed keeps its files: per-user state, cache, and the development data."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP_NAME = "hemafed"


def state_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The per-user state directory (identity key, ledgers, models, logs).

    Order: explicit `override`, then `HEMAFED_STATE_DIR`, then the platform's user
    data directory. The directory is created owner-only.
    """
    if override is not None:
        path = Path(override)
    elif os.environ.get("HEMAFED_STATE_DIR"):
        path = Path(os.environ["HEMAFED_STATE_DIR"])
    else:
        path = Path(platformdirs.user_data_dir(APP_NAME))
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def cache_dir() -> Path:
    """Where downloaded public datasets are cached (`HEMAFED_CACHE_DIR` overrides)."""
    env = os.environ.get("HEMAFED_CACHE_DIR")
    path = Path(env) if env else Path(platformdirs.user_cache_dir(APP_NAME))
    path.mkdir(parents=True, exist_ok=True)
    return path


def dev_data_dir() -> Path | None:
    """The shared development data: `HEMAFED_DATA_DIR`, else `../shared/data` next to
    the source checkout, else None."""
    env = os.environ.get("HEMAFED_DATA_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent.parent / "shared" / "data"
        if (parent / "pyproject.toml").exists() and candidate.is_dir():
            return candidate
    return None
