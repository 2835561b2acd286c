"""One process-wide lock for reading .npz files.

numpy parses every array header in an .npz with `ast.literal_eval`, and on CPython 3.11 two threads building Python
ASTs at the same moment can fail with "SystemError: AST constructor recursion depth mismatch" (python/cpython#106905,
fixed only in later releases). A site prepares its data in a worker thread, and several sites (or a site and its
aggregator) can share one process, so every .npz read in the product holds this lock; the reads are short.
"""

from __future__ import annotations

import threading

NPZ_READ_LOCK = threading.Lock()
