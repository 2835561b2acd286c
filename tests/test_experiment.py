"""`hemafed experiment`'s in-process federation and its results document, on small synthetic features
(the shape of `scatter_linear_28`'s fixed features, with a class signal a linear head can learn)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from hemafed.network.sim.experiment import ExperimentOptions, run_experiment
from hemafed.network.sim.inprocess import FeatureSet, Recipe, hospitals, run_fedsgd
from hemafed.network.sim.simulate import SimulationOptions


def synthetic(n_train: int = 800, n_test: int = 400, signal: float = 0.6, seed: int = 0) -> FeatureSet:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(8, 243, 3, 3, generator=gen)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % 8
        return centres[y] * signal + torch.randn(n, 243, 3, 3, generator=gen), y

    tx, ty = draw(n_train)
    vx, vy = draw(n_test)
    return FeatureSet("scatter_linear_28", tx, ty, vx, vy, 0.0)


def test_hospitals_split_like_the_simulation() -> None:
    labels = np.arange(1000) % 8
    parts = hospitals(labels, 5, "dirichlet:0.5", seed=3)
    flat = np.concatenate(parts)
    assert len(flat) == len(set(flat.tolist()))  # no record at two hospitals
    assert 850 < len(flat) < 950  # each hospital kept its 10 % validation hold-out back
    assert [len(p) for p in parts] != [len(p) for p in hospitals(labels, 5, "dirichlet:0.5", seed=4)]


def test_non_private_federation_learns_and_noise_costs_accuracy() -> None:
    feats = synthetic()
    parties = hospitals(feats.train_y.numpy(), 4, "iid", seed=0)
    clean = run_fedsgd(feats, parties, Recipe(60, 0.25, 0.05, privacy="none"), seed=0)
    assert clean.accuracy > 0.9
    assert clean.n_records == sum(len(p) for p in parties)
    distributed = run_fedsgd(feats, parties, Recipe(60, 0.25, 0.5, privacy="distributed", sigma=1.0, threshold=3,
                                                    colluders=1), seed=0)
    drowned = run_fedsgd(feats, parties, Recipe(60, 0.25, 0.5, privacy="local", sigma=200.0, threshold=3,
                                                colluders=0), seed=0)
    assert distributed.accuracy > 0.6  # the ring arithmetic and the Skellam shares keep the signal
    assert drowned.accuracy < distributed.accuracy  # σ = 200 per hospital buries it


def test_seeds_change_the_noise_but_a_seed_repeats_exactly() -> None:
    feats = synthetic(n_train=400, n_test=200)
    parties = hospitals(feats.train_y.numpy(), 3, "iid", seed=0)
    recipe = Recipe(15, 0.3, 0.5, privacy="distributed", sigma=3.0, threshold=2, colluders=1)
    a, b, c = (run_fedsgd(feats, parties, recipe, seed=s).accuracy for s in (0, 0, 1))
    assert a == b
    assert a != c


@pytest.mark.slow
def test_experiment_writes_every_section_and_the_plot(tmp_path: Path) -> None:
    feats = synthetic(n_train=600, n_test=200)
    opts = ExperimentOptions(seeds=(0, 1), epsilons=(8.0,), sweep=(4.0, 8.0), partitions=("dirichlet:0.5", "iid"),
                             sites=4, np_rounds=20, main_job=False, threads=1,
                             base=replace(SimulationOptions(), rounds=20))
    doc = tmp_path / "docs" / "RESULTS.md"
    rows = run_experiment(opts, tmp_path / "out", doc, "hemafed experiment --test", features=feats)
    settings = [(r.section, r.partition, r.epsilon) for r in rows]
    # central np + ε8; alone np + ε8; per partition: np + (local, distributed) × ε8; sweep: ε4 × 2 modes
    assert len(rows) == 2 + 2 + 2 * 3 + 2
    assert ("sweep", "dirichlet:0.5", 4.0) in settings
    assert all(len(r.accuracies) == 2 for r in rows)
    local = next(r for r in rows if r.section == "federated" and "local" in r.setting)
    distributed = next(r for r in rows if r.section == "federated" and "distributed" in r.setting)
    alone = next(r for r in rows if r.section == "alone" and r.epsilon == 8.0)
    assert local.sigma == alone.sigma  # both Gaussian at the same (ε, q, T)
    assert distributed.sigma >= local.sigma  # Skellam in the ring: its own calibration, never below Gaussian
    text = doc.read_text()
    assert "Incomplete" not in text
    assert "## Accuracy against ε" in text and "| 4 |" in text
    assert "± " in text and "hemafed experiment --test" in text
    assert (doc.parent / "results-epsilon.png").stat().st_size > 10_000
    assert (tmp_path / "out" / "results.json").exists()
