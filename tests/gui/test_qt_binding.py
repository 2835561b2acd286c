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


def test_missing_qt_system_libraries_are_named_with_the_install_command() -> None:
    from hemafed.gui.app.system_check import missing_qt_libraries, qt_libraries_message

    def lacking(name: str) -> str | None:
        return None if name in ("xcb-cursor", "xcb-icccm", "xcb-keysyms") else f"lib{name}.so"

    env = {"DISPLAY": ":0"}
    missing = missing_qt_libraries(env, find=lacking)
    assert missing == ["libxcb-cursor0", "libxcb-icccm4", "libxcb-keysyms1"]
    text = qt_libraries_message(missing)
    assert "sudo apt install libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1" in text
    assert missing_qt_libraries({"DISPLAY": ":0", "QT_QPA_PLATFORM": "offscreen"}, find=lacking) == []
    assert missing_qt_libraries({}, find=lacking) == []  # no desktop session: nothing to check
