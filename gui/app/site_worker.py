"""The only place the app touches the site driver: `SiteRunner` runs on its own asyncio
loop in a plain thread, and each typed event it emits (`network.site_events`) is
re-emitted as a Qt signal, which Qt queues to the GUI thread. The GUI answers the plan
and asks to leave through the runner's thread-safe calls; it never blocks on the loop."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, Signal

log = logging.getLogger(__name__)


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
        self._ready = threading.Event()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="hemafed-site", daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _main(self) -> None:
        from hemafed.network.site import SiteRunner

        result: Path | None = None
        try:
            self.runner = SiteRunner(self.cfg, identity=self.identity, on_event=self.bridge.event.emit,
                                     auto_accept=False)  # the operator reviews the plan
        except Exception as exc:  # e.g. the identity key cannot be read
            self._ready.set()
            self.bridge.crashed.emit(str(exc))
            self.bridge.finished.emit(None)
            return
        self._ready.set()
        try:
            result = asyncio.run(self.runner.run())
        except Exception as exc:
            log.exception("site driver stopped with an error")
            self.bridge.crashed.emit(f"{type(exc).__name__}: {exc}")
        finally:
            self.bridge.finished.emit(result)

    def answer_plan(self, accept: bool, reason: str = "") -> None:
        if self.runner is not None:
            self.runner.answer_plan_threadsafe(accept, reason)

    def stop(self) -> None:
        if self.runner is not None:
            self.runner.stop_threadsafe()

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.running()
