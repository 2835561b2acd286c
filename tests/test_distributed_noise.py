"""Distributed DP in the ring: the noise the sum carries is what the accountant assumes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from opacus.accountants.analysis.rdp import compute_rdp

from hemafed.core.privacy.accounting import Accountant
from hemafed.core.privacy.calibration import calibrate_sigma
from hemafed.core.privacy.distributed_noise import ORDERS, DistributedNoise, skellam_noise, skellam_rdp
from hemafed.core.secagg.config import SecAggConfig
from hemafed.core.secagg.prg import RING_DTYPE
from hemafed.core.secagg.quantize import quantize


def _noise(dim: int = 4000, sigma: float = 1.2, t: int = 6, max_sites: int = 10, colluders: int = 1):
    cfg = SecAggConfig("fed", threshold=t, dim=dim, n_extras=1, max_sites=max_sites)
    return cfg, DistributedNoise.for_secagg(cfg, sigma=sigma, clip_norm=1.0, colluders=colluders)


def test_skellam_variance_and_mean() -> None:
    x = skellam_noise(400_000, 50.0, np.random.default_rng(0))
    assert x.dtype == np.int64
    assert abs(x.mean()) < 0.05
    assert x.var() == pytest.approx(50.0, rel=0.01)


def _ring_sum(cfg: SecAggConfig, dn: DistributedNoise, sums: list[np.ndarray], rng: np.random.Generator):
    total = np.zeros(cfg.vector_len, RING_DTYPE)
    for i, s in enumerate(sums):
        total += quantize(cfg, dn.encode(s, cfg.clip), cfg.max_weight, np.array([100 + i]), rng,
                          noise=dn.noise_hook(rng))
    return dn.decode(total[:cfg.dim]), int(total[cfg.dim + 1])


@pytest.mark.parametrize("survivors", [10, 6])  # everyone, and the dropout case: only t = 6 of 10 survive
def test_sum_carries_the_accounted_variance(survivors: int) -> None:
    """Per coordinate, the decoded sum minus the true sum has variance survivors/(t−c)·σ²Δ₂²/γ² (float units):
    at t survivors with c = 1 that is t/(t−1) ≥ 1 times the accounted σ²Δ₂², never less."""
    cfg, dn = _noise()
    rng = np.random.default_rng(1)
    sums = [rng.normal(0, 3.0, cfg.dim) for _ in range(survivors)]
    decoded, n_total = _ring_sum(cfg, dn, sums, rng)
    err = decoded - np.sum(sums, axis=0)
    accounted = dn.total_variance / dn.gamma**2
    expected = survivors / (dn.threshold - dn.colluders) * accounted
    # the sample variance of 4000 coordinates is within ±6 % of the truth at > 4 standard errors
    assert err.var() == pytest.approx(expected, rel=0.06)
    assert err.var() >= accounted * 0.94
    assert abs(err.mean()) < 4 * math.sqrt(expected / cfg.dim)
    assert n_total == sum(100 + i for i in range(survivors))


def test_no_ring_overflow_at_max_sites() -> None:
    """Every site at the signal limit plus its noise share: the int32 read-back is still exact."""
    for max_sites, t, sigma in ((10, 6, 1.0), (64, 33, 5.0), (64, 2, 20.0)):
        cfg, dn = _noise(dim=2000, sigma=sigma, t=t, max_sites=max_sites)
        assert dn.ring_headroom(z=10) > 0
        rng = np.random.default_rng(2)
        sums = [np.full(cfg.dim, 1e6) for _ in range(max_sites)]  # clipped to +coord_clip at every site
        decoded, _ = _ring_sum(cfg, dn, sums, rng)
        expected = max_sites * dn.coord_clip
        assert np.all(decoded > 0), "a coordinate wrapped around the ring"
        noise_sd = math.sqrt(max_sites * dn.share_variance) / dn.gamma
        assert np.abs(decoded - expected).max() < 6 * noise_sd + max_sites / dn.gamma


def test_rounding_inflation_is_small_and_counted() -> None:
    _, dn = _noise(dim=95_264)
    assert dn.l2_sensitivity == pytest.approx(dn.gamma * dn.clip_norm + math.sqrt(95_264))
    assert dn.l2_sensitivity / (dn.gamma * dn.clip_norm) < 1.01


def test_amplification_bound_matches_exact_gaussian() -> None:
    """Fed the Gaussian RDP curve, the subsampling bound used for Skellam equals Opacus' exact subsampled
    Gaussian at integer orders; the Skellam correction terms are tiny at our sensitivities."""
    from hemafed.core.privacy.distributed_noise import subsampled_rdp

    q, sigma = 0.085, 1.5
    exact = compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(ORDERS))
    ours = [subsampled_rdp(a, q, lambda j: j / (2 * sigma**2)) for a in ORDERS]
    np.testing.assert_allclose(ours, exact, rtol=1e-8)
    sk = skellam_rdp(q, sigma, 1, 1e5, 1e5 * math.sqrt(95_264))
    np.testing.assert_allclose(sk, exact, rtol=1e-3)


def test_skellam_calibration_close_to_gaussian_and_within_budget() -> None:
    _, dn = _noise(dim=95_264)
    sens = (dn.l2_sensitivity, dn.l1_sensitivity)
    for eps in (3.0, 8.0):
        s_g = calibrate_sigma(eps, 1e-5, 0.1, 300)
        s_k = calibrate_sigma(eps, 1e-5, 0.1, 300, skellam=sens)
        assert s_g <= s_k < 1.02 * s_g
        acc = Accountant("rdp")
        acc.step(s_k, 0.1, 300, skellam=sens)
        assert acc.epsilon(1e-5) <= eps
        acc2 = Accountant("rdp")
        acc2.step(s_k * 0.97, 0.1, 300, skellam=sens)
        assert acc2.epsilon(1e-5) > eps  # calibration is tight, not padded


def test_collusion_weakens_the_noise_as_stated() -> None:
    _, dn = _noise(sigma=2.0, t=6, colluders=1)
    assert dn.sigma_with(1) == pytest.approx(2.0)
    assert dn.sigma_with(3) == pytest.approx(2.0 * math.sqrt(3 / 5))
    assert dn.sigma_with(6) == 0.0
    with pytest.raises(ValueError):
        DistributedNoise(1.0, 1.0, 10, threshold=3, colluders=3, levels=1000, max_sites=10)


def test_skellam_entries_persist_in_state_dict() -> None:
    acc = Accountant("rdp")
    acc.step(1.5, 0.1, 10, skellam=(1e5, 3e7))
    acc.step(1.5, 0.1, 5, skellam=(1e5, 3e7))
    acc.step(1.5, 0.1, 5)
    assert acc.history == [(1.5, 0.1, 15, 1e5, 3e7), (1.5, 0.1, 5)]
    again = Accountant.from_state_dict(acc.state_dict())
    assert again.epsilon(1e-5) == acc.epsilon(1e-5)
    with pytest.raises(ValueError, match="RDP only"):
        Accountant("prv", acc.history).epsilon(1e-5)
