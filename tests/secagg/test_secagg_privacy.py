"""Instrumented: the aggregator object never holds a site's unmasked input, only uniform-looking vectors."""

from __future__ import annotations

import dataclasses

import numpy as np
from secagg_harness import make_round, run_round

from hemafed.core.secagg import MaskedInput, SecAggConfig, SecAggResult
from hemafed.core.secagg.quantize import quantize

CFG = SecAggConfig(federation_id="privacy", threshold=3, dim=50_000, n_extras=8, max_sites=8, max_weight=1000,
                   max_extra=1000)


def chi2_top_byte(v: np.ndarray) -> float:
    counts = np.bincount((v >> 24).astype(np.int64), minlength=256)
    expected = len(v) / 256
    return float(((counts - expected) ** 2 / expected).sum())


def looks_uniform(v: np.ndarray) -> bool:
    # 255 degrees of freedom: mean 255, sd 22.6; (150, 400) leaves each tail below 1e-6
    return 150 < chi2_top_byte(v) < 400 and 150 < chi2_top_byte(v << 24) < 400


def arrays_in(obj, seen=None):
    """Every numpy array reachable from the object's attributes."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from arrays_in(k, seen)
            yield from arrays_in(v, seen)
    elif isinstance(obj, list | tuple | set | frozenset):
        for v in obj:
            yield from arrays_in(v, seen)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from arrays_in(getattr(obj, f.name), seen)
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("hemafed"):
        yield from arrays_in(vars(obj), seen)


def test_aggregator_only_ever_holds_masked_vectors():
    n = 5
    agg, sites, _ = make_round(CFG, n, seed=0)
    constant = np.full(CFG.dim, 0.25, np.float32)
    inputs = {i: (constant, 100, np.full(CFG.n_extras, 7, np.int64)) for i in sites}
    plain = {i: quantize(CFG, *inputs[i], rng=np.random.default_rng(i)) for i in sites}
    assert not looks_uniform(plain[1])  # the test has power: an unmasked input is far from uniform

    received: list[np.ndarray] = []
    real_receive = agg.receive

    def spy(sid, msg):
        if isinstance(msg, MaskedInput):
            received.append(msg.vector.copy())
        return real_receive(sid, msg)

    agg.receive = spy
    snapshots = 0

    def inspect(_event, a):
        nonlocal snapshots
        snapshots += 1
        for arr in arrays_in(a):
            if arr.dtype == np.uint32 and arr.shape == (CFG.vector_len,):
                assert not any(np.array_equal(arr, p) for p in plain.values()), "holds an unmasked input"
                if a.outcome is None:  # before unmasking, anything held must look uniform
                    assert looks_uniform(arr[:CFG.dim])

    out = run_round(CFG, agg, sites, inputs, drop={2: "after_shares"}, tap=inspect)
    assert isinstance(out, SecAggResult) and out.dropouts == (2,)
    assert snapshots > 10 and len(received) == n - 1
    for v in received:
        assert looks_uniform(v[:CFG.dim])
        assert not np.array_equal(v[CFG.dim], plain[1][CFG.dim])  # weights travel masked too
    # even a partial sum (the running sum before the last site) is uniform
    partial = np.sum(received[:2], axis=0, dtype=np.uint32)
    assert looks_uniform(partial[:CFG.dim])
    # the one unmasked vector it ends with is the sum over survivors
    expected = np.sum([plain[i].astype(np.uint64) for i in out.survivors], axis=0) % 2**32
    assert np.array_equal(out.ring_sum, expected.astype(np.uint32))
    assert out.weight_sum == 100 * len(out.survivors)
