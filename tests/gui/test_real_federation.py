"""The app as a hospital site in a real federation: an in-test aggregator on loopback with
real TLS (tests/federation/fedharness.py), headless sites, and the app's Federation page
driving a real `SiteRunner` through `gui/app/site_worker.py`. The operator's actions are
clicks; what the window shows is checked against what the aggregator and the ledger hold."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from PySide6.QtCore import Qt

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "federation"))
from fedharness import Federation, make_federation

from hemafed.core.privacy.ledger import PrivacyLedger, ledger_exists
from hemafed.network import site_events as ev

pytestmark = pytest.mark.slow
GUI_SITE = "site1"


class AggregatorThread:
    """The aggregator and the headless sites on their own asyncio loop in a thread, as a
    separate machine would run them; the GUI thread stays free for the app."""

    def __init__(self, fed: Federation, headless: dict[str, tuple[int, str] | None]) -> None:
        self.fed, self.headless = fed, headless
        self.ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.agg_task: asyncio.Task | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name="test-aggregator")

    def start(self) -> AggregatorThread:
        self.thread.start()
        assert self.ready.wait(60), "the aggregator did not start listening"
        return self

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except (asyncio.CancelledError, Exception) as exc:  # the test reads it
            self.error = exc

    async def _run(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.agg_task = await self.fed.start_aggregator()
        sites = [self.fed.start_site(name, die_at=die_at) for name, die_at in self.headless.items()]
        self.ready.set()
        try:
            await self.agg_task
        finally:
            for task in sites:
                task.cancel()
            await asyncio.gather(*sites, return_exceptions=True)

    @property
    def url(self) -> str:
        return self.fed.url

    def done(self) -> bool:
        return not self.thread.is_alive()

    def stop(self) -> None:
        if self.loop is not None and self.agg_task is not None and not self.done():
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self.agg_task.cancel)
        self.thread.join(60)
        assert not self.thread.is_alive(), "the aggregator thread did not stop"


@contextlib.contextmanager
def running(fed: Federation, headless: dict[str, tuple[int, str] | None]):
    agg = AggregatorThread(fed, headless).start()
    try:
        yield agg
    finally:
        agg.stop()


def federation(tmp_path: Path, *, rounds: int = 2, images: int = 64, fedsgd: bool = False, **plan) -> Federation:
    if not fedsgd:
        return make_federation(tmp_path, n_sites=3, threshold=2, rounds=rounds, images_per_site=images,
                               **plan)
    from hemafed.core.learning.recipe import RECIPE, with_budget

    q, epsilon = 0.3, plan.pop("plan_epsilon", 6.0)
    fed = make_federation(tmp_path, n_sites=3, threshold=2, rounds=rounds, images_per_site=images,
                          model=RECIPE["model"], algorithm="fedsgd", sample_rate=q, server_lr=0.5, **plan)
    fed.plan = replace(with_budget(fed.plan, epsilon), batch_size=round(q * 3 * 0.9 * images))
    fed.agg_config = replace(fed.agg_config, plan=fed.plan)
    return fed


def point_app_at(win, fed: Federation, url: str, *, site: str = GUI_SITE, ca: Path | None = None) -> None:
    """The operator's set-up: the site's state folder (its key), images, address, CA file."""
    state, page = win.state, win.federation_page
    state.state_dir = fed.root / site
    state.source = str(fed.root / site / "data.npz")
    state.refresh_ledgers()
    page.refresh_identity()
    page.url.setText(url)
    page.ca.setText(str(ca or fed.ca))
    page.federation.setText(fed.plan.federation_id)


def join(qtbot, win) -> list[object]:
    """Click Join; returns the list of (event, stage text shown after it), every event the
    driver sent, in order. The recorder wraps the page's handler before the worker starts
    (the page connects `self.on_event` then), so not even the first event is missed."""
    page = win.federation_page
    seen: list[object] = []
    handler = type(page).on_event.__get__(page)

    def record(e: object) -> None:
        handler(e)
        seen.append((e, page.stage.text()))

    page.on_event = record
    qtbot.waitUntil(lambda: not win.state.projection_pending, timeout=30_000)
    qtbot.mouseClick(page.join_btn, Qt.MouseButton.LeftButton)
    assert page.worker is not None, page.banner.text()
    return seen


def accept_plan(qtbot, win) -> str:
    """Click "Accept and join" in the plan review; returns the review's text."""
    from PySide6.QtWidgets import QLabel

    page = win.federation_page
    qtbot.waitUntil(lambda: page.dialog is not None, timeout=60_000)
    text = " ".join(label.text() for label in page.dialog.findChildren(QLabel))
    qtbot.mouseClick(page.dialog.accept_btn, Qt.MouseButton.LeftButton)
    assert page.dialog is None
    return text


