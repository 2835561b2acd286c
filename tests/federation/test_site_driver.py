"""The site driver against a real aggregator over loopback TLS websockets: stop() in the
middle of training, an unknown key, the aggregator dying mid-round, and the order and
thread of the events the app relies on."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fedharness import make_federation, run

from hemafed.core.privacy.ledger import PrivacyLedger, ledger_exists
from hemafed.core.trust.certs import create_federation_certs
from hemafed.core.trust.identity import IdentityKey, init_identity
from hemafed.network import site as site_module
from hemafed.network.client import Backoff, SiteClient
from hemafed.network.config import render_toml
from hemafed.network.site import SiteRunner
from hemafed.network.site_events import (
    ConnectionChanged,
    Finished,
    PlanAnswered,
    PlanReceived,
    RoundFinished,
    RoundStarted,
    SiteFailed,
    StageChanged,
    TrainProgress,
)

pytestmark = pytest.mark.slow


class Recorder:
    """Collects a runner's events with the thread each arrived on."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.threads: set[int] = set()

    def __call__(self, event: Any) -> None:
        self.events.append(event)
        self.threads.add(threading.get_ident())

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


def check_order(events: list[Any]) -> None:
    """What the app relies on: a connection first, Finished last and once, a plan answer
    after the plan, training progress only while training, one RoundFinished per round start."""
    assert isinstance(events[0], ConnectionChanged) and events[0].state == "connecting"
    assert isinstance(events[-1], Finished) and sum(isinstance(e, Finished) for e in events) == 1
    kinds = [type(e) for e in events]
    if PlanAnswered in kinds:
        assert kinds.index(PlanReceived) < kinds.index(PlanAnswered)
    stage = None
    open_rounds: list[int] = []
    for e in events:
        if isinstance(e, StageChanged):
            stage = e.stage
        elif isinstance(e, TrainProgress):
            assert stage == "training" and open_rounds and e.round == open_rounds[-1]
            assert 1 <= e.step <= e.total
        elif isinstance(e, RoundStarted):
            assert not open_rounds, "a round started before the last one finished"
            open_rounds.append(e.round)
        elif isinstance(e, RoundFinished):
            assert open_rounds == [e.round]
            open_rounds.clear()


def test_stop_during_training_leaves_cleanly_and_records_nothing(tmp_path: Path) -> None:
    # enough local steps that stop() lands in the middle of training
    fed = make_federation(tmp_path, n_sites=3, threshold=2, rounds=1, images_per_site=128, local_epochs=4,
                          batch_size=8)
    rec = Recorder()
    timing: dict[str, float] = {}

    async def main() -> None:
        agg_task = await fed.start_aggregator()
        loop_thread = threading.get_ident()
        stopper: SiteRunner | None = None

        def on_event(event: Any) -> None:
            rec(event)
            if isinstance(event, TrainProgress) and "stop" not in timing:
                timing["stop"] = time.monotonic()
                assert stopper is not None
                stopper.stop()

        cfg = replace(fed.site_configs["site1"], aggregator=fed.url)
        stopper = SiteRunner(cfg, identity=fed.identities["site1"], on_event=on_event)
        stopped = asyncio.create_task(stopper.run())
        others = [fed.start_site(n) for n in ("site2", "site3")]
        assert await asyncio.wait_for(stopped, 60) is None
        timing["returned"] = time.monotonic()
        await agg_task
        assert all(p is not None for p in await asyncio.gather(*others))
        assert rec.threads == {loop_thread}

    run(main())
    assert timing["returned"] - timing["stop"] < 5.0
    (outcome,) = fed.aggregator.outcomes
    assert outcome.status == "completed" and outcome.dropouts == ["site1"]
    assert outcome.survivors == ["site2", "site3"]
    assert PrivacyLedger("test-fed", state=fed.site_configs["site1"].state_dir).entries == []
    assert [e.round for e in PrivacyLedger("test-fed", state=fed.site_configs["site2"].state_dir).entries] == [1]
    (left,) = rec.of(RoundFinished)
    assert left.round == 1 and left.status == "left" and "nothing recorded" in left.detail
    assert rec.events[-1] == Finished(None, 0, outcome="stopped")
    assert rec.of(ConnectionChanged)[-1].state == "disconnected"
    assert rec.of(TrainProgress)[-1].step < rec.of(TrainProgress)[-1].total
    check_order(rec.events)


class CountingClient(SiteClient):
    attempts = 0

    async def _attempt(self):  # type: ignore[override]
        CountingClient.attempts += 1
        return await super()._attempt()


