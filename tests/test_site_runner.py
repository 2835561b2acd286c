"""The site driver's own reactions, without a federation: a send that fails mid-round is
transient, stop() before run(), a broken event consumer, a bad aggregator URL."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
from test_site_round import N_PARAMS, make_plan, outcome, plan_msg, round_start

from hemafed.core.rounds import site_round as sr
from hemafed.core.trust.identity import IdentityKey
from hemafed.network.client import SiteClient
from hemafed.network.config import SiteConfig
from hemafed.network.site import SiteRunner
from hemafed.network.site_events import (
    ConnectionChanged,
    Finished,
    RoundFinished,
    SiteFailed,
    StageChanged,
)

ME = IdentityKey.generate()


def runner(tmp_path: Path, url: str = "wss://127.0.0.1:9", **kw: Any) -> tuple[SiteRunner, list[Any]]:
    events: list[Any] = []
    cfg = SiteConfig(data=tmp_path / "data.npz", state_dir=tmp_path / "state", aggregator=url, epsilon=8.0,
                     federation="fed")
    return SiteRunner(cfg, identity=ME, on_event=kw.pop("on_event", events.append), **kw), events


def test_a_send_that_fails_mid_round_means_reconnect_not_crash(tmp_path: Path) -> None:
    site, events = runner(tmp_path)
    m = site.machine
    m.receive(plan_msg(make_plan()))
    m.prepared(None, n_params=N_PARAMS)
    m.featurized()
    m.receive(round_start(1, {"1": ME.public_line(), "2": IdentityKey.generate().public_line()}))
    actions = m.trained(1, outcome(eps=2.0))
    assert any(isinstance(a, sr.Send) for a in actions)

    async def main() -> str | None:
        site.client = SiteClient(site.cfg.aggregator, ME)  # never connected: the aggregator is gone
        return await site._perform(actions)

    assert asyncio.run(main()) is None  # no exception: the loop will reconnect
    assert site.bytes_sent > 0 and m.phase is sr.Phase.WAIT_PLAN
    assert events[0] == StageChanged(1, "keys")
    lost = [e for e in events if isinstance(e, ConnectionChanged)]
    assert lost and lost[0].state == "reconnecting"
    (left,) = [e for e in events if isinstance(e, RoundFinished)]
    assert left.status == "left" and "connection lost" in left.detail and left.epsilon_spent == 2.0


def test_stop_before_run_returns_at_once(tmp_path: Path) -> None:
    site, events = runner(tmp_path)
    site.stop_threadsafe()
    assert asyncio.run(asyncio.wait_for(site.run(), 5)) is None
    assert events == [Finished(None, 0, outcome="stopped")]
    assert not site.answer_plan(True)  # nothing is waiting for an answer


def test_a_broken_event_consumer_does_not_stop_the_driver(tmp_path: Path) -> None:
    seen: list[Any] = []

    def consumer(event: Any) -> None:
        seen.append(event)
        raise RuntimeError("a bug in the UI")

    site, _ = runner(tmp_path, on_event=consumer)
    site.stop()
    asyncio.run(site.run())
    assert seen == [Finished(None, 0, outcome="stopped")]


def test_a_bad_aggregator_url_is_a_fatal_error_in_words(tmp_path: Path) -> None:
    site, events = runner(tmp_path, url="http://example.org")
    assert asyncio.run(site.run()) is None
    failed, finished = events
    assert isinstance(failed, SiteFailed) and failed.fatal and "wss://" in failed.message
    assert "site.toml" in failed.what_to_do and finished.outcome == "failed"


def test_progress_is_handed_to_the_loop_thread(tmp_path: Path) -> None:
    import threading

    from hemafed.network.site_events import TrainProgress

    site, events = runner(tmp_path)
    threads: list[int] = []

    async def main() -> None:
        site._loop = asyncio.get_running_loop()
        site.on_event = lambda e: (events.append(e), threads.append(threading.get_ident()))
        worker = threading.Thread(target=lambda: [site._progress(TrainProgress(1, s, 50, 0.5)) for s in range(1, 51)])
        worker.start()
        await asyncio.to_thread(worker.join)
        await asyncio.sleep(0.05)

    asyncio.run(main())
    steps = [e.step for e in events]
    assert steps[-1] == 50 and steps == sorted(steps) and len(steps) < 50  # throttled, the last step always
    assert set(threads) == {threading.main_thread().ident}
    assert np.all(np.diff(steps) > 0)
