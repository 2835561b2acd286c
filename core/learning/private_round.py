"""One round at a site, in the order the privacy promise needs:

1. check the budget for the round's (σ, q, steps) → `BudgetExhausted` (decline);
2. train with DP-SGD from the global model;
3. record the spend in the ledger, durably;
4. only then hand the update to the caller, who may send it.

The network layer calls `train_private_round`; it never needs to touch the
accountant or the ledger's order of operations itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..privacy.calibration import sample_rate, steps_per_round
from ..privacy.ledger import LedgerEntry, PrivacyLedger
from .dp_train import CancelFlag, LocalResult, LocalTrainConfig, ProgressFn, train_local
from .models import model_hash


@dataclass
class PrivateRoundResult:
    result: LocalResult
    entry: LedgerEntry  # what the ledger now holds for this round

    @property
    def update(self) -> np.ndarray:
        return self.result.update


def train_private_round(
    ledger: PrivacyLedger,
    round_number: int,
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    config: LocalTrainConfig,
    noise_multiplier: float,
    *,
    seed: int | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelFlag | None = None,
) -> PrivateRoundResult:
    """Check, train, record; raises `BudgetExhausted` before any training when the round
    would pass the budget, and `TrainingCancelled` (nothing recorded, nothing to send)."""
    if not config.dp:
        raise ValueError("a federation round is always differentially private; config.dp is False")
    n = len(labels)
    q = sample_rate(n, config.batch_size)
    steps = steps_per_round(n, config.batch_size, config.local_epochs, config.local_steps)
    ledger.check_round(noise_multiplier, q, steps)
    start_hash = model_hash(model)
    result = train_local(model, images, labels, config, noise_multiplier=noise_multiplier, seed=seed,
                         progress=progress, cancel=cancel)
    # What was trained must be what is recorded: a mismatch would be an accounting bug.
    if (result.noise_multiplier, result.sample_rate, result.steps) != (float(noise_multiplier), q, steps):
        raise RuntimeError("trained (σ, q, steps) differ from the checked ones; refusing to record or send")
    entry = ledger.record_round(round_number, result.noise_multiplier, result.sample_rate, result.steps, start_hash)
    return PrivateRoundResult(result, entry)
