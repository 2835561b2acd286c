"""`hemafed train-central`: the centralised reference rows, private and not."""

from __future__ import annotations

import json

import pytest

from hemafed.gui.cli import main as cli_main


@pytest.mark.slow
def test_train_central_dp_and_non_private(shared_data, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["train-central", "--data", str(shared_data), "--model", "cnn4_28", "--epochs", "1", "--subset", "400",
              "--json"]
    assert cli_main([*common, "--epsilon", "4"]) == 0
    dp = json.loads(capsys.readouterr().out)
    assert dp["dp"] and 0 < dp["epsilon"] <= 4 and dp["sigma"] > 0 and dp["delta"] == pytest.approx(1e-5)
    assert dp["privacy"].startswith("DP") and dp["n_train"] == 400 and dp["n_test"] > 3000
    assert 0.0 <= dp["test_accuracy"] <= 1.0 and len(dp["confusion"]) == 8
    assert cli_main(common) == 0
    base = json.loads(capsys.readouterr().out)
    assert not base["dp"] and base["epsilon"] is None and base["privacy"] == "NON-PRIVATE"


def test_train_central_reports_missing_data(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["train-central", "--data", str(tmp_path / "nothing.npz"), "--epochs", "1"]) == 1
    assert "error" in capsys.readouterr().err


def test_fedsgd_plan_prints_a_plan_that_loads_and_spends_the_budget(capsys) -> None:
    import tomllib

    from hemafed.core.learning.fedsgd import site_privacy
    from hemafed.core.learning.models import build_model
    from hemafed.core.privacy.accounting import Accountant
    from hemafed.core.rounds.plan import FederationPlan

    assert cli_main(["privacy", "fedsgd-plan", "--epsilon", "3", "--rounds", "50", "--images", "5000",
                     "--sites", "5"]) == 0
    out = capsys.readouterr().out
    plan = FederationPlan.from_dict(tomllib.loads(out)["plan"])
    # t defaults to all 5 sites but one
    assert (plan.algorithm, plan.dp_mode, plan.threshold, plan.batch_size) == ("fedsgd", "distributed", 4, 856)
    dim = sum(p.numel() for p in build_model(plan.model).parameters())
    privacy = site_privacy(plan, plan.secagg_config(dim))
    eps = Accountant("rdp").projected_epsilon(privacy.sigma, plan.sample_rate, plan.rounds, plan.delta,
                                              skellam=privacy.skellam)
    assert 2.9 < eps <= 3.0
