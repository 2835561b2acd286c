"""Centralised baseline: one dataset, one trainer, the reference rows of the
federation's comparison table (non-private, or DP with σ calibrated to a budget)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from ..data.bloodmnist import load_splits, locate
from ..privacy.calibration import steps_per_epoch
from ..rounds.plan import FederationPlan, SiteBounds
from .dp_train import accuracy, evaluate
from .models import build_model, get_flat_params, images_to_tensor, set_flat_params
from .site_trainer import FedAvgTrainer, SiteData


@dataclass
class CentralResult:
    model: str
    dp: bool
    epochs: int
    n_train: int
    n_test: int
    test_accuracy: float
    confusion: list[list[int]]
    epsilon: float | None  # spent, at `delta`; None for the non-private baseline
    delta: float | None
    sigma: float | None
    clip_norm: float | None
    batch_size: int
    lr: float
    seconds: float
    mean_loss: float = float("nan")  # over every training step

    @property
    def privacy_label(self) -> str:
        return f"DP (ε={self.epsilon:.3g}, δ={self.delta:.1e})" if self.dp else "NON-PRIVATE"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["privacy"] = self.privacy_label
        return data


def train_central(
    data: str | os.PathLike[str] | None = None,
    *,
    model_name: str = "resnet_gn_28",
    epochs: int = 12,
    epsilon: float | None = None,
    delta: float | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    clip_norm: float = 1.0,
    momentum: float = 0.9,
    train_subset: int | None = None,
    test_subset: int | None = None,
    seed: int = 0,
    epoch_done: Callable[[int, int], None] | None = None,
) -> CentralResult:
    """Train on BloodMNIST's train split, report accuracy on its test split.

    One party holding every training image, trained by the site trainer as a one-round FedAvg plan of
    `epochs` local epochs (`core.learning.site_trainer.FedAvgTrainer`): `epsilon` None trains non-private;
    otherwise σ is fitted so the epochs of Poisson-sampled DP-SGD spend at most `epsilon` at `delta` (default
    min(1e-5, 1/N)), and the spend is recorded in a ledger like any site's. Subsets (stratification not needed
    for a baseline) keep tests short.
    """
    import tempfile

    splits = load_splits(locate(data))
    rng = np.random.default_rng(seed)
    train, test = splits["train"], splits["test"]
    tr_idx = np.arange(len(train.labels)) if train_subset is None else rng.permutation(len(train.labels))[:train_subset]
    te_idx = np.arange(len(test.labels)) if test_subset is None else rng.permutation(len(test.labels))[:test_subset]
    n = len(tr_idx)
    dp = epsilon is not None
    # DP-SGD wants larger batches than plain SGD (the noise averages out over B); momentum
    # helps both (measured on a 4000-image subset, 3 epochs, σ=0.6: lr 0.5 + momentum 0.9
    # reached 48 % where lr 1.0 without momentum reached 30 %).
    batch_size = batch_size or (256 if dp else 128)
    lr = lr if lr is not None else (0.5 if dp else 0.05)
    plan = FederationPlan(federation_id="central", model=model_name, algorithm="fedavg", dp_mode="local",
                          noise_multiplier=0.0, rounds=1, local_epochs=epochs, batch_size=batch_size, lr=lr,
                          momentum=momentum, clip_norm=clip_norm, dp=dp, secagg=False, min_sites=1,
                          delta=delta or 1e-5, seed=seed, max_weight=max(n, 1))  # ledger δ: ≤ 1/N too
    bounds = SiteBounds(require_dp=False, require_secagg=False, max_local_epochs=max(epochs, 1), max_delta=1.0,
                        max_clip_norm=max(clip_norm, 1.0))
    trainer = FedAvgTrainer(plan, bounds=bounds, seed=seed)
    empty = np.zeros((0, *train.images.shape[1:]), np.uint8)
    site = SiteData(train.images[tr_idx], train.labels[tr_idx].reshape(-1), empty, np.zeros(0, np.int64))
    model = build_model(model_name, seed=seed)
    start = time.perf_counter()
    per_epoch = steps_per_epoch(n, batch_size)

    def progress(step: int, total: int, left: float | None) -> None:
        if epoch_done is not None and step % per_epoch == 0:
            epoch_done(step // per_epoch, epochs)

    with tempfile.TemporaryDirectory() as state:
        ledger = trainer.open_ledger(state, float(epsilon), n, create=True) if dp else None
        proj = trainer.prepare(ledger, site, float(epsilon) if dp else 1.0)
        outcome = trainer.contribution(1, get_flat_params(model), progress=progress)
        set_flat_params(model, get_flat_params(model) + outcome.update)
        spent = ledger.spent_epsilon() if ledger is not None else None
        delta = ledger.delta if ledger is not None else None
    cm = evaluate(model, images_to_tensor(test.images[te_idx], plan.input_size), test.labels[te_idx], num_classes=8)
    return CentralResult(
        model=model_name, dp=dp, epochs=epochs, n_train=n, n_test=len(te_idx), test_accuracy=accuracy(cm),
        confusion=cm.tolist(), epsilon=spent, delta=delta, sigma=proj.sigma if dp else None,
        clip_norm=clip_norm if dp else None, batch_size=batch_size, lr=lr, seconds=time.perf_counter() - start,
        mean_loss=outcome.loss)
