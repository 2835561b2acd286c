"""DP-FedSGD end to end over real TLS websockets: each site sends one clipped gradient sum per round with its
share of Skellam noise inside secure aggregation; the aggregator decodes the unmasked sum and steps. Every
site's ledger records each round with the distributed-DP protection, and the ε it holds is the ε the plan
promised; a site whose bounds require local DP refuses the plan."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from fedharness import make_federation, run

from hemafed.core.learning.checkpoints import CheckpointStore
from hemafed.core.learning.fedsgd import site_privacy
from hemafed.core.learning.models import build_model
from hemafed.core.privacy.accounting import Accountant
from hemafed.core.privacy.ledger import PrivacyLedger, ledger_exists
from hemafed.core.rounds.plan import SiteBounds
from hemafed.network.site_events import Finished, PlanAnswered

pytestmark = pytest.mark.slow

ROUNDS, Q, EPSILON = 3, 0.3, 30.0


def fedsgd_federation(tmp_path: Path, model: str = "scatter_linear_28"):
    from hemafed.core.learning.recipe import with_budget

    fed = make_federation(tmp_path, n_sites=3, threshold=2, rounds=ROUNDS, images_per_site=48,
                          model=model, algorithm="fedsgd", sample_rate=Q, server_lr=0.5, noise_multiplier=1.0)
    dim = sum(p.numel() for p in build_model(model).parameters())
    plan = with_budget(replace(fed.plan, batch_size=round(Q * 3 * 43)), EPSILON, "distributed", dim)
    fed.plan = plan
    fed.agg_config = replace(fed.agg_config, plan=plan)
    return fed, dim


def test_distributed_dp_fedsgd_rounds_complete_and_ledgers_agree_with_the_plan(tmp_path: Path) -> None:
    fed, dim = fedsgd_federation(tmp_path)

    async def main() -> None:
        agg = await fed.start_aggregator()
        sites = [fed.start_site(n) for n in fed.site_configs]
        await agg
        await asyncio.wait_for(asyncio.gather(*sites), 60)

    run(main(), timeout=300)
    store = CheckpointStore(fed.agg_config.state_dir / "checkpoints")
    assert [e["status"] for e in store.read_log()] == ["completed"] * ROUNDS
    assert not np.array_equal(store.load(0).weights, store.load(ROUNDS).weights)
    assert set(store.load(ROUNDS).optimizer_state) == {"velocity"}  # the server's momentum is checkpointed
    privacy = site_privacy(fed.plan, fed.plan.secagg_config(dim))
    for name, cfg in fed.site_configs.items():
        ledger = PrivacyLedger(fed.plan.federation_id, state=cfg.state_dir)
        assert [e.round for e in ledger.entries] == list(range(1, ROUNDS + 1)), name
        for e in ledger.entries:
            assert (e.dp_mode, e.mechanism, e.threshold) == ("distributed", "skellam", 2)
            assert e.sigma == pytest.approx(fed.plan.noise_multiplier) and e.sample_rate == Q and e.steps == 1
        promised = Accountant(ledger.kind).projected_epsilon(privacy.sigma, Q, ROUNDS, ledger.delta,
                                                             skellam=privacy.skellam)
        assert ledger.spent_epsilon() == pytest.approx(promised, rel=1e-9)
        assert ledger.spent_epsilon() <= EPSILON
    assert all(r.final_path is not None for r in fed.runners.values())
    from hemafed.core.learning.classify import load_model_file

    # the federation's calibration temperature reaches every site; ~5 validation images a site are too few for
    # an "uncertain" threshold, so the files carry the temperature alone
    cals = [load_model_file(r.final_path).calibration for r in fed.runners.values()]
    assert len({c.temperature for c in cals}) == 1 and all(c.threshold is None for c in cals)
    assert all("federation" in c.temperature_from for c in cals)


def test_a_site_requiring_local_dp_refuses_a_distributed_plan(tmp_path: Path) -> None:
    fed, _ = fedsgd_federation(tmp_path)
    name = "site1"
    fed.site_configs[name] = replace(fed.site_configs[name], bounds=SiteBounds(require_local_dp=True))
    events: list[object] = []

    async def main() -> None:
        agg = await fed.start_aggregator()
        task = fed.start_site(name)
        fed.runners[name].on_event = events.append
        await asyncio.wait_for(task, 60)
        agg.cancel()
        with pytest.raises(asyncio.CancelledError):
            await agg

    run(main(), timeout=120)
    answered = [e for e in events if isinstance(e, PlanAnswered)]
    assert answered and not answered[0].accepted
    assert any("requires local DP" in r for r in answered[0].reasons), answered
    assert isinstance(events[-1], Finished) and events[-1].model_path is None
    assert not ledger_exists(fed.plan.federation_id, fed.site_configs[name].state_dir)  # nothing spent


def test_centred_head_first_round_sets_only_the_center_then_training_keeps_it(tmp_path: Path) -> None:
    """scatter_synth_inv_28 over real TLS: round 1's masked, noised sum sets the feature center (W and b
    unchanged); later rounds move W and b and leave the center; every round is in the ledger alike."""
    from hemafed.core.learning.fedsgd import center_layout
    from hemafed.core.learning.models import split_features

    fed, dim = fedsgd_federation(tmp_path, "scatter_synth_inv_28")

    async def main() -> None:
        agg = await fed.start_aggregator()
        sites = [fed.start_site(n) for n in fed.site_configs]
        await agg
        await asyncio.wait_for(asyncio.gather(*sites), 120)

    run(main(), timeout=300)
    where, _ = center_layout(split_features(build_model("scatter_synth_inv_28"))[1])
    store = CheckpointStore(fed.agg_config.state_dir / "checkpoints")
    assert [e["status"] for e in store.read_log()] == ["completed"] * ROUNDS
    w0, w1, w_end = (store.load(r).weights for r in (0, 1, ROUNDS))
    rest = np.ones(dim, bool)
    rest[where] = False
    assert not w0[where].any() and np.all(np.isfinite(w1[where])) and np.abs(w1[where]).sum() > 0
    np.testing.assert_array_equal(w1[rest], w0[rest])
    np.testing.assert_array_equal(w_end[where], w1[where])
    assert not np.array_equal(w_end[rest], w1[rest])
    for name, cfg in fed.site_configs.items():
        ledger = PrivacyLedger(fed.plan.federation_id, state=cfg.state_dir)
        assert [e.round for e in ledger.entries] == list(range(1, ROUNDS + 1)), name
        assert len({(e.sigma, e.sample_rate, e.steps) for e in ledger.entries}) == 1
