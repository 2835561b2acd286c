from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

from hemafed.core.rounds.plan import FederationPlan
from hemafed.network import site_events as ev
from hemafed.network.site import PrivacySettings

from .conftest import scan


def set_budget(qtbot, window, epsilon: float) -> None:
    window.privacy_page.set_budget(epsilon)
    state = window.state  # a projection for an earlier budget may still arrive first: wait for this one's
    qtbot.waitUntil(lambda: not state.projection_pending and state.projection is not None
                    and state.projection.budget == epsilon, timeout=30_000)


def test_the_default_plan_is_the_recipe_and_its_noise_is_the_federations(qtbot, window, pbc: Path) -> None:
    scan(qtbot, window, pbc)
    page, state = window.privacy_page, window.state
    set_budget(qtbot, window, 8.0)
    proj = state.projection
    assert state.plan.algorithm == "fedsgd" and proj.fits and proj.sigma == state.plan.noise_multiplier
    assert "the same for every hospital" in page.sigma_label.text()
    assert len(proj.epsilon_per_round) == state.plan.rounds and proj.epsilon_per_round[-1] <= 8.0
    set_budget(qtbot, window, 6.0)  # the federation's σ does not change with this site's budget: it refuses
    strict = state.projection
    assert not strict.fits and 0 < strict.rounds_allowed < state.plan.rounds and "will not join" in page.verdict.text()


def test_budget_change_updates_projection_and_rounds_allowed(qtbot, window, pbc: Path) -> None:
    scan(qtbot, window, pbc)
    page, state = window.privacy_page, window.state
    # a plan that trains locally (FedAvg): each site fits its own σ to its budget
    state.set_plan(FederationPlan(federation_id="local-epochs", model="cnn4_28", algorithm="fedavg", dp_mode="local",
                                  noise_multiplier=0.0, rounds=10, batch_size=64, max_sites=64), received=False)
    qtbot.waitUntil(lambda: not window.state.projection_pending, timeout=30_000)
    set_budget(qtbot, window, 6.0)
    loose = state.projection
    assert loose.fits and not loose.n_estimated and loose.n_train == state.n_train()
    assert page.sigma_label.text() == f"{loose.sigma:.3f}"
    assert page.allowed_label.text().startswith(f"all {state.plan.rounds}")
    assert len(loose.epsilon_per_round) == state.plan.rounds
    assert loose.epsilon_per_round[-1] <= 6.0 and list(loose.epsilon_per_round) == sorted(loose.epsilon_per_round)
    set_budget(qtbot, window, 2.0)
    strict = state.projection
    assert strict.fits and strict.sigma > loose.sigma  # less budget, more noise
    assert page.sigma_label.text() == f"{strict.sigma:.3f}"
    assert strict.epsilon_per_round[-1] <= 2.0
    assert "The plan fits" in page.verdict.text()
    # the slider follows the box (log scale)
    assert abs(page.slider.value() - round((math.log10(2.0) + 1) * 100)) <= 1


def test_budget_too_small_refuses_join_with_the_reason(qtbot, window, pbc: Path) -> None:
    scan(qtbot, window, pbc)
    # the federation's plan, as the aggregator sent it on an earlier try (before any, Join is never refused
    # for the default plan: the site checks the plan it receives)
    window.state.set_plan(replace(window.state.plan, federation_id="ward-7"), received=True)
    set_budget(qtbot, window, 0.1)
    proj = window.state.projection
    assert not proj.fits and "budget is too small" in proj.refusal
    assert proj.rounds_allowed < window.state.plan.rounds
    assert "will not join" in window.privacy_page.verdict.text()
    fed = window.federation_page
    fed.create_key()
    fed.url.setText("wss://127.0.0.1:9")
    assert not fed.join()
    assert fed.worker is None
    assert not fed.banner.isHidden()
    assert "budget is too small" in fed.banner.text() and "What to do" in fed.banner.text()


def test_join_refused_without_data_or_key(qtbot, window, tmp_path: Path) -> None:
    fed = window.federation_page
    fed.url.setText("wss://127.0.0.1:9")
    assert not fed.join()
    assert "identity key" in fed.banner.text()
    fed.create_key()
    assert len(fed.fingerprint.text().replace(":", "").replace(" ", "")) >= 8
    window.state.source = str(tmp_path / "gone")
    assert not fed.join()
    assert "missing" in fed.banner.text() and "Data page" in fed.banner.text()


def _plan() -> FederationPlan:
    return FederationPlan(federation_id="ward-7", model="cnn4_28", rounds=3, threshold=2, min_sites=2, batch_size=64,
                          algorithm="fedavg", dp_mode="local", noise_multiplier=0.0)


