"""Local training at a site: DP-SGD (or a non-private baseline) from the global model.

DP-SGD here is: Poisson sampling at q = B/N (each record joins each step's batch
independently with probability q), per-sample gradients clipped to L2 norm C,
Gaussian noise N(0, σ²C²) added to the clipped sum, division by the *expected*
batch size B, then an SGD(+momentum) step. Every step adds noise, including a
step whose Poisson batch came out empty, because the accountant counts it.

`train_local` does no accounting: it returns (σ, q, steps) and the caller records
them in the site's `PrivacyLedger` before the update leaves the site. No Opacus
`PrivacyEngine` is created, so there is no hidden per-call accountant to mistake
for the real one.

The noise must be unpredictable to anyone but the site: leave `seed` and
`noise_seed` as None in production (fresh OS randomness); they exist so tests and
benchmarks can reproduce a run.
"""

from __future__ import annotations

import math
import secrets
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import HemafedError
from ..privacy.calibration import sample_rate as poisson_rate
from ..privacy.calibration import steps_per_round
from .models import get_flat_params, images_to_tensor
from .per_sample import EngineName, make_clipper

ProgressFn = Callable[[int, int, float], None]  # (step done, total steps, loss of that step)


class CancelFlag(Protocol):
    def is_set(self) -> bool: ...


class TrainingCancelled(HemafedError):
    """Training stopped between steps because `cancel` was set; no update exists, nothing to record."""


@dataclass
class LocalTrainConfig:
    """How a site trains in one round (the plan's part that concerns local training)."""

    local_epochs: int = 1
    local_steps: int | None = None  # fixes the step count instead of epochs × ⌈N/B⌉
    batch_size: int = 64  # expected batch size B; q = B/N
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    clip_norm: float = 1.0  # C
    dp: bool = True  # False: non-private baseline (no clipping, no noise), reported as such
    engine: EngineName = "bk"  # per-sample gradient engine: "bk" (book-keeping) or "hooks" (Opacus)
    eval_batch_size: int = 512

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LocalResult:
    """What one round of local training produced.

    `update` is Δ = w_local − w_global over `model.parameters()` (float32). For DP
    runs, (noise_multiplier, sample_rate, steps) is exactly what the ledger must
    record; `dp` False marks a non-private baseline, which has no ε at all.
    """

    update: np.ndarray
    steps: int
    sample_rate: float
    noise_multiplier: float
    clip_norm: float
    mean_loss: float
    n_samples: int
    dp: bool
    mean_batch_size: float

    @property
    def privacy_label(self) -> str:
        return f"DP (σ={self.noise_multiplier:.4g}, C={self.clip_norm:g})" if self.dp else "NON-PRIVATE"


