"""Long work off the GUI thread (superqt style): a `Job` runs a function on the Qt
thread pool and reports only through its signals, which Qt queues to the GUI thread.

The function gets the job itself: `job.progress(i, n)` reports (throttled, and raises
`Cancelled` once Cancel was pressed, which stops a scan between files) and
`job.cancelled()` can be polled.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from PySide6.QtCore import QObject, QRunnable, QThreadPool, Signal

from hemafed.core.errors import HemafedError

# Jobs the pool is running: kept referenced so their signal objects outlive the page that
# started them (a page closed mid-job must not delete a signal source a worker still emits on).
_RUNNING: set[Job] = set()
_RUNNING_LOCK = threading.Lock()
PROGRESS_INTERVAL_S = 0.05  # at most 20 progress signals a second: the GUI repaints, never floods


class Cancelled(HemafedError):
    """Raised inside a job's function when the operator pressed Cancel."""


class JobSignals(QObject):
    progress = Signal(int, int)
    result = Signal(object)
    errored = Signal(str)
    cancelled = Signal()
    finished = Signal()  # always last


class Job(QRunnable):
    def __init__(self, fn: Callable[[Job], Any]) -> None:
        super().__init__()
        self.setAutoDelete(False)
        self.fn = fn
        self.signals = JobSignals()
        self._cancel = threading.Event()
        self._last_progress = 0.0
        self.done = threading.Event()

    def cancel(self) -> None:
        self._cancel.set()

    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def progress(self, i: int, n: int) -> None:
        if self._cancel.is_set():
            raise Cancelled
        now = time.monotonic()
        if i >= n or now - self._last_progress >= PROGRESS_INTERVAL_S:
            self._last_progress = now
            self.signals.progress.emit(i, n)

    def run(self) -> None:
        try:
            try:
                result = self.fn(self)
            except Cancelled:
                self.signals.cancelled.emit()
            except Exception as exc:  # reported to the operator; never kills the app
                traceback.print_exc()
                self.signals.errored.emit(str(exc) or type(exc).__name__)
            else:
                if self._cancel.is_set():
                    self.signals.cancelled.emit()
                else:
                    self.signals.result.emit(result)
            finally:
                self.done.set()
                self.signals.finished.emit()
        except RuntimeError:  # the app is shutting down and Qt already deleted the receivers
            pass
        finally:
            with _RUNNING_LOCK:
                _RUNNING.discard(self)

    def start(self) -> Job:
        with _RUNNING_LOCK:
            _RUNNING.add(self)
        QThreadPool.globalInstance().start(self)
        return self


def wait_for_jobs(timeout_ms: int = 30_000) -> bool:
    """Block until every pooled job has returned (shutdown and tests)."""
    return QThreadPool.globalInstance().waitForDone(timeout_ms)
