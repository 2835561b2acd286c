"""Start the desktop app: `hemafed gui` (or `hemafed` alone on a desktop)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from PySide6.QtWidgets import QApplication

from .settings import Settings
from .state import AppState
from .window import MainWindow, app_icon
from .workers import wait_for_jobs


def load_style() -> str:
    from importlib.resources import files

    path = files("hemafed.assets") / "hemafed.qss"
    return path.read_text(encoding="utf-8") if path.is_file() else ""


def create_window(config_dir: str | os.PathLike[str] | None = None,
                  state_dir: str | os.PathLike[str] | None = None) -> MainWindow:
    """Build the window on the running QApplication (tests and screenshots use this too); `state_dir`: the site's
    state (default: HEMAFED_STATE_DIR or the user's)."""
    app = QApplication.instance()
    assert app is not None, "create a QApplication first"
    app.setStyleSheet(load_style())  # type: ignore[attr-defined]
    state = AppState(Settings(config_dir), Path(state_dir) if state_dir is not None else None)
    window = MainWindow(state)
    window.setWindowIcon(app_icon())
    return window


def run_app(config_dir: str | os.PathLike[str] | None = None, argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    app = QApplication.instance() or QApplication(argv or sys.argv[:1])
    app.setApplicationName("hemafed")
    app.setOrganizationName("hemafed")
    app.setDesktopFileName("hemafed")
    window = create_window(config_dir)
    window.show()
    app.processEvents()
    probe = os.environ.get("HEMAFED_STARTUP_PROBE")
    if probe:
        # Cold-start measurement (bench/app_start.py, packaging): the launcher puts its own clock
        # in the variable, so the figure includes interpreter start and every import.
        now = time.time()
        since_launch = now - float(probe) if probe.replace(".", "", 1).isdigit() else float("nan")
        print(f"main window shown: {since_launch:.3f} s after launch, "
              f"{time.perf_counter() - started:.3f} s in-process", flush=True)
        state = window.state
        while state.ledgers_loading or state.projection_pending:  # the ledgers read, the projection shown
            app.processEvents()
            time.sleep(0.005)
        print(f"ledgers and projection shown: {time.time() - float(probe):.3f} s after launch", flush=True)
        window.close()
        wait_for_jobs()
        return 0
    code = app.exec()
    wait_for_jobs()  # let a running calibration or scan return before the interpreter shuts down
    return code
