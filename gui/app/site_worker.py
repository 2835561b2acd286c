"""The only place the app touches the site driver: `SiteRunner` runs on its own asyncio
loop in a plain thread, and each typed event it emits (`network.site_events`) is
re-emitted as a Qt signal, which Qt queues to the GUI thread. The GUI answers the plan
and asks to leave through the runner's thread-safe calls; it never blocks on the loop,
nor on the driver's thread starting (Join returns at once).

The driver thread shares the interpreter lock with the GUI thread, so what it does in one
piece while holding the lock stalls the window. Measured (bench/app.py --training
--trace-stalls): the long pieces were not training but the cyclic garbage collector:
importing the driver's modules (Opacus, SymPy, torch._dynamo: ~300,000 new objects)
set off full collections over every object in the process, 0.2-0.8 s each with the lock
held. `import_driver_modules` therefore imports them once with the collector paused and
then freezes what exists (`gc.freeze`), so later collections skip those objects. The one
long piece left was the dynamic loader mapping Triton's 480 MB library (which the CUDA build
of torch imports with torch._dynamo) inside `import`, with the lock held: 135 ms; it is now
mapped first through a plain C call, which releases the lock."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import importlib
import importlib.util
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, Signal

log = logging.getLogger(__name__)

# Everything the driver imports lazily on its way through a round (fedavg and fedsgd plans).
# torch._dynamo (with triton and SymPy, ~150,000 objects) is imported by torch itself when the
# first optimizer is created, i.e. at the first training step of the first round.
DRIVER_MODULES = ("hemafed.network.site", "hemafed.core.learning.models", "hemafed.core.learning.dp_train",
                  "hemafed.core.learning.site_trainer", "hemafed.core.learning.feature_cache",
                  "hemafed.core.privacy.ledger",
                  "hemafed.core.privacy.calibration", "hemafed.core.data.scan", "hemafed.core.data.partition",
                  # the fixed feature maps of the scatter_* models, imported on first use otherwise
                  "hemafed.core.learning.features", "hemafed.core.learning.procedural_features", "torch._dynamo")
_import_lock = threading.Lock()
_imported = False


def _map_large_libraries() -> None:
    """Map Triton's native library (CUDA builds of torch only) with the lock released.

    An extension module's `import` calls dlopen with the interpreter lock held; a foreign
    call through ctypes releases it. Once mapped, the import's own dlopen finds the library
    loaded and returns at once. Best effort: anything unexpected leaves it to the import."""
    if not sys.platform.startswith("linux"):
        return
    try:
        spec = importlib.util.find_spec("triton")  # finds the package without running it
        if spec is None or not spec.submodule_search_locations:
            return
        dlopen = ctypes.CDLL(None).dlopen  # the process's own dlopen (libc / libdl)
        dlopen.restype, dlopen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_int]
        for folder in spec.submodule_search_locations:
            for lib in sorted(Path(folder, "_C").glob("libtriton*.so")):
                dlopen(os.fsencode(lib), os.RTLD_NOW | os.RTLD_LOCAL)
    except (AttributeError, OSError, ImportError, ValueError) as exc:
        log.debug("could not map triton's library ahead of its import: %s", exc)


def import_driver_modules() -> None:
    """Import the driver's modules with the garbage collector paused, then freeze the heap.

    Freezing moves every object alive now (Qt's wrappers, torch, these modules) into the
    collector's permanent generation: later collections only walk what is created after, so
    none is long enough to stall the window. Once per process; a cycle that was garbage at
    this moment is kept rather than collected (module-level objects, a few KB)."""
    global _imported
    with _import_lock:
        if _imported:
            return
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            _map_large_libraries()
            for name in DRIVER_MODULES:
                importlib.import_module(name)
            _imported = True
        finally:
            gc.freeze()
            if was_enabled:
                gc.enable()


class SiteBridge(QObject):
    """Lives in the GUI thread; emitting from the driver's thread queues the delivery."""

    event = Signal(object)  # a network.site_events dataclass
    finished = Signal(object)  # final model path (Path) or None
    crashed = Signal(str)  # the driver raised: message for the operator


class SiteWorker:
    def __init__(self, cfg: Any, identity: Any = None, bridge: SiteBridge | None = None) -> None:
        self.cfg = cfg
        self.identity = identity
        self.bridge = bridge or SiteBridge()
        self.runner: Any = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # runner vs. a stop() that comes before it exists
        self._stop_requested = False

    def start(self) -> None:
        """Start the driver's thread and return at once (the imports happen there)."""
        self._thread = threading.Thread(target=self._main, name="hemafed-site", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        result: Path | None = None
        try:
            import_driver_modules()
            from hemafed.network.site import SiteRunner

            runner = SiteRunner(self.cfg, identity=self.identity, on_event=self.bridge.event.emit,
                                auto_accept=False)  # the operator reviews the plan
        except Exception as exc:  # e.g. the identity key cannot be read
            self.bridge.crashed.emit(str(exc))
            self.bridge.finished.emit(None)
            return
        with self._lock:
            self.runner = runner
            if self._stop_requested:  # Leave was pressed while the thread was starting
                runner.stop()  # run() sees the flag at once and finishes as "stopped"
        try:
            result = asyncio.run(runner.run())
        except Exception as exc:
            log.exception("site driver stopped with an error")
            self.bridge.crashed.emit(f"{type(exc).__name__}: {exc}")
        finally:
            self.bridge.finished.emit(result)

    def answer_plan(self, accept: bool, reason: str = "") -> None:
        if self.runner is not None:
            self.runner.answer_plan_threadsafe(accept, reason)

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested

    def stop(self) -> None:
        with self._lock:
            self._stop_requested = True
            runner = self.runner
        if runner is not None:
            runner.stop_threadsafe()

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.running()
