"""DP-FedSGD in one process: the federation's arithmetic without processes, sockets or masks.

Used by `hemafed experiment` for its many private rows (a real federation per row does not
fit a 2-core machine; one real run of the main job is reported next to them). Per round:

* every hospital Poisson-samples its own training records at the plan's rate q and computes
  its clipped gradient sum (`core.fedsgd.clipped_gradient_sum`, as `core.fedsgd.site_round`);
* it adds its noise exactly as a site does: local DP, N(0, σ²C²) on the float sum; distributed
  DP, its Skellam share on the rounded ring words (`DistributedNoise.noise_hook`); and
  quantizes with `core.secagg.quantize` under the plan's `SecAggConfig`;
* the ring words are summed modulo 2^32 — the pairwise masks of secure aggregation cancel in
  that sum, so leaving them out changes no bit of it — decoded, and `FedSGDServer` takes the
  step with the plan's expected batch.

What differs from `hemafed simulate`: no dropouts (every hospital survives every round, so
the distributed noise is what the default plan releases when nobody drops: 10 shares sized
for t − c), no ledger writes, and the fixed features of all hospitals are computed in one
pass (the same function each site runs). Non-private rows use the plain mean gradient of the
Poisson batch (no clipping, no noise).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


@dataclass
class FeatureSet:
    """The fixed features of a model for the whole data set: training view and evaluation view."""

    model: str
    train_x: torch.Tensor  # what a site trains on (one view)
    train_y: torch.Tensor
    test_x: torch.Tensor  # what evaluation sees (`evaluation_features`: 8-view mean for scatter_*)
    test_y: torch.Tensor
    seconds: float


def _cache_key(data: Path, model: str) -> str:
    stat = data.stat()
    return hashlib.sha256(f"{data.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{model}|v1".encode()).hexdigest()[:16]


def load_features(data: Path | None, model: str, cache_dir: Path) -> FeatureSet:
    """Features of the train and test splits, computed once and cached under `cache_dir`."""
    from hemafed.core.data.bloodmnist import load_splits, locate
    from hemafed.core.learning.models import build_model, evaluation_features, images_to_tensor, split_features

    path = locate(data)
    cache = cache_dir / f"features-{model}-{_cache_key(path, model)}.pt"
    if cache.exists():
        d = torch.load(cache)
        return FeatureSet(model, d["train_x"], d["train_y"], d["test_x"], d["test_y"], d["seconds"])
    splits = load_splits(path)
    net = build_model(model, 8)
    net.eval()
    features, _ = split_features(net)
    started = time.perf_counter()
    train_x = torch.as_tensor(features(images_to_tensor(splits["train"].images, model))).float()
    log.info("training features: %s in %.0f s", tuple(train_x.shape), time.perf_counter() - started)
    test_x = torch.as_tensor(evaluation_features(net)(images_to_tensor(splits["test"].images, model))).float()
    seconds = time.perf_counter() - started
    log.info("test features (evaluation views): %s; %.0f s in all", tuple(test_x.shape), seconds)
    out = FeatureSet(model, train_x, torch.as_tensor(splits["train"].labels.reshape(-1)).long(), test_x,
                     torch.as_tensor(splits["test"].labels.reshape(-1)).long(), seconds)
    cache_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"train_x": out.train_x, "train_y": out.train_y, "test_x": out.test_x, "test_y": out.test_y,
                "seconds": seconds}, cache)
    return out


def hospitals(labels: np.ndarray, sites: int, scheme: str, seed: int, val_fraction: float = 0.1) -> list[np.ndarray]:
    """Each hospital's *training* record indices, split as `hemafed simulate --seed SEED` splits them (the
    same partition, then each site's stratified validation hold-out, seeded by the plan's seed)."""
    from hemafed.core.data.partition import partition, stratified_split

    parts = partition(labels, sites, scheme, seed=seed, min_per_site=min(64, len(labels) // (2 * sites)))
    return [idx[stratified_split(labels[idx], val_fraction, seed=seed)[0]] for idx in parts]


@dataclass(frozen=True)
class Recipe:
    """One training run's settings (everything but the data and the seed)."""

    rounds: int
    sample_rate: float
    lr: float
    momentum: float = 0.9
    clip_norm: float = 1.0
    privacy: str = "distributed"  # "distributed" | "local" | "central" (one party, Gaussian) | "none"
    sigma: float = 0.0
    threshold: int = 6  # distributed: shares sized for t − c
    colluders: int = 1


@dataclass
class RunResult:
    accuracy: float
    seconds: float
    n_records: int


def _head(model: str, dim: int) -> torch.nn.Module:
    from hemafed.core.learning.models import build_model, split_features

    _, head = split_features(build_model(model, 8))
    got = sum(p.numel() for p in head.parameters())
    if got not in (dim * 8 + 8, dim * 9 + 8):  # a CenteredLinear head also carries its feature center
        raise ValueError(f"{model}'s trainable part has {got} parameters, not a linear head on {dim} features")
    return head


