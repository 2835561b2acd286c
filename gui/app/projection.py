"""What the Privacy page shows for a plan: the site trainer's own projection
(`core.learning.site_trainer.SiteTrainer.project`), the very one the site driver checks when it
prepares the plan, so the page and the ledger cannot disagree. Pure Python, no Qt."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hemafed.core.rounds.plan import FederationPlan, SiteBounds

if TYPE_CHECKING:
    from hemafed.core.learning.site_trainer import Projection

# σ above this keeps a model from learning much (measured on the DP proxy, issue 9); the page warns rather than
# refuses.
NOISY_SIGMA = 4.0

__all__ = ["NOISY_SIGMA", "Projection", "project"]


def project(epsilon: float, plan: FederationPlan, n_train: int | None, *, bounds: SiteBounds | None = None,
            ledger=None) -> Projection:
    """This site's ε after each round still to come of `plan` at budget `epsilon`, on top of `ledger` (this
    federation's `LedgerView`, if the site has one); `n_train` None: no data chosen yet (an estimate). Runs in a
    worker: the trainer (and torch with it) is imported here, never while the window opens (start-up time)."""
    from hemafed.core.learning.site_trainer import site_trainer

    return site_trainer(plan, bounds=bounds).project(epsilon, n_train, ledger)
