"""The aggregator's resource caps in federation.toml: defaults, values, and refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from hemafed.core.rounds.plan import FederationPlan, PlanError
from hemafed.core.trust.identity import IdentityKey
from hemafed.network.config import AggregatorConfig, render_toml


def _write(tmp_path: Path, **federation: object) -> Path:
    path = tmp_path / "federation.toml"
    path.write_text(render_toml({"federation": {"insecure": True, **federation},
                                 "plan": FederationPlan(threshold=2, min_sites=2).to_dict(),
                                 "sites": {"a": IdentityKey.generate().public_line()}}))
    return path


def test_caps_default_and_can_be_set(tmp_path: Path) -> None:
    cfg = AggregatorConfig.load(_write(tmp_path))
    assert cfg.server_options() == {"max_unauthenticated": 256, "max_unauthenticated_per_address": 32,
                                    "send_timeout": 60.0}
    cfg = AggregatorConfig.load(_write(tmp_path, max_unauthenticated=64, max_unauthenticated_per_address=4,
                                       send_timeout_s=5))
    assert cfg.server_options() == {"max_unauthenticated": 64, "max_unauthenticated_per_address": 4,
                                    "send_timeout": 5.0}


@pytest.mark.parametrize("field,value", [("max_unauthenticated", 0), ("max_unauthenticated_per_address", -1),
                                         ("send_timeout_s", "fast"), ("max_unauthenticated", True)])
def test_bad_caps_are_refused_with_the_field_named(tmp_path: Path, field: str, value: object) -> None:
    with pytest.raises(PlanError, match=field):
        AggregatorConfig.load(_write(tmp_path, **{field: value}))


def _write_plan(tmp_path: Path, plan: dict, n_sites: int = 10) -> Path:
    path = tmp_path / "federation.toml"
    path.write_text(render_toml({"federation": {"insecure": True}, "plan": plan,
                                 "sites": {f"s{i}": IdentityKey.generate().public_line() for i in range(n_sites)}}))
    return path


def test_a_budget_in_the_plan_gives_the_recommended_recipe_that_spends_it(tmp_path: Path) -> None:
    """`epsilon` + `expected_images` instead of a full [plan]: the aggregator computes σ, and the plan a
    site receives spends exactly that budget at the site's own accountant."""
    from hemafed.core.learning.fedsgd import site_privacy
    from hemafed.core.learning.models import build_model
    from hemafed.core.learning.recipe import RECIPE, lr_times_sigma
    from hemafed.core.privacy.accounting import Accountant

    plan = AggregatorConfig.load(_write_plan(tmp_path, {"federation_id": "blood-2026", "epsilon": 3,
                                                        "expected_images": 10761, "rounds": 60})).plan
    assert (plan.algorithm, plan.dp_mode, plan.model, plan.rounds) == ("fedsgd", "distributed", RECIPE["model"], 60)
    # t = all sites but one: the shares then put 10/(9 − 1) = 1.25 times the accounted variance in a full round
    assert (plan.threshold, plan.min_sites, plan.max_sites, plan.batch_size) == (9, 9, 10, round(0.1713 * 10761))
    dim = sum(p.numel() for p in build_model(plan.model).parameters())
    privacy = site_privacy(plan, plan.secagg_config(dim))
    eps = Accountant("rdp").projected_epsilon(privacy.sigma, plan.sample_rate, plan.rounds, plan.delta,
                                              skellam=privacy.skellam)
    assert 2.95 < eps <= 3.0
    assert plan.server_lr == pytest.approx(min(1.0, lr_times_sigma(plan.model) / privacy.sigma), abs=1e-3)


def test_the_recipe_lr_falls_with_the_noise_unless_the_plan_sets_it() -> None:
    from hemafed.core.learning.recipe import recommended_plan, server_lr_for

    assert server_lr_for(2.6) == 1.0 and server_lr_for(1.0) == 1.0 and server_lr_for(5.2) == 0.5
    # the default 64-px model takes half the 28-px models' steps (lr·σ = 1.3 against 2.6; core.learning.recipe)
    e8, e3 = (recommended_plan(e, 10761, 10) for e in (8, 3))
    assert e8.server_lr == pytest.approx(1.3 / e8.noise_multiplier, abs=1e-3)
    assert e3.server_lr == pytest.approx(1.3 / e3.noise_multiplier, abs=1e-3)
    small = recommended_plan(8, 10761, 10, model="scatter_synth_inv_cc_lf_looks_hed_28")
    assert small.server_lr == 1.0 and small.input_size == 28
    assert recommended_plan(3, 10761, 10, server_lr=0.25).server_lr == 0.25


def test_the_budget_schedule_serves_the_models_it_was_screened_for() -> None:
    """Fewer rounds with a larger step at small budgets: for the recipe's model and the same head with a second
    scattering block; another model keeps the recipe's 500 rounds at its own step."""
    from hemafed.core.learning.recipe import RECIPE, schedule

    for model in (RECIPE["model"], "scatter_synth_inv_cc_ms4p_lf_looks_hed_s56_bw_64"):
        assert [schedule(e, model) for e in (1, 2, 3, 8)] == [(125, 2.6), (250, 2.6), (500, 1.3), (500, 1.3)]
    assert schedule(1, "scatter_synth_inv_cc_lf_looks_hed_28") == (500, 2.6)


