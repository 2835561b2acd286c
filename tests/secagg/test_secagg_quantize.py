from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hemafed.core.secagg import ConfigError, InputError, SecAggConfig
from hemafed.core.secagg.quantize import dequantize, error_bound, quantize


def cfg(**kw):
    base = {"federation_id": "f", "threshold": 2, "dim": 64, "n_extras": 3, "clip": 0.5, "max_sites": 16,
            "max_weight": 1000, "max_extra": 10_000}
    return SecAggConfig(**{**base, **kw})


def ring_sum(vs):
    return (np.sum([v.astype(np.uint64) for v in vs], axis=0) % 2**32).astype(np.uint32)


def test_layout_and_exact_integers():
    c = cfg()
    q = quantize(c, np.zeros(64, np.float32), 7, np.array([1, 2, 3]), np.random.default_rng(0))
    assert q.dtype == np.uint32 and q.shape == (c.vector_len,)
    assert np.all(q[:64] == 0) and q[64] == 7 and list(q[65:]) == [1, 2, 3]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 16), seed=st.integers(0, 2**32 - 1), big=st.booleans())
def test_sum_of_max_sites_never_overflows_and_error_is_bounded(n, seed, big):
    c = cfg()
    rng = np.random.default_rng(seed)
    ups = [(rng.standard_normal(64) * (10 if big else 0.1)).astype(np.float32) for _ in range(n)]
    ws = [int(rng.integers(0, c.max_weight + 1)) if not big else c.max_weight for _ in range(n)]
    exs = [rng.integers(0, c.max_extra + 1, 3) for _ in range(n)]
    qs = [quantize(c, u, w, e, rng) for u, w, e in zip(ups, ws, exs, strict=True)]
    weighted, weight, extras = dequantize(c, ring_sum(qs))
    truth = sum(w * np.clip(u.astype(np.float64), -c.clip, c.clip) for u, w in zip(ups, ws, strict=True))
    assert weight == sum(ws)
    assert np.array_equal(extras, np.sum(exs, axis=0))
    bound = error_bound(c, n) + np.abs(truth) * 2.0**-23  # plus the float32 cast
    assert np.all(np.abs(weighted - truth) <= bound)


def test_stochastic_rounding_is_unbiased():
    c = cfg(dim=1)
    x = np.array([0.3 * c.clip / c.levels], np.float32)  # 0.3 of one step at full weight
    rng = np.random.default_rng(1)
    qs = np.array([quantize(c, x, c.max_weight, np.zeros(3, np.int64), rng)[0] for _ in range(4000)])
    assert set(qs.tolist()) <= {0, 1}
    assert abs(qs.mean() - 0.3) < 0.03


def test_clipping_and_input_checks():
    c = cfg(dim=2)
    q = quantize(c, np.array([100.0, -100.0], np.float32), c.max_weight, np.zeros(3, np.int64))
    assert list(q[:2].view(np.int32)) == [c.levels, -c.levels]
    ex = np.zeros(3, np.int64)
    for bad in [(np.zeros(3, np.float32), 1, ex), (np.array([np.nan, 0], np.float32), 1, ex),
                (np.zeros(2, np.float32), -1, ex), (np.zeros(2, np.float32), c.max_weight + 1, ex),
                (np.zeros(2, np.float32), 1, np.array([0, 0, c.max_extra + 1])),
                (np.zeros(2, np.float32), 1, np.array([0, -1, 0])), (np.zeros(2, np.int64), 1, ex),
                (np.zeros(2, np.float32), True, ex)]:
        with pytest.raises(InputError):
            quantize(c, *bad)


@pytest.mark.parametrize("kw", [{"threshold": 1}, {"max_sites": 1}, {"max_weight": 2**28, "max_sites": 16},
                                {"max_extra": 2**29, "max_sites": 16}, {"clip": 0.0}, {"clip": float("nan")},
                                {"federation_id": ""}, {"dim": -1}, {"threshold": 17}])
def test_config_refuses_overflowing_or_meaningless_parameters(kw):
    with pytest.raises(ConfigError):
        cfg(**kw)


def test_round_size_checks():
    c = cfg(threshold=3)
    c.check_round(5)
    for n in (1, 6, 17):  # too few sites, t not above n/2, more than max_sites
        with pytest.raises(ConfigError):
            c.check_round(n)
