"""The fixed features of a site's images, computed once and kept in the user's cache directory.

A `scatter_*` model's features are a fixed function of one image (no data went into them), and
computing them is most of what a site does before its first round (8 views of every image). They
are kept per image, keyed by a SHA-256 of the image's pixels (and its shape), the model and the
version of the feature code — never by a path or a modification time — so a second federation on the
same images, a reshuffled folder or another partition of the same images starts at once, and a
changed image is recomputed.

The store is one SQLite file (WAL, owner-only: the features are derived from patient images and never
leave the site) that several site processes on one machine may write at once. It holds only features of
the images of the sites that run here, in the user's cache directory; a failure to read or write it is
logged and the features are computed anyway: the cache never stops a site.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import HemafedError
from ..paths import cache_dir

log = logging.getLogger(__name__)

FILE_NAME = "features.sqlite"
CHUNK = 64  # images per computing step: progress and cancel are checked this often
_LOOKUP = 500  # digests per SELECT (SQLite's variable limit is far above)

# (images done, images in all, seconds left or None while unknown)
PrepareProgress = Callable[[int, int, float | None], None]


class FeaturesCancelled(HemafedError):
    """Preparing the features stopped because the site is leaving; what was computed stays cached."""


@dataclass(frozen=True)
class FeatureKind:
    """What a cached vector is: the model's fixed map for training or for evaluation, at a code version."""

    model: str
    view: str  # "train" | "eval" (the same name for both when the model trains on its evaluation view)
    version: str  # changes whenever the feature code or the shipped weights change
    # the model the operator chose, where it shares `model`'s feature code (the log names it; not part of the key)
    label: str = field(default="", compare=False)


def image_digests(images: np.ndarray) -> list[bytes]:
    """SHA-256 of each (H, W, 3) uint8 image's shape and pixels."""
    images = np.ascontiguousarray(images)
    shape = repr(tuple(images.shape[1:])).encode()
    return [hashlib.sha256(shape + img.tobytes()).digest() for img in images]


class FeatureCache:
    """Per-image fixed features in `<cache>/features.sqlite` (`HEMAFED_CACHE_DIR` moves it)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else cache_dir() / FILE_NAME
        self._broken = False

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        if not self.path.exists():  # features are derived from patient images: owner-only, like the images
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        con = sqlite3.connect(self.path, timeout=120.0)
        try:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=NORMAL")  # a cache: losing the last chunk after a power cut is fine
            con.execute("CREATE TABLE IF NOT EXISTS features (model TEXT NOT NULL, view TEXT NOT NULL, "
                        "version TEXT NOT NULL, digest BLOB NOT NULL, vec BLOB NOT NULL, "
                        "PRIMARY KEY (model, view, version, digest)) WITHOUT ROWID")
            yield con
        finally:
            con.close()

    def _lookup(self, kind: FeatureKind, digests: list[bytes]) -> dict[bytes, bytes]:
        if self._broken or not digests:
            return {}
        found: dict[bytes, bytes] = {}
        try:
            with self._db() as con:
                wanted = sorted(set(digests))
                for i in range(0, len(wanted), _LOOKUP):
                    part = wanted[i:i + _LOOKUP]
                    rows = con.execute(
                        f"SELECT digest, vec FROM features WHERE model=? AND view=? AND version=? "
                        f"AND digest IN ({','.join('?' * len(part))})",
                        (kind.model, kind.view, kind.version, *part))
                    found.update(rows)
        except sqlite3.Error as exc:
            self._give_up(exc)
        return found

    def _store(self, kind: FeatureKind, digests: list[bytes], vectors: np.ndarray) -> None:
        if self._broken:
            return
        rows = [(kind.model, kind.view, kind.version, d, np.ascontiguousarray(v, "<f4").tobytes())
                for d, v in zip(digests, vectors, strict=True)]
        try:
            with self._db() as con, con:
                con.executemany("INSERT OR REPLACE INTO features VALUES (?, ?, ?, ?, ?)", rows)
        except sqlite3.Error as exc:
            self._give_up(exc)

    def _give_up(self, exc: Exception) -> None:
        log.warning("the feature cache %s cannot be used (%s); computing features without it", self.path, exc)
        self._broken = True

    def features(self, kind: FeatureKind, images: np.ndarray, compute: Callable[[np.ndarray], torch.Tensor], *,
                 progress: PrepareProgress | None = None, cancel: Callable[[], bool] | None = None,
                 chunk: int = CHUNK) -> torch.Tensor:
        """The features of `images` ((N, H, W, 3) uint8) in their order: cached ones read back, the rest
        computed by `compute` (uint8 images → (n, ...) float tensor) in chunks and stored as they come.
        `progress` hears about every chunk; `cancel()` true between chunks raises `FeaturesCancelled`."""
        images = np.asarray(images)
        n = len(images)
        digests = image_digests(images)
        cached = self._lookup(kind, digests)
        missing = [i for i, d in enumerate(digests) if d not in cached]
        # identical images need computing once
        first: dict[bytes, int] = {}
        todo = [i for i in missing if first.setdefault(digests[i], i) == i]
        done = n - len(missing)
        log.info("features of %d images (%s, %s): %d cached, %d to compute", n, kind.label or kind.model, kind.view,
                 done, len(todo))
        if progress is not None:
            progress(done, n, None if todo else 0.0)
        computed: dict[bytes, np.ndarray] = {}
        started = time.monotonic()
        for start in range(0, len(todo), chunk):
            if cancel is not None and cancel():
                raise FeaturesCancelled("stopped while preparing the features")
            idx = todo[start:start + chunk]
            vecs = compute(images[idx]).detach().to(torch.float32).reshape(len(idx), -1).numpy()
            part = [digests[i] for i in idx]
            self._store(kind, part, vecs)
            computed.update(zip(part, vecs, strict=True))
            left = len(todo) - start - len(idx)
            done = n - left - (len(missing) - len(todo))  # duplicates of computed images count as done at the end
            if progress is not None:
                rate = (time.monotonic() - started) / (start + len(idx))
                progress(min(done, n), n, left * rate)
        if progress is not None and todo:
            progress(n, n, 0.0)
        out = [computed[d] if d in computed else np.frombuffer(cached[d], "<f4") for d in digests]
        if not out:
            return torch.zeros(0)
        return torch.from_numpy(np.stack(out).astype(np.float32, copy=False))