def test_an_unknown_key_stops_after_one_refusal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fed = make_federation(tmp_path, n_sites=2, threshold=2, rounds=1, join_timeout_s=30.0)
    monkeypatch.setattr(site_module, "SiteClient", CountingClient)
    stranger = IdentityKey.generate()
    rec = Recorder()

    async def main() -> float:
        agg_task = await fed.start_aggregator()
        runner = SiteRunner(replace(fed.site_configs["site1"], aggregator=fed.url), identity=stranger,
                            on_event=rec)
        started = time.monotonic()
        assert await asyncio.wait_for(runner.run(), 30) is None
        took = time.monotonic() - started
        agg_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await agg_task
        return took

    took = run(main())
    assert CountingClient.attempts == 1 and took < 10
    (failed,) = rec.of(SiteFailed)
    assert failed.fatal and "not in the federation's allowed list" in failed.message
    assert stranger.fingerprint in failed.what_to_do and "admin" in failed.what_to_do
    assert rec.events[-1] == Finished(None, 0, outcome="failed")
    assert "\n" not in failed.message
    check_order(rec.events)


def test_sites_survive_the_aggregator_dying_mid_round(tmp_path: Path) -> None:
    # a long join time-out: the restarted aggregator's first round waits for all three reconnecting sites
    # (it starts as soon as they are in); with 5 s, a loaded CI machine once began it with two
    fed = make_federation(tmp_path, n_sites=3, threshold=2, rounds=1, join_timeout_s=60.0)
    recs = {name: Recorder() for name in fed.site_configs}

    async def main() -> None:
        agg_task = await fed.start_aggregator()
        port = fed.aggregator.server.port
        killed = asyncio.Event()

        def watch(name: str):
            def on_event(event: Any) -> None:
                recs[name](event)
                if isinstance(event, StageChanged) and event.stage == "masked" and not killed.is_set():
                    killed.set()
                    agg_task.cancel()  # the aggregator dies: its server closes every connection
            return on_event

        runners = {}
        for name, cfg in fed.site_configs.items():
            runners[name] = SiteRunner(replace(cfg, aggregator=fed.url), identity=fed.identities[name],
                                       on_event=watch(name))
            runners[name].backoff = Backoff(initial=0.2, max_delay=1.0, retry_for=60)
        tasks = [asyncio.create_task(r.run()) for r in runners.values()]
        await asyncio.wait_for(killed.wait(), 120)
        with contextlib.suppress(asyncio.CancelledError):
            await agg_task
        await asyncio.sleep(1.0)  # the sites notice and start reconnecting to nothing
        assert not any(t.done() for t in tasks)
        agg_task = await fed.start_aggregator(port=port)
        await asyncio.wait_for(agg_task, 120)
        paths = await asyncio.wait_for(asyncio.gather(*tasks), 30)
        assert all(p is not None and p.exists() for p in paths)

    run(main())
    (outcome,) = fed.aggregator.outcomes  # the restarted aggregator re-ran round 1
    assert outcome.status == "completed" and len(outcome.survivors) == 3
    for name, rec in recs.items():
        states = [e.state for e in rec.of(ConnectionChanged)]
        assert states[:2] == ["connecting", "connected"] and "reconnecting" in states
        assert states.count("connected") == 2 and states[-1] == "disconnected"
        finished = rec.of(RoundFinished)
        assert [(e.round, e.status) for e in finished] == [(1, "left"), (1, "completed")], name
        assert "connection lost" in finished[0].detail
        assert not any(e.fatal for e in rec.of(SiteFailed))
        assert rec.events[-1].outcome == "done" and rec.events[-1].rounds_trained == 2
        # round 1 was trained twice: both spends are in the ledger, nothing under-reported
        ledger = PrivacyLedger("test-fed", state=fed.site_configs[name].state_dir)
        assert [e.round for e in ledger.entries] == [1, 1]
        assert finished[-1].epsilon_spent == pytest.approx(ledger.spent_epsilon())
        check_order(rec.events)


