"""A site's round: budget check, DP training, durable record, in that order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hemafed.core.learning.dp_train import LocalTrainConfig, TrainingCancelled
from hemafed.core.learning.models import build_model, model_hash
from hemafed.core.learning.private_round import train_private_round
from hemafed.core.privacy.ledger import BudgetExhausted, PrivacyLedger


def _data(n: int = 32) -> tuple[torch.Tensor, np.ndarray]:
    return torch.randn(n, 3, 28, 28, generator=torch.Generator().manual_seed(0)), np.arange(n) % 8


def test_round_records_what_it_trained(tmp_path) -> None:
    ledger = PrivacyLedger("fed", 50.0, 1e-5, state=tmp_path)
    model = build_model("cnn4_28", seed=0)
    global_hash = model_hash(model)
    x, y = _data()
    cfg = LocalTrainConfig(batch_size=8, local_epochs=1)
    out = train_private_round(ledger, 1, model, x, y, cfg, 1.2, seed=0)
    assert out.entry.round == 1 and out.entry.model_hash == global_hash
    assert (out.entry.sigma, out.entry.sample_rate, out.entry.steps) == (1.2, 0.25, 4)
    assert PrivacyLedger("fed", state=tmp_path).spent_epsilon() == pytest.approx(out.entry.epsilon)
    assert out.update.shape == (sum(p.numel() for p in model.parameters()),)


def test_exhausted_budget_declines_before_training(tmp_path) -> None:
    ledger = PrivacyLedger("fed", 0.5, 1e-5, state=tmp_path)
    model = build_model("cnn4_28", seed=0)
    before = model_hash(model)
    x, y = _data()
    with pytest.raises(BudgetExhausted):
        train_private_round(ledger, 1, model, x, y, LocalTrainConfig(batch_size=8), 0.5, seed=0)
    assert model_hash(model) == before and ledger.rounds == 0


def test_cancelled_round_records_nothing(tmp_path) -> None:
    ledger = PrivacyLedger("fed", 50.0, 1e-5, state=tmp_path)
    x, y = _data()

    class Always:
        def is_set(self) -> bool:
            return True

    with pytest.raises(TrainingCancelled):
        train_private_round(ledger, 1, build_model("cnn4_28"), x, y, LocalTrainConfig(batch_size=8), 1.0,
                            cancel=Always())
    assert PrivacyLedger("fed", state=tmp_path).rounds == 0


def test_non_private_config_is_refused(tmp_path) -> None:
    ledger = PrivacyLedger("fed", 50.0, 1e-5, state=tmp_path)
    x, y = _data()
    with pytest.raises(ValueError):
        train_private_round(ledger, 1, build_model("cnn4_28"), x, y, LocalTrainConfig(dp=False), 1.0)