def test_plan_review_and_live_status_from_site_events(qtbot, window) -> None:
    fed, state = window.federation_page, window.state
    plan = _plan()
    privacy = PrivacySettings(sigma=1.234, sample_rate=0.1, steps=10, delta=1e-5)
    fed.on_event(ev.ConnectionChanged("connected", "wss://agg:8765"))
    assert fed.connection.text().startswith("connected")
    fed.on_event(ev.PlanReceived(plan, privacy, (), (1.0, 2.0, 3.0), awaiting_answer=True))
    assert state.plan == plan and state.plan_received
    dialog = fed.dialog
    assert dialog is not None and dialog.isVisible()
    texts = " ".join(label.text() for label in dialog.findChildren(type(fed.connection)))
    for needle in ("cnn4_28", "σ = 1.234", "threshold t = 2", "will see", "never see", "batch size 64"):
        assert needle in texts, needle
    dialog.accept_btn.click()
    assert fed.dialog is None and "you accepted the plan" in fed.log.toPlainText()
    fed.on_event(ev.RoundStarted(1, 3, 4))
    fed.on_event(ev.StageChanged(1, "training"))
    fed.on_event(ev.TrainProgress(1, 5, 10, 0.8))
    assert fed.round_label.text() == "round 1 of 3" and fed.participants.text() == "4"
    assert fed.stage.text() == "training on this hospital's images"
    assert (fed.train_bar.value(), fed.train_bar.maximum()) == (5, 10)
    fed.on_event(ev.StageChanged(1, "masked"))
    assert "masked update" in fed.stage.text()
    fed.on_event(ev.RoundFinished(1, "completed", accuracy=0.42, epsilon_spent=1.5))
    assert fed.epsilon.text().startswith("1.5 of")
    assert [r.round for r in state.rounds] == [1] and state.rounds[0].accuracy == 0.42


def test_plan_outside_bounds_is_shown_not_asked(qtbot, window) -> None:
    fed = window.federation_page
    fed.on_event(ev.PlanReceived(_plan(), None, ("delta=0.001 exceeds the accepted 0.0001",), ()))
    assert fed.dialog is None
    assert "outside what this site accepts" in fed.banner.text() and "delta=0.001" in fed.banner.text()


def test_failures_are_shown_in_words_with_the_next_step(qtbot, window) -> None:
    fed = window.federation_page
    fed.on_event(ev.SiteFailed("This site's key is not on the federation's list.", fatal=True,
                               what_to_do="send the fingerprint to the federation's admin"))
    text = fed.banner.text()
    assert "not on the federation's list" in text and "send the fingerprint" in text
    assert "keeps trying" not in text
    fed.on_event(ev.SiteFailed("The aggregator cannot be reached.", fatal=False, what_to_do="check the address"))
    assert "keeps trying" in fed.banner.text()
    assert "PROBLEM: The aggregator cannot be reached." in fed.log.toPlainText()


def test_settings_persist_between_runs(qtbot, tmp_path: Path) -> None:
    from hemafed.gui.app.main import create_window

    first = create_window(tmp_path / "cfg")
    qtbot.addWidget(first)
    qtbot.waitUntil(lambda: not first.state.projection_pending, timeout=30_000)
    first.privacy_page.set_budget(3.5)
    first.federation_page.url.setText("wss://agg.example:8765")
    first.federation_page.federation.setText("ward-7")
    first.state.settings.set("federation/url", first.federation_page.url.text())
    first.resize(760, 560)  # inside the offscreen screen (800×600)
    first.close()
    second = create_window(tmp_path / "cfg")
    qtbot.addWidget(second)
    assert second.state.epsilon == 3.5 and second.privacy_page.spin.value() == 3.5
    assert second.federation_page.url.text() == "wss://agg.example:8765"
    assert (second.width(), second.height()) == (760, 560)
    qtbot.waitUntil(lambda: not second.state.projection_pending, timeout=30_000)
    second.close()


def test_events_from_the_driver_thread_reach_the_page_on_the_gui_thread(qtbot, window) -> None:
    """The bridge the site worker uses: events emitted on another thread (as the driver's
    asyncio thread does) are queued to the GUI thread, in order."""
    import threading

    from PySide6.QtCore import QThread

    from hemafed.gui.app.site_worker import SiteBridge

    fed = window.federation_page
    bridge = SiteBridge()
    seen: list[tuple[str, bool]] = []
    gui_thread = QThread.currentThread()
    bridge.event.connect(lambda e: seen.append((type(e).__name__, QThread.currentThread() is gui_thread)))
    bridge.event.connect(fed.on_event)
    events = [ev.ConnectionChanged("connected"), ev.RoundStarted(1, 2, 3), ev.StageChanged(1, "training"),
              *(ev.TrainProgress(1, s, 40, 1.0) for s in range(1, 41)),
              ev.RoundFinished(1, "completed", accuracy=0.5, epsilon_spent=0.7)]
    sender = threading.Thread(target=lambda: [bridge.event.emit(e) for e in events])
    sender.start()
    sender.join()
    qtbot.waitUntil(lambda: len(seen) == len(events), timeout=5000)
    assert [name for name, _ in seen] == [type(e).__name__ for e in events]
    assert all(on_gui for _, on_gui in seen)
    assert fed.train_bar.value() == 40 and fed.epsilon.text().startswith("0.7 of")


