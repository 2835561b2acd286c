from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hemafed.core.data.partition import PartitionScheme, class_counts, partition, stratified_split


def _labels(n: int = 2000, classes: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, n)


def test_stratified_split_is_seeded_disjoint_and_stratified() -> None:
    labels = _labels()
    tr, va = stratified_split(labels, 0.2, seed=3)
    tr2, va2 = stratified_split(labels, 0.2, seed=3)
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2)
    assert not np.intersect1d(tr, va).size
    assert len(tr) + len(va) == len(labels)
    for cls in range(8):
        frac = (labels[va] == cls).sum() / (labels == cls).sum()
        assert abs(frac - 0.2) < 0.01
    tr3, _ = stratified_split(labels, 0.2, seed=4)
    assert not np.array_equal(tr, tr3)


def test_small_classes_keep_one_on_each_side() -> None:
    labels = np.array([0, 0, 1, 1, 1, 2])
    tr, va = stratified_split(labels, 0.1)
    assert set(labels[va]) == {0, 1}
    assert set(labels[tr]) == {0, 1, 2}


@settings(max_examples=25, deadline=None)
@given(n_sites=st.integers(1, 12), seed=st.integers(0, 100), alpha=st.sampled_from([0.1, 0.5, 5.0]))
def test_dirichlet_partition_covers_every_index_once(n_sites: int, seed: int, alpha: float) -> None:
    labels = _labels(3000)
    parts = partition(labels, n_sites, f"dirichlet:{alpha}", seed=seed)
    joined = np.concatenate(parts)
    assert len(joined) == len(labels) and len(np.unique(joined)) == len(labels)
    assert min(len(p) for p in parts) >= 20


def test_dirichlet_skews_labels_more_than_iid() -> None:
    labels = _labels(12000)
    def skew(scheme: str) -> float:
        counts = class_counts(labels, partition(labels, 10, scheme, seed=0), 8).astype(float)
        shares = counts / counts.sum(1, keepdims=True)
        return float(np.abs(shares - shares.mean(0)).mean())
    assert skew("dirichlet:0.5") > 5 * skew("iid")


def test_partition_is_seeded() -> None:
    labels = _labels()
    a = partition(labels, 5, "dirichlet:0.5", seed=1)
    b = partition(labels, 5, "dirichlet:0.5", seed=1)
    c = partition(labels, 5, "dirichlet:0.5", seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("bad", ["dirichlet", "dirichlet:-1", "dirichlet:abc", "shards:2", ""])
def test_bad_scheme_is_a_clear_error(bad: str) -> None:
    with pytest.raises(ValueError, match=r"dirichlet|partition"):
        PartitionScheme.parse(bad)