def wait_left(qtbot, win, timeout: int = 60_000) -> None:
    qtbot.waitUntil(lambda: win.federation_page.worker is None, timeout=timeout)


def events(seen, cls) -> list:
    return [e for e, _ in seen if isinstance(e, cls)]


@pytest.mark.parametrize("fedsgd", [False, True], ids=["fedavg-cnn4", "fedsgd-distributed"])
def test_the_app_runs_a_real_federation_to_the_end(qtbot, window, tmp_path: Path, fedsgd: bool) -> None:
    # round 1 waits (up to the join time-out) for every site: the app's site is the slowest to be ready (the
    # operator's plan review; each site's ε projection takes seconds on 2 busy cores), so not the harness's 5 s
    fed = federation(tmp_path, rounds=3 if fedsgd else 2, fedsgd=fedsgd, join_timeout_s=60.0)
    with running(fed, {"site2": None, "site3": None}) as agg:
        point_app_at(window, fed, agg.url)
        seen = join(qtbot, window)
        review = accept_plan(qtbot, window)
        wait_left(qtbot, window, timeout=180_000)
        qtbot.waitUntil(agg.done, timeout=60_000)
    page, state = window.federation_page, window.state
    assert agg.error is None, agg.error
    assert [o.status for o in agg.fed.aggregator.outcomes] == ["completed"] * fed.plan.rounds
    finished = events(seen, ev.Finished)
    assert finished and finished[-1].outcome == "done" and finished[-1].model_path is not None
    assert state.model_path == finished[-1].model_path and Path(state.model_path).is_file()
    # the stages the operator saw, in words
    shown = {text for e, text in seen if isinstance(e, ev.StageChanged)}
    assert "training on this hospital's images" in shown
    assert any(text.startswith("secure aggregation") for text in shown), shown
    assert [r.round for r in state.rounds] == list(range(1, fed.plan.rounds + 1))
    # ε shown is the ledger's
    ledger = PrivacyLedger(fed.plan.federation_id, state=fed.root / GUI_SITE)
    assert ledger.rounds == fed.plan.rounds
    assert page.epsilon.text().startswith(f"{ledger.spent_epsilon():.4g} of")
    assert state.rounds[-1].epsilon_spent == pytest.approx(ledger.spent_epsilon())
    qtbot.waitUntil(lambda: (state.ledger_for(fed.plan.federation_id) or {}).get("rounds") == fed.plan.rounds,
                    timeout=10_000)  # the ledgers are re-read in a worker
    statement = window.results_page.statement.toPlainText()
    if fedsgd:
        assert {e.dp_mode for e in ledger.entries} == {"distributed"}
        received = events(seen, ev.PlanReceived)[0]
        assert received.epsilon_per_round[-1] == pytest.approx(ledger.spent_epsilon(), rel=1e-9)
        for needle in ("one DP-SGD step", "q = 0.3", "<b>distributed</b>", "pool their noise shares",
                       "t = 2", "c = 1", f"σ = {fed.plan.noise_multiplier:.3g}",
                       f"<b>{received.epsilon_per_round[-1]:.3g}</b> of this site's budget", "never see"):
            assert needle in review, needle
        # the Privacy page's projection is the site trainer's: before joining it showed exactly what the
        # driver then checked, and after the rounds it shows what the ledger holds
        from hemafed.gui.app.projection import project

        own = project(state.epsilon, fed.plan, 57, bounds=state.bounds)
        assert own.epsilon_per_round == received.epsilon_per_round
        assert [e.epsilon for e in ledger.entries] == list(received.epsilon_per_round)
        qtbot.waitUntil(lambda: state.projection is not None and state.projection.rounds_done == fed.plan.rounds,
                        timeout=10_000)
        proj = state.projection
        assert proj.mechanism == "skellam" and proj.sigma == fed.plan.noise_multiplier
        assert proj.spent == ledger.spent_epsilon()
        assert "distributed through secure aggregation" in statement
        history = window.privacy_page.history
        qtbot.waitUntil(lambda: history.rowCount() == fed.plan.rounds, timeout=10_000)
        assert history.item(0, 4).text().startswith("distributed") and "c=1" in history.item(0, 4).text()
    else:
        assert "local epoch(s)" in review and "<b>local</b>" in review
        assert "Differential privacy." in statement and window.privacy_page.history.item(0, 4).text().startswith(
            "local")
    assert not page.banner.isVisible()