def test_leave_before_the_driver_has_started_stops_it_without_connecting(qtbot, tmp_path: Path) -> None:
    """Join returns at once (the driver's imports happen on its thread); a Leave that comes
    before the driver exists is kept and the driver finishes as stopped without connecting."""
    from hemafed.core.trust.identity import init_identity
    from hemafed.gui.app.site_worker import SiteWorker
    from hemafed.network.config import SiteConfig

    identity = init_identity(tmp_path / "site")
    cfg = SiteConfig(data=tmp_path / "none.npz", state_dir=tmp_path / "site", aggregator="wss://127.0.0.1:9/",
                     epsilon=8.0)
    worker = SiteWorker(cfg, identity)
    seen: list[object] = []
    worker.bridge.event.connect(seen.append)
    worker.stop()  # Leave pressed while the thread is still starting
    with qtbot.waitSignal(worker.bridge.finished, timeout=60_000) as finished:
        worker.start()
    assert worker.join(10)
    assert finished.args == [None]
    qtbot.waitUntil(lambda: any(isinstance(e, ev.Finished) for e in seen), timeout=5000)
    assert [type(e).__name__ for e in seen] == ["Finished"] and seen[0].outcome == "stopped"


def test_driver_modules_are_imported_with_the_collector_paused_and_frozen() -> None:
    """After the import the collector runs again, and the objects that existed are frozen
    (later collections skip them: the long ones stalled the window while training)."""
    import gc
    import sys

    from hemafed.gui.app.site_worker import DRIVER_MODULES, import_driver_modules

    import_driver_modules()
    assert gc.isenabled()
    assert all(name in sys.modules for name in DRIVER_MODULES)
    assert gc.get_freeze_count() > 100_000  # torch, Opacus and Qt's wrappers at least


def test_the_accuracy_history_survives_a_restart_and_a_new_federation_starts_empty(qtbot, tmp_path: Path,
                                                                                   monkeypatch) -> None:
    """The Results page draws the last federation's rounds from the site's round log at start; 1,000 rounds
    draw as a line, not a blob of markers; joining another federation shows nothing of the earlier one."""
    from hemafed.core.privacy.store import SiteStore
    from hemafed.gui.app.main import create_window

    state_dir = tmp_path / "state"
    monkeypatch.setenv("HEMAFED_STATE_DIR", str(state_dir))
    store = SiteStore(state_dir)
    for rnd in range(1, 1001):
        store.log_round("ward-7", rnd, "trained", float(rnd), epsilon=0.01 * rnd)
        store.log_round("ward-7", rnd, "round_end", float(rnd), outcome="completed", accuracy=0.5 + rnd / 4000,
                        epsilon_spent=0.01 * rnd)
    store.log_round("ward-7", 1000, "round_end", 1001.0, outcome="completed", accuracy=0.77, epsilon_spent=10.0)
    win = create_window(tmp_path / "config")
    qtbot.addWidget(win)
    win.show()
    try:
        state = win.state
        qtbot.waitUntil(lambda: len(state.rounds) == 1000, timeout=30_000)
        assert state.rounds_federation == "ward-7" and state.rounds[-1].accuracy == 0.77  # the last word wins
        chart = win.results_page.accuracy_chart
        win.show_page("Results")
        qtbot.waitUntil(lambda: chart.renders > 0 and not chart.busy(), timeout=30_000)
        assert not chart.pixmap().isNull()
        state.clear_rounds(None)
        assert state.rounds == [] and state.rounds_federation is None
        state.load_rounds("another-federation")
        qtbot.waitUntil(lambda: state.rounds_federation == "another-federation", timeout=10_000)
        assert state.rounds == []
    finally:
        win.close()


def test_help_about_and_shortcuts(qtbot, window) -> None:
    from hemafed.gui.app.help import SHORTCUTS

    assert set(window.shortcut_actions) == {keys for keys, _ in SHORTCUTS}  # the help lists what works
    window.shortcut_actions["Ctrl+2"].trigger()
    assert window.stack.currentWidget().widget() is window.privacy_page
    window.shortcut_actions["Ctrl+4"].trigger()
    assert window.stack.currentWidget().widget() is window.results_page
    window.shortcut_actions["F1"].trigger()
    text = window.help_dialog.findChild(__import__("PySide6.QtWidgets", fromlist=["QTextBrowser"]).QTextBrowser)
    assert "Four steps" in text.toPlainText() and "Ctrl+J" in text.toPlainText()
    window.help_dialog.close()
    menu = window.menuBar().actions()[0].menu()
    about = next(a for a in menu.actions() if a.text() == "About hemafed")
    about.trigger()
    assert str(window.state.state_dir) in window.help_dialog.findChild(type(text)).toPlainText()
    window.help_dialog.close()


def test_a_window_saved_larger_than_the_screen_opens_inside_it(qtbot, window) -> None:
    """A geometry saved at 100 % scaling, restored at 150 % (or on a smaller monitor), must not open off screen."""
    room = window.screen().availableGeometry()
    window.resize(room.width() * 2, room.height() * 2)
    window.move(room.x() + 300, room.y() + 200)
    window.fit_to_screen()
    assert room.contains(window.frameGeometry())
    assert window.minimumSizeHint().width() < 800  # pages scroll: the window fits an 800-pixel-wide screen