def as_input_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Float NCHW tensors pass through; uint8 NHWC arrays are normalised at their own size."""
    if isinstance(images, torch.Tensor):
        return images.float()

    return images_to_tensor(images, images.shape[1])


def _generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(secrets.randbits(63) if seed is None else int(seed))
    return gen


def _sum_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels, reduction="sum")


def train_local(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    config: LocalTrainConfig,
    *,
    noise_multiplier: float,
    seed: int | None = None,
    noise_seed: int | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelFlag | None = None,
) -> LocalResult:
    """Train `model` in place from its current (global) weights; return the update.

    `images` are uint8 NHWC at the model's input size or a prepared float NCHW tensor.
    `seed` drives batch sampling, `noise_seed` the Gaussian noise (by default
    derived from `seed`; both None means OS randomness). `cancel` is checked between
    steps; when set, `TrainingCancelled` is raised and nothing should be recorded or
    sent. With `config.dp` False, `noise_multiplier` is ignored and the result is
    labelled non-private.
    """
    x = as_input_tensor(images)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    n = len(y)
    if n == 0 or len(x) != n:
        raise ValueError(f"need matching non-empty images and labels, got {len(x)} and {n}")
    if config.dp and not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise multiplier must be finite and ≥ 0, got {noise_multiplier}")
    if config.clip_norm <= 0:
        raise ValueError("clip norm must be positive")
    q = poisson_rate(n, config.batch_size)
    expected_batch = q * n
    steps = steps_per_round(n, config.batch_size, config.local_epochs, config.local_steps)
    if seed is None:
        seed = secrets.randbits(63)
    if noise_seed is None:
        noise_seed = int(np.random.SeedSequence([int(seed), 1]).generate_state(1, np.uint64)[0] >> 1)
    sample_gen, noise_gen = _generator(seed), _generator(noise_seed)

    start = get_flat_params(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.dp:
        from opacus.validators import ModuleValidator

        errors = ModuleValidator.validate(model, strict=False)
        if errors:  # e.g. BatchNorm mixes samples: per-sample clipping would not bound sensitivity
            raise ValueError(f"model is not DP-compatible: {errors}")
    clipper = make_clipper(model, config.engine) if config.dp else None
    sigma = float(noise_multiplier) if config.dp else 0.0
    losses: list[float] = []
    seen = 0
    try:
        with clipper if clipper is not None else _Null():
            for step in range(steps):
                if cancel is not None and cancel.is_set():
                    raise TrainingCancelled(f"cancelled after {step} of {steps} steps")
                idx = torch.nonzero(torch.rand(n, generator=sample_gen) < q).view(-1)
                seen += len(idx)
                xb, yb = x[idx], y[idx]
                opt.zero_grad(set_to_none=True)
                if clipper is not None:
                    if len(idx):
                        grads, _, loss_sum = clipper.clipped_sum(xb, yb, _sum_ce, config.clip_norm)
                    else:
                        grads, loss_sum = [torch.zeros_like(p) for p in params], 0.0
                    for p, g in zip(params, grads, strict=True):
                        if sigma > 0:
                            g = g + torch.normal(0.0, sigma * config.clip_norm, size=g.shape, generator=noise_gen)
                        p.grad = g / expected_batch
                elif len(idx):
                    loss = _sum_ce(model(xb), yb)
                    (loss / len(idx)).backward()
                    loss_sum = float(loss.detach())
                else:
                    loss_sum = 0.0  # no gradients: SGD leaves every parameter as it is
                opt.step()
                step_loss = loss_sum / max(1, len(idx))
                losses.append(step_loss)
                if progress is not None:
                    progress(step + 1, steps, step_loss)
    finally:
        if clipper is not None:
            clipper.close()
    update = (get_flat_params(model) - start).astype(np.float32)
    return LocalResult(update=update, steps=steps, sample_rate=q, noise_multiplier=sigma,
                       clip_norm=config.clip_norm, mean_loss=float(np.mean(losses)) if losses else float("nan"),
                       n_samples=n, dp=config.dp, mean_batch_size=seen / steps)


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class LocalTrainingJob:
    """`train_local` on a worker thread: the GUI or event loop keeps running.

    `future` resolves to the `LocalResult` (or raises `TrainingCancelled`);
    `cancel()` stops between steps. torch releases the GIL in its kernels, so a
    thread suffices.
    """

    def __init__(self, *args, **kwargs) -> None:
        self.cancel_event = threading.Event()
        kwargs["cancel"] = self.cancel_event
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hemafed-train")
        self.future: Future[LocalResult] = self._pool.submit(train_local, *args, **kwargs)
        self._pool.shutdown(wait=False)

    def cancel(self) -> None:
        self.cancel_event.set()

    def result(self, timeout: float | None = None) -> LocalResult:
        return self.future.result(timeout)


@torch.no_grad()
def evaluate(model: nn.Module, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
             num_classes: int = 8, batch_size: int = 512) -> np.ndarray:
    """Confusion matrix (int64, rows = true class, columns = predicted)."""
    x = as_input_tensor(images)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    was_training = model.training
    model.eval()
    cm = torch.zeros(num_classes * num_classes, dtype=torch.int64)
    for i in range(0, len(y), batch_size):
        pred = model(x[i:i + batch_size]).argmax(dim=1)
        cm += torch.bincount(y[i:i + batch_size] * num_classes + pred, minlength=num_classes * num_classes)
    model.train(was_training)
    return cm.view(num_classes, num_classes).numpy()


def accuracy(confusion: np.ndarray) -> float:
    """Fraction correct from a confusion matrix (0.0 when empty)."""
    total = int(confusion.sum())
    return float(np.trace(confusion)) / total if total else 0.0
