"""The Qt binding itself must not corrupt the interpreter. PySide6 6.12.0 (shiboken6 6.12.0)
releases a reference to None on every call of a void C++ method and one to True on every
Python-side `Signal.emit()`; after a few thousand calls (a federation's progress events, a
heartbeat timer) the app dies with "Fatal Python error: none_dealloc". pyproject.toml
excludes that release; this test catches a binding with the same fault."""

from __future__ import annotations

import sys

from PySide6.QtCore import QObject, QTimer, Signal


class _Emitter(QObject):
    fired = Signal(object)


def test_void_calls_and_emits_keep_none_and_true_alive(qapp) -> None:
    timer = QTimer()
    before = sys.getrefcount(None)
    for _ in range(1000):
        timer.setInterval(5)  # a void C++ method
    assert sys.getrefcount(None) - before > -100, "the Qt binding releases None on void calls"
    emitter = _Emitter()
    seen: list[object] = []
    emitter.fired.connect(seen.append)
    before = sys.getrefcount(True)
    for i in range(1000):
        emitter.fired.emit(i)
    assert len(seen) == 1000
    assert sys.getrefcount(True) - before > -100, "the Qt binding releases True on Signal.emit()"