def test_failures_through_the_real_driver_say_what_to_do(qtbot, window, tmp_path: Path) -> None:
    """One aggregator, whose plan asks for a δ this site does not accept; the site tries it
    with an unknown key, another federation's CA, then its own key."""
    from hemafed.core.trust.certs import create_federation_certs
    from hemafed.core.trust.identity import init_identity

    fed = federation(tmp_path, delta=1e-3)
    page = window.federation_page
    with running(fed, {}) as agg:
        # 1. a key the federation does not know: one attempt, no retry loop, fingerprint shown
        stranger = init_identity(tmp_path / "stranger")
        point_app_at(window, fed, agg.url)
        window.state.state_dir = tmp_path / "stranger"
        page.refresh_identity()
        seen = join(qtbot, window)
        wait_left(qtbot, window, timeout=30_000)
        assert len(events(seen, ev.SiteFailed)) == 1
        states = [e.state for e, _ in seen if isinstance(e, ev.ConnectionChanged)]
        assert states.count("connecting") == 1 and "reconnecting" not in states
        text = page.banner.text()
        assert "refused this site's key" in text and stranger.fingerprint in text and "What to do" in text
        assert "keeps trying" not in text
        assert agg.fed.aggregator.outcomes == []
        # 2. a certificate from another CA
        other = create_federation_certs(tmp_path / "other-ca", ["127.0.0.1"])
        point_app_at(window, fed, agg.url, ca=other.ca_file)
        seen = join(qtbot, window)
        wait_left(qtbot, window, timeout=30_000)
        assert events(seen, ev.SiteFailed)[0].fatal
        text = page.banner.text()  # the next step names this app's fields, never a configuration file's
        assert "CA certificate" in text and "fingerprint" in text and "What to do" in text and "ca_file" not in text
        # 3. its own key, a plan outside its bounds: which bound, and declined without a dialog
        point_app_at(window, fed, agg.url)
        seen = join(qtbot, window)
        wait_left(qtbot, window, timeout=60_000)
        assert page.dialog is None
        text = page.banner.text()
        assert "outside what this site accepts" in text and "delta=0.001 exceeds the accepted 0.0001" in text
        assert not events(seen, ev.PlanAnswered)[0].accepted
        assert not ledger_exists(fed.plan.federation_id, fed.root / GUI_SITE)  # nothing spent
    # 4. the aggregator is gone: the site says so and keeps trying until Leave
    seen = join(qtbot, window)
    qtbot.waitUntil(lambda: bool(events(seen, ev.SiteFailed)), timeout=30_000)
    assert "cannot reach the aggregator" in page.banner.text() and "keeps trying" in page.banner.text()
    qtbot.mouseClick(page.leave_btn, Qt.MouseButton.LeftButton)
    wait_left(qtbot, window, timeout=10_000)
    assert events(seen, ev.Finished)[-1].outcome == "stopped"


def test_budget_too_small_for_the_plan_is_refused_with_the_reason(qtbot, window, tmp_path: Path) -> None:
    """A DP-FedSGD plan's σ is the federation's: a site whose budget it would pass refuses it."""
    fed = federation(tmp_path, rounds=3, fedsgd=True, plan_epsilon=30.0)
    page = window.federation_page
    with running(fed, {}) as agg:
        point_app_at(window, fed, agg.url)
        window.privacy_page.set_budget(2.0)
        qtbot.waitUntil(lambda: not window.state.projection_pending, timeout=30_000)
        seen = join(qtbot, window)
        wait_left(qtbot, window, timeout=60_000)
    assert page.dialog is None
    assert "budget" in page.banner.text() and "What to do" in page.banner.text()
    assert not events(seen, ev.PlanAnswered)[0].accepted


