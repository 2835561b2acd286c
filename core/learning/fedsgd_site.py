"""A site's DP-FedSGD state for one federation, as the site driver uses it.

Built once when the plan is accepted: the plan's privacy parameters (the same σ, q and
ring encoding at every site), the model's fixed features of every local training and
validation image (computed once: a round then costs one clipped gradient sum over the
small trainable head), and the ε this site will have spent after the plan's rounds —
refused up front when that passes the site's budget. Each round: evaluate the global
model on the local validation split, then `core.fedsgd.site_round` (budget check →
clipped gradient sum → durable ledger entry → ring encoding with this site's noise).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import HemafedError
from .fedsgd import SiteContribution, SitePrivacy, check_plan_budget, prepare_site, site_privacy, site_round


class RoundCancelled(HemafedError):
    """`stop()` came before the round's gradient was computed: nothing was recorded or sent."""


@dataclass
class FedSGDRound:
    contribution: SiteContribution
    confusion: np.ndarray
    epsilon_spent: float


class FedSGDSite:
    def __init__(self, plan, secagg_cfg, ledger, bounds, train_images: np.ndarray, train_labels: np.ndarray,
                 val_images: np.ndarray, val_labels: np.ndarray) -> None:
        from .models import build_model, evaluation_features, images_to_tensor

        self.plan, self.secagg_cfg, self.ledger = plan, secagg_cfg, ledger
        self.privacy: SitePrivacy = site_privacy(plan, secagg_cfg, bounds)
        remaining = max(plan.rounds - ledger.rounds, 0)
        self.projected_epsilon = check_plan_budget(self.privacy, ledger, remaining) if remaining else \
            ledger.spent_epsilon()
        model = build_model(plan.model, len(plan.classes))
        self.trainable, self.inputs = prepare_site(model, images_to_tensor(train_images, plan.input_size))
        self.labels = torch.as_tensor(np.asarray(train_labels), dtype=torch.long)
        # validation is evaluation: with the model's test-time augmentation (8 views, as classify)
        self.val_inputs = evaluation_features(model)(images_to_tensor(val_images, plan.input_size))
        self.val_labels = np.asarray(val_labels)
        self.n_params = sum(p.numel() for p in self.trainable.parameters())

    def epsilon_per_round(self) -> tuple[float, ...]:
        """ε after each of the plan's remaining rounds (the plan review's chart)."""
        acc = self.ledger.accountant()
        p = self.privacy
        start = self.ledger.rounds
        return tuple(acc.projected_epsilon(p.sigma, p.sample_rate, r, self.ledger.delta, skellam=p.skellam)
                     for r in range(1, self.plan.rounds - start + 1))

    def round(self, rnd: int, weights: np.ndarray, cancel: threading.Event | None = None) -> FedSGDRound:
        """One round's contribution; raises `BudgetExhausted` (nothing recorded) or `RoundCancelled`."""
        from .dp_train import evaluate
        from .models import set_flat_params

        set_flat_params(self.trainable, weights)
        confusion = evaluate(self.trainable, self.val_inputs, self.val_labels, len(self.plan.classes))
        if cancel is not None and cancel.is_set():
            raise RoundCancelled("stopped before the round's gradient")
        c = site_round(self.ledger, rnd, self.privacy, self.trainable, self.inputs, self.labels, weights,
                       self.secagg_cfg, extras=confusion.reshape(-1))
        return FedSGDRound(c, confusion, self.ledger.spent_epsilon())
