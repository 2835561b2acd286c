"""Desktop-app tests: real widgets under QT_QPA_PLATFORM=offscreen; every test must leave
no worker thread, QThread or running QTimer behind."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("PySide6", reason="the desktop app needs the [gui] extra")


@pytest.fixture(autouse=True)
def no_threads_or_timers_left(qapp):
    """Set up before pytest-qt's widgets, so it checks after they are closed."""
    from PySide6.QtCore import QThread, QThreadPool, QTimer

    before = set(threading.enumerate())
    yield
    from hemafed.gui.app.workers import wait_for_jobs

    assert wait_for_jobs(20_000), "a worker job was still running 20 s after the test"
    qapp.processEvents()
    pool = QThreadPool.globalInstance()
    pool.waitForDone(5_000)  # a job that has just returned may still be leaving its pool thread
    assert pool.activeThreadCount() == 0, "the thread pool still runs a job"
    deadline = 50
    while deadline and [t for t in set(threading.enumerate()) - before if t.is_alive()
                        and not t.name.startswith(("QThreadPool", "Dummy"))]:
        threading.Event().wait(0.1)
        deadline -= 1
    left = [t.name for t in set(threading.enumerate()) - before if t.is_alive()
            and not t.name.startswith(("QThreadPool", "Dummy"))]
    assert not left, f"threads left running: {left}"
    live = []
    for widget in qapp.topLevelWidgets():
        if widget.isVisible():
            live.append(widget)
        for timer in widget.findChildren(QTimer):
            assert not timer.isActive(), f"QTimer left running under {widget!r}"
        for thread in widget.findChildren(QThread):
            assert not thread.isRunning(), f"QThread left running under {widget!r}"
    assert not live, f"windows left open: {live}"


@pytest.fixture
def window(qtbot, tmp_path: Path):
    from hemafed.gui.app.main import create_window

    win = create_window(tmp_path / "config")
    qtbot.addWidget(win)
    win.show()
    # the start-up projection runs in a worker; tests start from its result
    qtbot.waitUntil(lambda: not win.state.projection_pending, timeout=30_000)
    yield win
    win.close()
    for timer in win.state.findChildren(__import__("PySide6.QtCore", fromlist=["QTimer"]).QTimer):
        assert not timer.isActive(), "the app state left a QTimer running"


@pytest.fixture
def pbc(shared_data: Path) -> Path:
    path = shared_data / "pbc_sample"
    if not path.is_dir():
        pytest.skip("pbc_sample not in the shared data")
    return path


def scan(qtbot, win, source: Path) -> None:
    page = win.data_page
    with qtbot.waitSignal(win.state.scanChanged, timeout=60_000):
        page.start_scan(str(source))
    qtbot.waitUntil(lambda: page.job is None, timeout=10_000)


@pytest.fixture(scope="session")
def model_file(tmp_path_factory) -> Path:
    """A real model file as a site saves it: cnn4_28, seeded initial weights."""
    from hemafed.core.learning.models import build_model, get_flat_params
    from hemafed.core.rounds.plan import FederationPlan
    from hemafed.network.site import save_model_file

    plan = FederationPlan(federation_id="gui-test", model="cnn4_28", threshold=2, min_sites=2,
                          algorithm="fedavg", dp_mode="local", noise_multiplier=0.0)
    weights = get_flat_params(build_model("cnn4_28", 8, seed=3))
    assert np.isfinite(weights).all()
    return save_model_file(tmp_path_factory.mktemp("model") / "final.npz", weights, plan, 2)
