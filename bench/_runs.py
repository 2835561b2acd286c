"""What a `hemafed simulate` results folder says about itself (its metrics.json), for the benches that read runs."""

from __future__ import annotations

import json
from pathlib import Path


def _metrics(run: Path) -> dict:
    try:
        return json.loads((run / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}


def run_model(run: Path, default: str) -> str:
    """The model the run trained (`default`, `hemafed simulate`'s, when its metrics.json does not say)."""
    return _metrics(run).get("options", {}).get("model", default)


def run_seed(run: Path) -> int | None:
    """The run's `--seed` (None when its metrics.json does not say)."""
    return _metrics(run).get("options", {}).get("seed")


def run_command(run: Path) -> str:
    """The run's command line without its `--seed N` (the seeds of a set of runs differ by design)."""
    words = str(_metrics(run).get("command", "hemafed simulate")).split()
    seed = {i for i, w in enumerate(words) if w == "--seed"}
    return " ".join(w for i, w in enumerate(words) if i not in seed and i - 1 not in seed)