def test_missing_or_empty_data_folder_refuses_join(qtbot, window, tmp_path: Path) -> None:
    fed = federation(tmp_path)
    page = window.federation_page
    point_app_at(window, fed, "wss://127.0.0.1:9")
    window.state.source = str(tmp_path / "unplugged-drive")
    assert not page.join()
    assert "missing" in page.banner.text() and "Data page" in page.banner.text()
    empty = tmp_path / "empty"
    empty.mkdir()
    from .conftest import scan

    scan(qtbot, window, empty)
    point_app_at(window, fed, "wss://127.0.0.1:9")
    window.state.source = str(empty)
    assert not page.join()
    assert "no usable images" in page.banner.text() and "Data page" in page.banner.text()


def test_round_abandoned_when_too_few_sites_remain(qtbot, window, tmp_path: Path) -> None:
    fed = federation(tmp_path, rounds=2)
    fed.agg_config = replace(fed.agg_config, sites={k: v for k, v in fed.agg_config.sites.items() if k != "site3"})
    with running(fed, {"site2": (1, "masked")}) as agg:
        point_app_at(window, fed, agg.url)
        seen = join(qtbot, window)
        accept_plan(qtbot, window)
        qtbot.waitUntil(lambda: any(e.status == "abandoned" for e in events(seen, ev.RoundFinished)),
                        timeout=120_000)
        qtbot.mouseClick(window.federation_page.leave_btn, Qt.MouseButton.LeftButton)
        wait_left(qtbot, window, timeout=15_000)
    log = window.federation_page.log.toPlainText()
    assert "round 1 of 2 abandoned" in log
    assert window.state.rounds[0].status == "abandoned"


def _leave_at_first_training_step(qtbot, window, tmp_path: Path, act) -> tuple[Federation, list, float]:
    fed = federation(tmp_path, rounds=2, images=400)
    with running(fed, {"site2": None, "site3": None}) as agg:
        point_app_at(window, fed, agg.url)
        seen = join(qtbot, window)
        accept_plan(qtbot, window)
        qtbot.waitUntil(lambda: bool(events(seen, ev.TrainProgress)), timeout=120_000)
        clicked = time.monotonic()
        act()
        qtbot.waitUntil(lambda: window.federation_page.worker is None, timeout=20_000)
        stopped_in = time.monotonic() - clicked
        qtbot.waitUntil(agg.done, timeout=120_000)
    assert agg.error is None, agg.error
    return fed, seen, stopped_in


def test_leave_during_training_stops_within_seconds_and_is_a_dropout(qtbot, window, tmp_path: Path) -> None:
    page = window.federation_page
    fed, seen, stopped_in = _leave_at_first_training_step(
        qtbot, window, tmp_path, lambda: qtbot.mouseClick(page.leave_btn, Qt.MouseButton.LeftButton))
    assert stopped_in < 5, stopped_in
    assert events(seen, ev.Finished)[-1].outcome == "stopped"
    first = fed.aggregator.outcomes[0]
    assert first.status == "completed" and GUI_SITE in first.dropouts
    # nothing recorded for a round whose update never left
    fid, state = fed.plan.federation_id, fed.root / GUI_SITE
    assert not ledger_exists(fid, state) or PrivacyLedger(fid, state=state).rounds <= 1


def test_closing_the_window_during_a_round_leaves_cleanly(qtbot, window, tmp_path: Path) -> None:
    fed, seen, _ = _leave_at_first_training_step(qtbot, window, tmp_path, window.close)
    qtbot.waitUntil(lambda: not window.isVisible(), timeout=10_000)
    assert events(seen, ev.Finished)[-1].outcome == "stopped"
    assert GUI_SITE in fed.aggregator.outcomes[0].dropouts
    # intact: it loads, and holds at most the round that was training
    if ledger_exists(fed.plan.federation_id, fed.root / GUI_SITE):
        ledger = PrivacyLedger(fed.plan.federation_id, state=fed.root / GUI_SITE)
        assert ledger.rounds <= 1 and ledger.spent_epsilon() <= window.state.epsilon
