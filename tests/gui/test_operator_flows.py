"""What an operator lives through, with the real site driver over loopback TLS (tests/federation/fedharness.py):
a refused join that a raised budget fixes without touching a file, an aggregator restart that needs no click,
a changed plan that is reviewed again with what changed, a federation that finished without this site, and a
status bar, panel and banner that agree in every state."""

from __future__ import annotations

import socket
from dataclasses import replace
from pathlib import Path

import pytest

from hemafed.core.privacy.ledger import PrivacyLedger, ledger_exists
from hemafed.network import site_events as ev

from .test_real_federation import (
    GUI_SITE,
    accept_plan,
    events,
    federation,
    join,
    point_app_at,
    running,
    wait_left,
)

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_refused_join_then_a_raised_budget_joins_without_touching_files(qtbot, window, tmp_path: Path) -> None:
    fed = federation(tmp_path, rounds=2, fedsgd=True, plan_epsilon=8.0, min_sites=3)  # round 1 waits for all 3
    page, privacy = window.federation_page, window.privacy_page
    with running(fed, {"site2": None, "site3": None}) as agg:
        point_app_at(window, fed, agg.url)
        privacy.set_budget(3.0)
        seen = join(qtbot, window)
        wait_left(qtbot, window, timeout=60_000)
        assert page.dialog is None and "budget is too small" in page.banner.text()
        assert "Privacy page" in page.banner.text() and "site.toml" not in page.banner.text()
        assert not ledger_exists(fed.plan.federation_id, fed.root / GUI_SITE)  # the refusal left nothing behind
        # the operator raises the budget in the app, and joins again
        privacy.set_budget(8.0)
        qtbot.waitUntil(lambda: not window.state.projection_pending, timeout=30_000)
        seen = join(qtbot, window)
        accept_plan(qtbot, window)
        wait_left(qtbot, window, timeout=180_000)
    assert events(seen, ev.Finished)[-1].outcome == "done"
    assert all(GUI_SITE in o.survivors for o in agg.fed.aggregator.outcomes)
    # the accuracy history the Results page showed live is what the site's store gives back after a restart
    from hemafed.gui.app.state import round_history

    federation_id, history = round_history(fed.root / GUI_SITE)
    assert federation_id == fed.plan.federation_id
    assert [(r.round, r.accuracy) for r in history] == [(r.round, r.accuracy) for r in window.state.rounds]
    assert any(r.accuracy is not None for r in history)
    ledger = PrivacyLedger(fed.plan.federation_id, state=fed.root / GUI_SITE)
    assert ledger.budget_epsilon == 8.0 and ledger.rounds == fed.plan.rounds
    assert not page.banner.isVisible()


def test_a_federations_budget_in_the_ledger_can_be_raised_from_the_privacy_page(qtbot, window, tmp_path: Path,
                                                                                 monkeypatch) -> None:
    """A site that already trained in a federation under ε = 3 meets a plan that needs more: the Privacy page
    offers to change that federation's budget, says what it means, and the ledger records the change."""
    from PySide6.QtWidgets import QMessageBox

    state, privacy = window.state, window.privacy_page
    state.state_dir = tmp_path
    ledger = PrivacyLedger("ward-7", 3.0, 1e-5, state=tmp_path)
    ledger.record_round(1, 2.0, 0.1, 1, "h")
    state.refresh_ledgers()
    state.set_plan(replace(state.plan, federation_id="ward-7"), received=True)
    privacy.set_budget(8.0)
    qtbot.waitUntil(lambda: not state.projection_pending and state.projection is not None
                    and state.projection.budget == 8.0, timeout=30_000)
    assert not state.projection.fits and "holds ε = 3" in state.projection.refusal
    button = privacy.change_budget_btn
    assert button.isVisibleTo(privacy) and "from ε = 3 to 8" in button.text()
    asked: list[str] = []

    def answer(parent, title, text, *args):
        asked.append(text)
        return QMessageBox.StandardButton.Yes

    monkeypatch.setattr(QMessageBox, "question", answer)
    button.click()
    assert "never comes back" in asked[0] and "spent ε" in asked[0]
    assert PrivacyLedger("ward-7", state=tmp_path).budget_epsilon == 8.0
    qtbot.waitUntil(lambda: not state.projection_pending and state.projection is not None
                    and state.projection.budget == 8.0 and state.projection.rounds_done == 1, timeout=30_000)
    assert state.projection.refusal is None or "holds ε" not in state.projection.refusal
    assert not button.isVisibleTo(privacy)


