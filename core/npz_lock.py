"""Reading .npz files: one process-wide lock, and never a pickle.

numpy parses every array header in an .npz with `ast.literal_eval`, and on CPython 3.11 two threads building Python
ASTs at the same moment can fail with "SystemError: AST constructor recursion depth mismatch" (python/cpython#106905,
fixed only in later releases). A site prepares its data in a worker thread, and several sites (or a site and its
aggregator) can share one process, so every .npz read in the product goes through `open_npz`; the reads are short.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np

NPZ_READ_LOCK = threading.Lock()


@contextmanager
def open_npz(source: str | Path | IO[bytes]) -> Iterator[np.lib.npyio.NpzFile]:
    """`np.load(source, allow_pickle=False)` held under `NPZ_READ_LOCK` until the block ends."""
    with NPZ_READ_LOCK, np.load(source, allow_pickle=False) as data:
        yield data
