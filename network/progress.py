"""A one-line text progress bar for terminals (aggregator and simulation)."""

from __future__ import annotations


def progress_bar(done: int, total: int, text: str, width: int = 20) -> str:
    filled = int(width * min(max(done, 0), total) / max(total, 1))
    return f"[{'#' * filled}{'.' * (width - filled)}] {text}"