def test_an_aggregator_restart_needs_no_click_and_a_changed_plan_is_reviewed_again(qtbot, window,
                                                                                   tmp_path: Path) -> None:
    fed = federation(tmp_path, rounds=4)
    fed.agg_config = replace(fed.agg_config, port=_free_port())  # a restarted aggregator is at the same address
    page = window.federation_page
    with running(fed, {"site2": None, "site3": None}) as agg:
        point_app_at(window, fed, agg.url)
        seen = join(qtbot, window)
        accept_plan(qtbot, window)
        qtbot.waitUntil(lambda: any(e.status == "completed" for e in events(seen, ev.RoundFinished)),
                        timeout=120_000)
    # the aggregator is gone mid-federation; the app keeps trying; the aggregator comes back, same plan
    with running(fed, {"site2": None, "site3": None}):
        wait_left(qtbot, window, timeout=240_000)
    received = events(seen, ev.PlanReceived)
    assert len(received) >= 2 and not received[-1].awaiting_answer  # no second review
    assert events(seen, ev.Finished)[-1].outcome == "done" and page.dialog is None
    ledger = PrivacyLedger(fed.plan.federation_id, state=fed.root / GUI_SITE)
    # a round re-run after the restart is charged twice (a second release), and still the last round fits the
    # budget (round 1 may have started before the app's site was ready: the aggregator waits for min_sites only)
    rounds = [e.round for e in ledger.entries]
    assert set(rounds) <= set(range(1, fed.plan.rounds + 1)) and rounds[-1] == fed.plan.rounds
    assert ledger.spent_epsilon() <= ledger.budget_epsilon
    # a new federation run with a changed plan (another state folder): reviewed again, with what changed
    fed.plan = replace(fed.plan, rounds=5)
    fed.agg_config = replace(fed.agg_config, plan=fed.plan, state_dir=tmp_path / "aggregator-2")
    with running(fed, {"site2": None, "site3": None}) as agg:
        point_app_at(window, fed, agg.url)
        seen = join(qtbot, window)
        qtbot.waitUntil(lambda: page.dialog is not None, timeout=60_000)
        assert "rounds: 4 → 5" in page.dialog.changes.text()
        page.dialog.reject()
        wait_left(qtbot, window, timeout=30_000)


def test_a_federation_that_finished_without_this_site_says_so(qtbot, window, tmp_path: Path) -> None:
    fed = federation(tmp_path, rounds=1)
    fed.agg_config = replace(fed.agg_config, linger_s=60.0)
    page = window.federation_page
    with running(fed, {"site2": None, "site3": None}) as agg:
        qtbot.waitUntil(lambda: bool(agg.fed.aggregator and agg.fed.aggregator.outcomes), timeout=120_000)
        point_app_at(window, fed, agg.url)
        seen = join(qtbot, window)
        wait_left(qtbot, window, timeout=30_000)
        agg.stop()
    assert "has finished" in page.banner.text() and "without this site" in page.banner.text()
    assert events(seen, ev.Finished)[-1].outcome == "failed" and page.worker is None
    assert window.status_fed.text().startswith("stopped: The federation has finished")


def test_the_status_bar_panel_and_banner_agree_in_every_state(qtbot, window) -> None:
    from hemafed.core.rounds.plan import FederationPlan

    page = window.federation_page
    plan = FederationPlan(federation_id="ward-7", rounds=3)
    script = [
        ev.ConnectionChanged("connecting", "wss://agg:8765"),
        ev.SiteFailed("cannot reach the aggregator at wss://agg:8765: nothing answers", False, "", "unreachable"),
        ev.ConnectionChanged("reconnecting", "wss://agg:8765", "nothing answers"),
        ev.ConnectionChanged("connected", "wss://agg:8765"),
        ev.PlanReceived(plan, None, (), (2.0, 5.0, 8.0), awaiting_answer=False),
        ev.PlanAnswered(True),
        ev.StageChanged(0, "preparing"),
        ev.PrepareProgress(40, 100, 30.0),
        ev.RoundWithoutThisSite(1, 3, 4, "preparing"),
        ev.PrepareProgress(100, 100, 0.0),
        ev.StageChanged(0, "waiting"),
        ev.RoundStarted(2, 3, 5),
        ev.StageChanged(2, "training"),
        ev.TrainProgress(2, 1, 1, 0.7),
        ev.StageChanged(2, "masked"),
        ev.RoundFinished(2, "completed", 0.8, 5.0),
        ev.ConnectionChanged("reconnecting", "wss://agg:8765", "connection lost"),
        ev.ConnectionChanged("connected", "wss://agg:8765"),
        ev.RoundStarted(3, 3, 5),
        ev.StageChanged(3, "training"),
        ev.RoundFinished(3, "completed", 0.85, 8.0),
        ev.Finished(None, 2, outcome="done"),
    ]
    for event in script:
        page.on_event(event)
        status = page.status
        assert window.status_fed.text() == status.headline(), event
        assert page.stage.text() == status.words, event
        problem = status.problem is not None
        assert page.banner.isVisibleTo(page) == (problem or bool(status.note)), event
        if problem:
            assert status.problem.message in page.banner.text(), event
        if isinstance(event, ev.ConnectionChanged) and event.state == "connected":
            assert not problem  # whatever was being retried has cleared
    assert window.status_fed.text() == "federation finished: model saved"
    assert page.round_label.text() == "round 3 of 3" and page.epsilon.text().startswith("8 of")
