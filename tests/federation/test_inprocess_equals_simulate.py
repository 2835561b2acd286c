"""The experiment runs the product: a seeded federation gives bit for bit the same model in process
(`network.sim.inprocess`, the machines and trainers without sockets) and as a real `hemafed simulate`
(an aggregator and hospitals as processes over TLS websockets)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hemafed.core.learning.checkpoints import CheckpointStore
from hemafed.network.sim.inprocess import simulate_in_process
from hemafed.network.sim.simulate import Simulation, SimulationOptions

pytestmark = [pytest.mark.slow, pytest.mark.realdata]

ROUNDS = 4


def test_a_seeded_run_gives_the_same_model_in_process_and_as_a_real_federation(shared_data: Path,
                                                                                 tmp_path: Path) -> None:
    opts = SimulationOptions(sites=3, rounds=ROUNDS, subset=240, test_subset=60, data=shared_data, seed=3,
                             out=tmp_path / "sim", quiet=True, eval_every=ROUNDS)
    weights: dict[int, np.ndarray] = {}
    result, h = simulate_in_process(opts, tmp_path / "inprocess",  # computes the features, into the cache
                                    on_round=lambda outcome, w: weights.__setitem__(outcome.round, w.copy()))
    assert [o.status for o in result.outcomes] == ["completed"] * ROUNDS
    assert all(len(o.survivors) == 3 for o in result.outcomes)

    metrics = Simulation(opts).run()  # the same images: the sites read their features back from the cache
    assert metrics["final"]["rounds_with_every_site"] == ROUNDS and not metrics["missed_rounds"]
    real = CheckpointStore(opts.out / "federation" / "state" / "checkpoints")
    for rnd in range(1, ROUNDS + 1):  # every round's model, not only the last
        np.testing.assert_array_equal(weights[rnd], real.load(rnd).weights)
    np.testing.assert_array_equal(result.weights, real.load(ROUNDS).weights)
    # and every site spent exactly the same, round by round
    from hemafed.core.privacy.ledger import PrivacyLedger

    for i, (name, ledger) in enumerate(sorted(result.ledgers.items()), start=1):
        site = PrivacyLedger(h.plan.federation_id, state=opts.out / "sites" / name / "state")
        assert [e.epsilon for e in site.entries] == [e.epsilon for e in ledger.entries], (i, name)
        assert [e.model_hash for e in site.entries] == [e.model_hash for e in ledger.entries]
    # the federation's calibration: the temperature whose summed validation NLL (every site's, under the model
    # the last round started from) is lowest, in process and in the real federation, in every model file
    from hemafed.core.learning.classify import load_model_file
    from hemafed.core.learning.models import build_model, set_flat_params, split_features
    from hemafed.core.learning.site_trainer import model_inputs
    from hemafed.core.rounds.calibration_sums import CALIBRATION_GRID, nll_sums

    model = build_model(h.plan.model, len(h.plan.classes))
    head = split_features(model)[1]
    set_flat_params(head, weights[ROUNDS - 1])
    total = np.zeros(len(CALIBRATION_GRID), np.int64)
    for data in h.site_data().values():
        with torch.no_grad():
            total += nll_sums(head(model_inputs(h.plan, model, data.val_images, "eval")).double().numpy(),
                              data.val_labels)
    assert result.temperature == CALIBRATION_GRID[int(np.argmin(total))]
    assert load_model_file(opts.out / "final_model.npz").calibration.temperature == result.temperature
    from hemafed.core.learning.class_offsets import MIN_IMAGES as OFFSETS_MIN_IMAGES

    for name in result.ledgers:
        final = opts.out / "sites" / name / "state" / "models" / h.plan.federation_id / "final.npz"
        cal = load_model_file(final).calibration
        assert cal.temperature == result.temperature and "federation" in cal.temperature_from
        # a site re-fits its class offsets only with enough validation images (these have a handful)
        assert (cal.offsets_loss_released is not None) == (cal.images >= OFFSETS_MIN_IMAGES), name
