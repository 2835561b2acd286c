"""The aggregator's durable state: one checkpoint per finished round and a round log.

A restarted aggregator resumes after the newest checkpoint that loads; a checkpoint
is written atomically, so a crash leaves the previous round's one intact.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import append_line_durable, atomic_write_bytes
from ..npz_lock import open_npz

log = logging.getLogger(__name__)


@dataclass
class Checkpoint:
    round: int  # the last finished round; 0 is the initial model
    weights: np.ndarray  # flat float32
    optimizer_state: dict[str, np.ndarray]
    meta: dict[str, Any]


class CheckpointStore:
    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / "rounds.jsonl"

    def _path(self, rnd: int) -> Path:
        return self.dir / f"round_{rnd:04d}.npz"

    def save(self, ckpt: Checkpoint) -> Path:
        buf = io.BytesIO()
        meta = {**ckpt.meta, "round": ckpt.round, "saved_at": time.time()}
        arrays = {f"opt_{k}": v for k, v in ckpt.optimizer_state.items()}
        np.savez(buf, weights=ckpt.weights.astype(np.float32), meta=np.frombuffer(
            json.dumps(meta).encode(), dtype=np.uint8), **arrays)
        path = self._path(ckpt.round)
        atomic_write_bytes(path, buf.getvalue(), mode=0o644)
        return path

    def load(self, rnd: int) -> Checkpoint:
        with open_npz(self._path(rnd)) as data:
            meta = json.loads(bytes(data["meta"]).decode())
            opt = {k[4:]: data[k] for k in data.files if k.startswith("opt_")}
            return Checkpoint(int(meta["round"]), data["weights"].astype(np.float32), opt, meta)

    def rounds(self) -> list[int]:
        return sorted(int(p.stem.split("_")[1]) for p in self.dir.glob("round_*.npz"))

    def latest(self) -> Checkpoint | None:
        for rnd in reversed(self.rounds()):
            try:
                return self.load(rnd)
            except (OSError, ValueError, KeyError) as exc:
                log.error("checkpoint of round %d is unreadable (%s); trying the one before", rnd, exc)
        return None

    def append_log(self, entry: dict[str, Any]) -> None:
        append_line_durable(self.log_path, json.dumps(entry, sort_keys=True))

    def read_log(self) -> list[dict[str, Any]]:
        if not self.log_path.exists():
            return []
        entries = []
        for line in self.log_path.read_text().splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("skipping a cut line at the end of %s", self.log_path)
        return entries
