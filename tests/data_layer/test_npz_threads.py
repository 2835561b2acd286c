"""Several sites in one process read their .npz data at once, each in its own thread, as the federation tests run
them. Every read goes through `core.npz_lock.open_npz`, under one lock (python/cpython#106905, seen once in CI: a
site's worker thread failed parsing an .npz header with "AST constructor recursion depth mismatch"). The race is too
rare to reproduce on demand here (8 threads × 20,000 header parses did not); this checks that the locked reads stay
correct and never block each other for good."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from hemafed.core.data.classes import BLOODMNIST_CLASSES
from hemafed.core.data.scan import scan_source


def test_many_threads_read_one_npz_at_once(tmp_path: Path) -> None:
    path = tmp_path / "site.npz"
    rng = np.random.default_rng(0)
    arrays = {f"{s}_images": rng.integers(0, 256, (6, 28, 28, 3), dtype=np.uint8) for s in ("train", "val", "test")}
    arrays.update({f"{s}_labels": rng.integers(0, 8, (6, 1)) for s in ("train", "val", "test")})
    np.savez(path, **arrays)

    def read(_: int) -> int:
        return len(scan_source(path, BLOODMNIST_CLASSES, size=28).labels)

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(read, range(400))) == [6] * 400