def test_the_recipe_threshold_leaves_one_dropout_and_a_plan_may_set_its_own() -> None:
    from hemafed.core.learning.recipe import recommended_plan

    assert [recommended_plan(8, 10761, n).threshold for n in (2, 3, 5, 10, 20)] == [2, 2, 4, 9, 19]
    own = recommended_plan(8, 10761, 10, threshold=6)
    assert (own.threshold, own.min_sites) == (6, 6)
    # σ spends the budget whatever t is: t sizes the shares, not the accounted noise
    assert own.noise_multiplier == recommended_plan(8, 10761, 10).noise_multiplier


@pytest.mark.parametrize("plan,match", [
    ({"federation_id": "x", "epsilon": 8}, "expected_images"),
    ({"federation_id": "x", "expected_images": 1000}, "epsilon"),
    ({"federation_id": "x", "epsilon": 8, "expected_images": 1000, "noise_multiplier": 1.0}, "noise_multiplier"),
    ({"federation_id": "x", "epsilon": -1, "expected_images": 1000}, "epsilon"),
    ({"federation_id": "x", "epsilon": 8, "expected_images": 1000, "rounds": "many"}, "rounds"),
    ({"federation_id": "x", "epsilon": 8, "expected_images": 1000, "model": "resnet152"}, "unknown model"),
    ({"federation_id": "x", "epsilon": 8, "expected_images": 1000, "threshold": 0}, "threshold"),
])
def test_a_budget_plan_that_cannot_be_built_is_refused_with_the_reason(tmp_path: Path, plan: dict,
                                                                       match: str) -> None:
    with pytest.raises(PlanError, match=match):
        AggregatorConfig.load(_write_plan(tmp_path, plan))


def test_the_64_px_model_takes_half_the_recipe_lr() -> None:
    """The multi-scale model's longer feature vector wants half the step at the same noise (validation screen)."""
    from hemafed.core.learning.recipe import recommended_plan, server_lr_for

    assert server_lr_for(2.6, "scatter_synth_inv_cc_ms_64") == 0.5 and server_lr_for(2.6) == 1.0
    plan = recommended_plan(8.0, 12000, 10, model="scatter_synth_inv_cc_ms_64")
    assert plan.input_size == 64 and plan.server_lr == server_lr_for(plan.noise_multiplier, plan.model) < 1.0


def test_small_budgets_get_fewer_rounds_with_twice_the_step_and_still_spend_exactly_the_budget(tmp_path: Path) -> None:
    """The recipe's schedule (thirteenth pass of docs/accuracy-levers.md): 125 rounds at ε ≤ 1.5, 250 at ε ≤ 2.5,
    each at lr·σ = 2.6; 500 at 1.3 above. A plan, an admin or a simulation that names its rounds keeps them."""
    from hemafed.core.learning.fedsgd import site_privacy
    from hemafed.core.learning.models import build_model
    from hemafed.core.learning.recipe import recommended_plan
    from hemafed.core.privacy.accounting import Accountant
    from hemafed.network.sim.simulate import SimulationOptions

    plans = {e: recommended_plan(e, 10761, 10) for e in (1, 2, 3, 8)}
    assert [plans[e].rounds for e in (1, 2, 3, 8)] == [125, 250, 500, 500]
    dim = sum(p.numel() for p in build_model(plans[1].model).parameters())
    for e, plan in plans.items():
        k = 2.6 if e <= 2 else 1.3
        assert plan.server_lr == pytest.approx(k / plan.noise_multiplier, abs=1e-3)
        privacy = site_privacy(plan, plan.secagg_config(dim))
        spent = Accountant("rdp").projected_epsilon(privacy.sigma, plan.sample_rate, plan.rounds, plan.delta,
                                                    skellam=privacy.skellam)
        assert 0.98 * e < spent <= e
    own = recommended_plan(1, 10761, 10, rounds=500)
    assert own.rounds == 500 and own.server_lr == pytest.approx(1.3 / own.noise_multiplier, abs=1e-3)
    assert own.noise_multiplier > plans[1].noise_multiplier  # the same ε over 4 times the rounds
    assert recommended_plan(1, 10761, 10, model="scatter_synth_inv_cc_lf_looks_hed_28").rounds == 500  # unscreened
    admin = AggregatorConfig.load(_write_plan(tmp_path, {"federation_id": "x", "epsilon": 1,
                                                         "expected_images": 10761})).plan
    assert admin.rounds == 125 and admin.noise_multiplier == pytest.approx(plans[1].noise_multiplier)
    assert SimulationOptions(epsilon=1).planned_rounds == 125 and SimulationOptions(epsilon=2).planned_rounds == 250
    assert SimulationOptions(epsilon=1, dp=False).planned_rounds == 500
    assert SimulationOptions(epsilon=1, rounds=7).planned_rounds == 7