def test_the_operator_answers_the_plan_from_another_thread(tmp_path: Path) -> None:
    fed = make_federation(tmp_path, n_sites=2, threshold=2, rounds=1)
    rec = Recorder()

    async def main() -> None:
        agg_task = await fed.start_aggregator()
        runner: SiteRunner | None = None

        def on_event(event: Any) -> None:
            rec(event)
            if isinstance(event, PlanReceived) and event.awaiting_answer:
                # a GUI thread clicks "Accept" a moment later
                threading.Timer(0.3, runner.answer_plan_threadsafe, args=(True,)).start()

        runner = SiteRunner(replace(fed.site_configs["site1"], aggregator=fed.url), identity=fed.identities["site1"],
                            on_event=on_event, auto_accept=False)
        tasks = [asyncio.create_task(runner.run()), fed.start_site("site2")]
        await agg_task
        assert all(p is not None for p in await asyncio.gather(*tasks))

    run(main())
    received = rec.of(PlanReceived)[0]
    assert received.awaiting_answer and received.privacy is not None and received.problems == ()
    assert len(received.epsilon_per_round) == 1 and 0 < received.epsilon_per_round[0] <= 30.0
    assert rec.of(PlanAnswered) == [PlanAnswered(True)]
    (done,) = rec.of(RoundFinished)
    assert done.status == "completed" and done.accuracy is not None and 0 <= done.accuracy <= 1
    ledger = PrivacyLedger("test-fed", state=fed.site_configs["site1"].state_dir)
    assert done.epsilon_spent == pytest.approx(ledger.spent_epsilon())
    stages = [e.stage for e in rec.of(StageChanged) if e.round == 1]
    assert stages == ["training", "keys", "shares", "masked", "unmask", "waiting"]
    assert rec.of(TrainProgress)[-1].step == rec.of(TrainProgress)[-1].total
    check_order(rec.events)


def test_hemafed_site_explains_fatal_errors_without_a_traceback(tmp_path: Path) -> None:
    """The headless command, as an operator runs it: an unknown key and a certificate from
    another CA each end in one line saying what to do, and a non-zero exit."""
    fed = make_federation(tmp_path, n_sites=2, threshold=2, rounds=1, join_timeout_s=60.0)
    stranger = init_identity(tmp_path / "stranger")
    rogue_ca = create_federation_certs(tmp_path / "rogue", ["127.0.0.1"]).ca_file
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    agg_task = asyncio.run_coroutine_threadsafe(fed.start_aggregator(), loop).result(60)
    try:
        def site(name: str, state: Path, ca: Path) -> subprocess.CompletedProcess[str]:
            cfg = fed.site_configs["site1"]
            toml = tmp_path / f"{name}.toml"
            toml.write_text(render_toml({"site": {
                "data": str(cfg.data), "state_dir": str(state), "aggregator": fed.url, "epsilon": 30.0,
                "federation": "test-fed", "ca_file": str(ca)}}))
            return subprocess.run([sys.executable, "-m", "hemafed.gui.cli", "site", "--config", str(toml)],
                                  capture_output=True, text=True, timeout=120)

        unknown = site("stranger", tmp_path / "stranger", fed.ca)
        wrong_ca = site("rogue", fed.site_configs["site1"].state_dir, rogue_ca)
    finally:
        async def shutdown() -> None:
            agg_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await agg_task

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()
    for result in (unknown, wrong_ca):
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr
    assert "not in the federation's allowed list" in unknown.stderr
    assert f"confirm its fingerprint {stranger.fingerprint} by phone" in unknown.stderr
    assert unknown.stderr.count("connecting wss://") == 1  # no retry loop
    assert "certificate not trusted" in wrong_ca.stderr and "ca.pem" in wrong_ca.stderr


def test_a_site_that_connects_after_the_end_hears_so_and_stops_trying(tmp_path: Path) -> None:
    """The aggregator lingers after its last round: a latecomer is told the federation finished (without it)
    and its run ends, instead of retrying an address where nobody answers."""
    fed = make_federation(tmp_path, n_sites=3, threshold=2, rounds=1)  # site3 stays away until the end
    fed.agg_config = replace(fed.agg_config, linger_s=30.0)
    rec = Recorder()

    async def main() -> None:
        agg_task = await fed.start_aggregator()
        sites = [fed.start_site(n) for n in ("site1", "site2")]
        assert all(p is not None for p in await asyncio.wait_for(asyncio.gather(*sites), 120))
        cfg = replace(fed.site_configs["site3"], aggregator=fed.url)
        late = SiteRunner(cfg, identity=fed.identities["site3"], on_event=rec)
        started = time.monotonic()
        assert await asyncio.wait_for(late.run(), 30) is None
        assert time.monotonic() - started < 10
        agg_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await agg_task

    run(main())
    (failed,) = rec.of(SiteFailed)
    assert failed.fatal and "has finished" in failed.message and "without this site" in failed.message
    assert rec.events[-1].outcome == "failed"
    assert not ledger_exists("test-fed", fed.site_configs["site3"].state_dir)
