"""Local train/validation splits and the simulation's split of a dataset across hospitals."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def stratified_split(
    labels: np.ndarray, val_fraction: float = 0.1, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val), stratified by class and reproducible for a given seed.

    Every class with at least two images keeps at least one image on each side.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError("val_fraction must be in [0, 1)")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_val = round(len(idx) * val_fraction)
        if val_fraction > 0 and len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    cat = lambda parts: np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)  # noqa: E731
    return cat(train).astype(np.int64), cat(val).astype(np.int64)


@dataclass(frozen=True)
class PartitionScheme:
    kind: str  # "iid" | "dirichlet"
    alpha: float | None = None

    @classmethod
    def parse(cls, text: str) -> PartitionScheme:
        text = text.strip().lower()
        if text == "iid":
            return cls("iid")
        if text.startswith("dirichlet:"):
            try:
                alpha = float(text.split(":", 1)[1])
            except ValueError:
                alpha = -1.0
            if not alpha > 0:
                raise ValueError(f"dirichlet needs a positive alpha, e.g. dirichlet:0.5 (got {text!r})")
            return cls("dirichlet", alpha)
        raise ValueError(f"unknown partition {text!r}: use 'iid' or 'dirichlet:ALPHA'")

    def __str__(self) -> str:
        return "iid" if self.kind == "iid" else f"dirichlet:{self.alpha:g}"


def partition(
    labels: np.ndarray,
    n_sites: int,
    scheme: str | PartitionScheme = "iid",
    seed: int = 0,
    min_per_site: int = 20,
) -> list[np.ndarray]:
    """Split sample indices across `n_sites` hospitals; every index goes to exactly one.

    `dirichlet:A` draws each class's share per hospital from Dir(A) (smaller A,
    stronger label skew), redrawing until every hospital has `min_per_site` images.
    """
    if n_sites < 1:
        raise ValueError("n_sites must be at least 1")
    labels = np.asarray(labels)
    if n_sites * min_per_site > len(labels):
        raise ValueError(f"{len(labels)} images cannot give {n_sites} sites {min_per_site} each")
    scheme = PartitionScheme.parse(scheme) if isinstance(scheme, str) else scheme
    rng = np.random.default_rng(seed)
    if scheme.kind == "iid":
        parts = np.array_split(rng.permutation(len(labels)), n_sites)
        return [np.sort(p).astype(np.int64) for p in parts]
    assert scheme.alpha is not None
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(n_sites)]
        for cls in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == cls))
            shares = rng.dirichlet(np.full(n_sites, scheme.alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for site, chunk in enumerate(np.split(idx, cuts)):
                parts[site].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_per_site:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise RuntimeError(f"could not draw a {scheme} partition with {min_per_site} images per site")


def class_counts(labels: np.ndarray, parts: list[np.ndarray], n_classes: int) -> np.ndarray:
    """(n_sites, n_classes) matrix of images per class at each hospital."""
    return np.stack([np.bincount(labels[p], minlength=n_classes) for p in parts])
