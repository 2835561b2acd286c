from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hemafed.core.learning.checkpoints import Checkpoint, CheckpointStore
from hemafed.core.learning.server_opt import FedAdam, FedAvg, make_server_optimizer
from hemafed.core.rounds.plan import FederationPlan, PlanError, SiteBounds


def test_plan_round_trips_and_refuses_unknown_or_mistyped_fields() -> None:
    plan = FederationPlan(rounds=3, threshold=3, min_sites=3)
    again = FederationPlan.from_dict(plan.to_dict())
    assert again == plan and again.digest() == plan.digest()
    with pytest.raises(PlanError, match="unknown plan fields: code"):
        FederationPlan.from_dict({**plan.to_dict(), "code": "import os"})
    with pytest.raises(PlanError, match="rounds must be int"):
        FederationPlan.from_dict({**plan.to_dict(), "rounds": "10"})
    with pytest.raises(PlanError, match="rounds must be int"):
        FederationPlan.from_dict({**plan.to_dict(), "rounds": True})
    assert FederationPlan.from_dict({**plan.to_dict(), "lr": 1}).lr == 1.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"threshold": 1}, "threshold"),
        ({"min_sites": 2, "threshold": 3}, "min_sites"),
        ({"delta": 0.0}, "delta"),
        ({"federation_id": "../etc"}, "federation_id"),
        ({"server_optimizer": "sgd"}, "server_optimizer"),
        ({"clip_norm": -1.0}, "clip_norm"),
    ],
)
def test_inconsistent_plans_are_refused(change: dict, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        FederationPlan(**change)


def test_site_bounds_list_every_violation() -> None:
    plan = FederationPlan(dp=False, secagg=False, rounds=1500, delta=1e-3, model="big", algorithm="fedavg",
                          dp_mode="local")
    bounds = SiteBounds(models=("resnet_gn_28",))
    found = bounds.violations(plan)
    assert len(found) == 5
    assert SiteBounds(require_dp=False, require_secagg=False, max_rounds=2000, max_delta=1e-2).violations(
        plan) == []
    assert SiteBounds().violations(FederationPlan()) == []


def test_the_default_plan_is_the_recommended_recipe() -> None:
    from hemafed.core.learning.recipe import recommended_plan

    assert FederationPlan() == recommended_plan(8.0, 11_959, 10, federation_id="bloodmnist-demo")


def test_fedavg_and_fedadam_steps() -> None:
    w = np.zeros(4, np.float32)
    d = np.array([1, -1, 0.5, 0], np.float32)
    assert np.allclose(FedAvg(0.5).step(w, d), 0.5 * d)
    adam = FedAdam(lr=0.1)
    w1 = adam.step(w, d)
    assert np.all(np.sign(w1[:3]) == np.sign(d[:3])) and w1[3] == 0
    restored = make_server_optimizer("fedadam", 0.1)
    restored.load_state(adam.state())
    assert np.allclose(restored.step(w1, d), adam.step(w1, d))


def test_checkpoint_store_resumes_from_latest_good(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    assert store.latest() is None
    for rnd in range(3):
        store.save(Checkpoint(rnd, np.full(5, rnd, np.float32), {"m": np.ones(5)}, {"plan": "x"}))
        store.append_log({"round": rnd, "status": "completed"})
    (tmp_path / "round_0002.npz").write_bytes(b"garbage")
    latest = store.latest()
    assert latest is not None and latest.round == 1 and latest.weights[0] == 1
    assert np.array_equal(latest.optimizer_state["m"], np.ones(5))
    with open(store.log_path, "a") as fh:
        fh.write('{"round": 3, "sta')  # a crash mid-append
    assert [e["round"] for e in store.read_log()] == [0, 1, 2]


def test_a_fedsgd_plan_without_dp_or_secure_aggregation_is_refused_with_the_alternative() -> None:
    for off in ({"dp": False}, {"secagg": False}):
        with pytest.raises(PlanError, match="baseline uses algorithm 'fedavg'"):
            FederationPlan(algorithm="fedsgd", sample_rate=0.1, **off)


def test_a_simulation_keeps_back_the_validation_share_its_options_give(shared_data) -> None:
    """`SimulationOptions.val_fraction` reaches the plan, every hospital's split, and the plan's expected batch (the
    research screens vary it: accuracy-levers.md, eighteenth pass)."""
    from hemafed.network.sim.simulate import SimulationOptions, hospitals

    kept = {}
    for share in (0.1, 0.05):
        h = hospitals(SimulationOptions(data=shared_data, subset=2000, test_subset=20, val_fraction=share))
        assert h.plan.val_fraction == share
        data = h.site_data().values()
        val, train = sum(len(d.val_labels) for d in data), sum(len(d.train_labels) for d in data)
        assert val + train == 2000 and abs(val / 2000 - share) < 0.02
        assert h.plan.batch_size == round(h.plan.sample_rate * train)
        kept[share] = val
    assert kept[0.05] < kept[0.1]