@torch.no_grad()
def _accuracy(head: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    head.eval()
    pred = head(x).argmax(1)
    head.train()
    return float((pred == y).float().mean())


def run_fedsgd(feats: FeatureSet, parties: list[np.ndarray], recipe: Recipe, seed: int) -> RunResult:
    """Train the model's head by (DP-)FedSGD over `parties` (index arrays into the training features) and
    return its test accuracy (evaluation view, as `hemafed classify` and the simulator measure it)."""
    from hemafed.core.learning.fedsgd import (
        FedSGDServer,
        center_layout,
        clipped_round_sum,
        gaussian_noise,
        poisson_batch,
    )
    from hemafed.core.learning.models import get_flat_params, set_flat_params
    from hemafed.core.privacy.distributed_noise import DistributedNoise
    from hemafed.core.rounds.plan import FederationPlan
    from hemafed.core.secagg.quantize import quantize

    torch.manual_seed(seed)
    head = _head(feats.model, int(np.prod(feats.train_x.shape[1:])))
    weights = get_flat_params(head)
    dim = len(weights)
    n_total = sum(len(p) for p in parties)
    expected_batch = max(1, round(recipe.sample_rate * n_total))  # the plan constant, as Simulation sets it
    server = FedSGDServer(recipe.lr, recipe.momentum)
    center = center_layout(head)  # a centred head: the first round estimates the center (core.fedsgd)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    xs = [feats.train_x[torch.as_tensor(p)] for p in parties]
    ys = [feats.train_y[torch.as_tensor(p)] for p in parties]
    private = recipe.privacy in ("distributed", "local")
    if private:
        plan = FederationPlan(federation_id="inprocess", model=feats.model, rounds=recipe.rounds,
                              threshold=recipe.threshold, min_sites=recipe.threshold,
                              max_sites=max(len(parties), recipe.threshold, 2), dp_colluders=recipe.colluders)
        cfg = plan.secagg_config(dim)
        codec = DistributedNoise.for_secagg(cfg, recipe.sigma, recipe.clip_norm,
                                            recipe.colluders if recipe.privacy == "distributed" else 0)
        extras = np.zeros(cfg.n_extras, np.int64)
    started = time.perf_counter()
    for _ in range(recipe.rounds):
        set_flat_params(head, weights)
        if recipe.privacy == "none" and center is not None and not head.centered:  # the same estimate, no noise
            grad = sum(clipped_round_sum(head, x, y, recipe.sample_rate, recipe.clip_norm, gen).vector
                       .astype(np.float64) for x, y in zip(xs, ys, strict=True))
            weights = server.apply(weights, grad, expected_batch, center, recipe.clip_norm)
        elif recipe.privacy == "none":
            grad = np.zeros(dim, np.float64)
            for x, y in zip(xs, ys, strict=True):
                idx = poisson_batch(len(y), recipe.sample_rate, gen)
                if len(idx):
                    head.zero_grad()
                    F.cross_entropy(head(x[idx]), y[idx], reduction="sum").backward()
                    grad += torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                                       for p in head.parameters()]).numpy()
            weights = server.apply(weights, grad, expected_batch, center, recipe.clip_norm)
        elif recipe.privacy == "central":  # one party: DP-SGD, Gaussian noise once
            grad = sum(clipped_round_sum(head, x, y, recipe.sample_rate, recipe.clip_norm, gen).vector
                       .astype(np.float64) for x, y in zip(xs, ys, strict=True))
            grad = grad + gaussian_noise(dim, recipe.sigma * recipe.clip_norm, rng)
            weights = server.apply(weights, grad, expected_batch, center, recipe.clip_norm)
        else:
            ring = np.zeros(cfg.vector_len, np.uint32)
            for x, y in zip(xs, ys, strict=True):
                vec = clipped_round_sum(head, x, y, recipe.sample_rate, recipe.clip_norm, gen).vector
                vec = vec.astype(np.float64)
                hook = None
                if recipe.privacy == "local":
                    vec += gaussian_noise(dim, recipe.sigma * recipe.clip_norm, rng)
                else:
                    hook = codec.noise_hook(rng)
                ring += quantize(cfg, codec.encode(vec, cfg.clip), cfg.max_weight, extras, rng, noise=hook)
            grad = codec.decode(ring[:dim])  # both modes: as core.fedsgd.server_round
            weights = server.apply(weights, grad, expected_batch, center, recipe.clip_norm)
    seconds = time.perf_counter() - started
    set_flat_params(head, weights)
    return RunResult(_accuracy(head, feats.test_x, feats.test_y), seconds, n_total)
