"""Whole federations over real loopback websockets with TLS, in one process."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from fedharness import SimulatedCrash, make_federation, run, weighted_mean

from hemafed.core.learning.checkpoints import CheckpointStore
from hemafed.core.privacy.ledger import PrivacyLedger
from hemafed.core.secagg.quantize import error_bound
from hemafed.network.aggregator import Aggregator

pytestmark = pytest.mark.slow


def _site_weights(fed, names) -> dict[str, int]:
    return {s: len(fed.runners[s].data.train_labels) for s in names}


def test_three_sites_two_rounds_aggregate_matches_plain_average(tmp_path: Path) -> None:
    fed = make_federation(tmp_path, n_sites=3, threshold=2, rounds=2)

    async def main() -> None:
        agg_task = await fed.start_aggregator()
        sites = [fed.start_site(n) for n in fed.site_configs]
        await agg_task
        paths = await asyncio.gather(*sites)
        assert all(p is not None and p.exists() for p in paths)

    run(main())
    agg = fed.aggregator
    assert [o.status for o in agg.outcomes] == ["completed", "completed"]
    # round 2's updates are still in the runners: check the secure sum against the plain average
    last = agg.outcomes[-1]
    names = list(fed.site_configs)
    updates = {s: fed.runners[s].last_outcome.update for s in names}
    expected = weighted_mean(updates, _site_weights(fed, names), fed.plan.update_clip)
    cfg = fed.plan.secagg_config(len(expected))
    bound = error_bound(cfg, 3) / sum(_site_weights(fed, names).values())
    assert np.abs(last.mean_update - expected).max() <= bound + 1e-6
    assert np.abs(expected).max() > 100 * bound  # the comparison is not trivially satisfied
    # the aggregate of validation counts is the sum of every site's confusion matrix
    assert sum(map(sum, last.confusion)) == sum(len(fed.runners[s].data.val_labels) for s in names)
    # every site spent exactly two rounds, recorded in its ledger
    for s in names:
        ledger = PrivacyLedger("test-fed", state=fed.site_configs[s].state_dir)
        assert [e.round for e in ledger.entries] == [1, 2]
        assert 0 < ledger.spent_epsilon() <= 30.0
    # checkpoints: initial + one per round; the final model went to every site
    assert CheckpointStore(fed.agg_config.state_dir / "checkpoints").rounds() == [0, 1, 2]


def test_dropouts_during_masked_input_and_unmasking(tmp_path: Path) -> None:
    fed = make_federation(tmp_path, n_sites=5, threshold=3, rounds=2)

    async def main() -> None:
        agg_task = await fed.start_aggregator()
        tasks = {n: fed.start_site(n, die_at={"site4": (1, "masked"), "site5": (1, "unmask")}.get(n))
                 for n in fed.site_configs}
        await agg_task
        for name in ("site4", "site5"):
            with pytest.raises(SimulatedCrash):
                await tasks[name]
        for name in ("site1", "site2", "site3"):
            assert await tasks[name] is not None

    run(main())
    first, second = fed.aggregator.outcomes
    assert first.status == "completed"
    # site5 died after its masked input was summed: it counts; site4 died before sending it
    assert first.survivors == ["site1", "site2", "site3", "site5"]
    assert first.dropouts == ["site4"]
    assert second.status == "completed" and second.participants == ["site1", "site2", "site3"]


def test_below_threshold_round_is_abandoned_and_the_next_proceeds(tmp_path: Path) -> None:
    fed = make_federation(tmp_path, n_sites=3, threshold=2, rounds=2)

    async def main() -> None:
        agg_task = await fed.start_aggregator()
        tasks = {n: fed.start_site(n, die_at=(1, "keys") if n != "site1" else None) for n in fed.site_configs}
        for name in ("site2", "site3"):
            with pytest.raises(SimulatedCrash):
                await tasks[name]
            fed.start_site(name)  # the hospital restarts its app; it joins the next round
        await agg_task

    run(main())
    first, second = fed.aggregator.outcomes
    assert first.status == "abandoned" and "threshold" in first.reason
    # round 2 starts as soon as min_sites (= t = 2) are back; a late restart joins after that
    assert second.status == "completed" and "site1" in second.survivors and len(second.survivors) >= 2
    store = CheckpointStore(fed.agg_config.state_dir / "checkpoints")
    assert np.array_equal(store.load(1).weights, store.load(0).weights)  # abandoned: model unchanged
    assert not np.array_equal(store.load(2).weights, store.load(1).weights)
    # the crashed sites trained round 1 before dying: the spend stays in their ledgers
    for name in ("site2", "site3"):
        ledger = PrivacyLedger("test-fed", state=fed.site_configs[name].state_dir)
        assert ledger.entries[0].round == 1 and ledger.spent_epsilon() > 0


class CrashAfterRoundOne(Aggregator):
    async def _finish_round(self, outcome) -> None:
        await super()._finish_round(outcome)
        if outcome.round == 1:
            raise SimulatedCrash


def test_aggregator_restart_resumes_without_double_counting(tmp_path: Path) -> None:
    fed = make_federation(tmp_path, n_sites=3, threshold=2, rounds=3)

    async def main() -> None:
        agg_task = await fed.start_aggregator(CrashAfterRoundOne)
        port = fed.aggregator.server.port
        sites = [fed.start_site(n) for n in fed.site_configs]
        with pytest.raises(SimulatedCrash):
            await agg_task
        assert [o.round for o in fed.aggregator.outcomes] == [1]
        agg_task = await fed.start_aggregator(port=port)  # same address: the sites reconnect by themselves
        await agg_task
        await asyncio.gather(*sites)

    run(main())
    assert [o.round for o in fed.aggregator.outcomes] == [2, 3]  # resumed, round 1 not re-run
    log = CheckpointStore(fed.agg_config.state_dir / "checkpoints").read_log()
    assert [e["round"] for e in log] == [1, 2, 3]
    for name, cfg in fed.site_configs.items():
        ledger = PrivacyLedger("test-fed", state=cfg.state_dir)
        assert [e.round for e in ledger.entries] == [1, 2, 3], name
