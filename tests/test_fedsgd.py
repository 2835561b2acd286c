"""DP-FedSGD's arithmetic: clipped sums, the centring round, the server step, plan and bounds in both DP modes
(a site's whole round, with its ledger, is tested through the site trainer: tests/test_site_trainer.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hemafed.core.learning.fedsgd import FedSGDServer, clipped_gradient_sum, server_round, site_privacy
from hemafed.core.learning.models import get_flat_params
from hemafed.core.rounds.plan import FederationPlan, PlanError, SiteBounds
from hemafed.core.secagg.config import SecAggConfig
from hemafed.core.secagg.quantize import quantize


def _plan(mode: str, sigma: float) -> FederationPlan:
    return FederationPlan(algorithm="fedsgd", model="scatter_linear_28", sample_rate=0.2, dp_mode=mode,
                          noise_multiplier=sigma, rounds=5,
                          threshold=3, min_sites=3, max_sites=5, batch_size=30)


def _head() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(20, 4))


def test_bk_linear_ghost_path_matches_per_sample_autograd() -> None:
    head = _head()
    x, y = torch.randn(16, 20), torch.randint(0, 4, (16,))
    gs = clipped_gradient_sum(head, x, y, 1.0, 0.5, indices=torch.arange(16))
    expected = []
    for i in range(16):
        head.zero_grad()
        nn.functional.cross_entropy(head(x[i:i + 1]), y[i:i + 1], reduction="sum").backward()
        g = torch.cat([p.grad.reshape(-1) for p in head.parameters()])
        expected.append(g * min(1.0, 0.5 / float(g.norm())))
    np.testing.assert_allclose(gs.vector, torch.stack(expected).sum(0).numpy(), rtol=1e-4, atol=1e-5)


def test_server_round_equals_sgd_on_the_decoded_sum() -> None:
    plan = _plan("distributed", 1.0)
    cfg = SecAggConfig(plan.federation_id, threshold=3, dim=10, n_extras=1, max_sites=5)
    privacy = site_privacy(plan, cfg)
    codec = privacy.codec
    g = np.linspace(-3, 3, 10)
    ring = quantize(cfg, codec.encode(g, cfg.clip), cfg.max_weight, np.array([40]), np.random.default_rng(0))
    w, extras = server_round(FedSGDServer(lr=0.1, momentum=0.0), privacy, np.zeros(10, np.float32), ring)
    np.testing.assert_allclose(w, -0.1 * g / 30, atol=1e-5)  # divided by the plan's batch_size, a constant
    assert extras.tolist() == [40]


def test_site_requiring_local_dp_refuses_a_distributed_plan() -> None:
    plan = _plan("distributed", 1.0)
    cfg = SecAggConfig(plan.federation_id, threshold=3, dim=10, n_extras=1, max_sites=5)
    bounds = SiteBounds(require_local_dp=True)
    assert any("requires local DP" in v for v in bounds.violations(plan))
    with pytest.raises(PlanError, match="requires local DP"):
        site_privacy(plan, cfg, bounds)
    assert bounds.violations(_plan("local", 1.0)) == []


def test_distributed_plan_needs_secagg_and_a_common_sigma() -> None:
    with pytest.raises(PlanError, match="secure aggregation"):
        FederationPlan(algorithm="fedsgd", sample_rate=0.1, dp_mode="distributed", noise_multiplier=1.0,
                       secagg=False)
    with pytest.raises(PlanError, match="noise_multiplier"):
        FederationPlan(algorithm="fedsgd", sample_rate=0.1, dp_mode="distributed", noise_multiplier=0.0)
    with pytest.raises(PlanError, match="dp_mode"):
        FederationPlan(dp_mode="central")


def test_centering_round_sums_clipped_features_and_sets_only_the_center() -> None:
    """A CenteredLinear head's first round: each record adds its feature vector clipped to the radius and
    scaled by C/R (so at most C, as a clipped gradient), and the server sets the center to the mean."""
    from hemafed.core.learning.fedsgd import center_layout, clipped_round_sum
    from hemafed.core.learning.models import CenteredLinear

    torch.manual_seed(0)
    head = CenteredLinear(6, 3, radius=2.0)
    x = torch.randn(20, 6) * 0.5 + 1.0
    x[0] *= 1000  # one record far outside the radius
    y = torch.randint(0, 3, (20,))
    clip = 0.5
    gs = clipped_round_sum(head, x, y, 1.0, clip)  # q = 1: every record
    where, radius = center_layout(head)
    assert radius == 2.0 and where == slice(0, 6)  # parameters() order: the center, then W and b
    assert not gs.vector[6:].any()
    clipped = x * torch.clamp(2.0 / x.norm(dim=1, keepdim=True), max=1.0)
    np.testing.assert_allclose(gs.vector[where], (clipped.sum(0) * clip / 2.0).numpy(), rtol=1e-5)
    # one record changes the sum by at most C, however large it is
    without = clipped_round_sum(head, x[1:], y[1:], 1.0, clip).vector
    assert np.linalg.norm(gs.vector - without) <= clip + 1e-6

    weights = get_flat_params(head)
    new = FedSGDServer(lr=0.1, momentum=0.9).apply(weights, gs.vector, 20.0, center_layout(head), clip)
    np.testing.assert_array_equal(new[6:], weights[6:])  # W and b do not move in this round
    np.testing.assert_allclose(new[where], clipped.mean(0).numpy(), rtol=1e-5)


def test_the_centre_is_the_average_of_the_first_center_rounds_estimates_and_survives_a_restart() -> None:
    """With `center_rounds` = 3 the centre stays zero (so the sites send feature sums again) until three rounds'
    estimates are in, then it is their average; a checkpoint taken in between resumes the average."""
    from hemafed.core.learning.fedsgd import center_layout
    from hemafed.core.learning.models import CenteredLinear
    from hemafed.core.rounds.plan import FederationPlan

    head = CenteredLinear(6, 3, radius=2.0)
    where = center_layout(head)
    weights = get_flat_params(head)
    rng = np.random.default_rng(0)
    sums = [np.concatenate([rng.normal(1.0, 0.3, 6), rng.normal(0, 1, 21)]).astype(np.float32) for _ in range(3)]
    server = FedSGDServer(lr=0.1, momentum=0.9, center_rounds=3)
    w = weights
    for k, noisy in enumerate(sums[:2]):
        w = server.apply(w, noisy, 10.0, where, 1.0)
        assert not w[:6].any() and np.array_equal(w[6:], weights[6:]), k  # nothing moves yet
    resumed = FedSGDServer(lr=0.1, momentum=0.9, center_rounds=3)
    resumed.load_state(server.state())
    for srv in (server, resumed):
        final = srv.apply(w, sums[2], 10.0, where, 1.0)
        expected = np.mean([s[:6].astype(np.float64) * 2.0 / 10.0 for s in sums], axis=0)
        np.testing.assert_allclose(final[:6], expected, rtol=1e-5)
        np.testing.assert_array_equal(final[6:], weights[6:])
    # a plan's count: at most a tenth of its rounds, at least one
    assert [FederationPlan(rounds=r).center_rounds_used for r in (3, 50, 125, 500)] == [1, 5, 10, 10]
    assert FederationPlan(rounds=500, center_rounds=1).center_rounds_used == 1
    # and the plan review says which rounds send feature sums
    from types import SimpleNamespace

    from hemafed.network.plan_review import plan_rows, sees_text

    privacy = SimpleNamespace(delta=1e-5, sigma=2.6)
    assert "Each of rounds 1–10</b>" in dict(plan_rows(FederationPlan(), privacy, 8.0, ()))["training per round"]
    assert "Round 1</b>" in dict(plan_rows(FederationPlan(rounds=5), privacy, 8.0, ()))["training per round"]
    assert "(in rounds 1–10, feature sums)" in sees_text(FederationPlan())


def test_a_head_with_block_weights_clips_the_gradient_of_what_it_computes() -> None:
    """`CenteredLinear(block_weights=...)`: logits = W·(s ⊙ (x − m)) + b with a fixed s per block; the round's
    per-record gradients are those of that function, each clipped to C as a whole, and s stays out of the flat
    weight vector (the update's length and the accounting do not change)."""
    from hemafed.core.learning.fedsgd import clipped_round_sum
    from hemafed.core.learning.models import CenteredLinear, num_parameters, set_flat_params

    torch.manual_seed(2)
    blocks = ((2, 3.0), (4, 0.5))
    head = CenteredLinear(6, 3, radius=2.0, block_weights=blocks)
    assert num_parameters(head) == num_parameters(CenteredLinear(6, 3, radius=2.0)) == 6 + 18 + 3
    weights = get_flat_params(head)
    weights[:6] = np.linspace(0.5, 1.0, 6)
    set_flat_params(head, weights)
    x, y = torch.randn(10, 6) + 1.0, torch.randint(0, 3, (10,))
    s = torch.tensor([3.0, 3.0, 0.5, 0.5, 0.5, 0.5])
    centred = (x - torch.as_tensor(weights[:6])) * s
    assert torch.allclose(head(x), head.linear(centred))
    clip = 0.7
    gs = clipped_round_sum(head, x, y, 1.0, clip)
    expected = torch.zeros(21, dtype=torch.float64)
    for i in range(10):  # one record at a time: its gradient, clipped to C
        plain = nn.Linear(6, 3)
        plain.load_state_dict(head.linear.state_dict())
        torch.nn.functional.cross_entropy(plain(centred[i:i + 1]), y[i:i + 1], reduction="sum").backward()
        g = torch.cat([plain.weight.grad.reshape(-1), plain.bias.grad]).double()
        expected += g * min(1.0, clip / float(g.norm()))
    np.testing.assert_allclose(gs.vector[6:], expected.numpy(), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="do not cover"):
        CenteredLinear(6, 3, radius=2.0, block_weights=((2, 3.0), (3, 1.0)))


def test_after_centering_rounds_train_w_and_b_on_centred_inputs_and_keep_the_center() -> None:
    from hemafed.core.learning.fedsgd import center_layout, clipped_round_sum
    from hemafed.core.learning.models import CenteredLinear, set_flat_params

    torch.manual_seed(1)
    head = CenteredLinear(6, 3, radius=2.0)
    weights = get_flat_params(head)
    weights[:6] = np.linspace(0.5, 1.0, 6)
    set_flat_params(head, weights)
    assert head.centered
    x, y = torch.randn(10, 6) + 1.0, torch.randint(0, 3, (10,))
    gs = clipped_round_sum(head, x, y, 1.0, 1e6)  # a clip no gradient reaches: the plain gradient sum
    plain = nn.Linear(6, 3)
    plain.load_state_dict(head.linear.state_dict())
    torch.nn.functional.cross_entropy(plain(x - torch.as_tensor(weights[:6])), y, reduction="sum").backward()
    np.testing.assert_allclose(gs.vector[6:24], plain.weight.grad.reshape(-1).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gs.vector[24:], plain.bias.grad.numpy(), rtol=1e-4, atol=1e-5)
    assert not gs.vector[:6].any()
    noisy = gs.vector + 1.0  # noise lands on the center's coordinates too: the server ignores it there
    new = FedSGDServer(lr=0.1, momentum=0.9).apply(weights, noisy, 10.0, center_layout(head))
    np.testing.assert_array_equal(new[:6], weights[:6])
    assert not np.allclose(new[6:], weights[6:])
