"""What the Privacy page shows for a plan, computed exactly as the site driver will
(`network.site.SiteRunner.prepare`): σ fitted so the rounds still to come, on top of what
this federation's ledger already holds, stay within the budget. Pure Python, no Qt."""

from __future__ import annotations

from dataclasses import dataclass, field

from hemafed.core.privacy.accounting import Accountant
from hemafed.core.privacy.calibration import (
    MAX_SIGMA,
    BudgetTooSmall,
    calibrate_sigma,
    max_rounds,
    sample_rate,
    steps_per_round,
)
from hemafed.core.rounds.plan import FederationPlan, SiteBounds

# σ above this keeps a small CNN from learning much (measured on the DP proxy, issue 9);
# the page warns rather than refuses.
NOISY_SIGMA = 4.0


@dataclass
class Projection:
    epsilon: float
    delta: float
    n_train: int
    n_estimated: bool  # True when no data is loaded yet and n_train is a placeholder
    rounds: int  # the plan's rounds
    rounds_done: int  # already in this federation's ledger
    spent: float  # ε already spent in this federation
    sigma: float | None = None
    sample_rate: float = 0.0
    steps_per_round: int = 0
    epsilon_per_round: list[float] = field(default_factory=list)  # cumulative ε after each round to come
    rounds_allowed: int = 0
    refusal: str | None = None  # why Join is refused; None when the plan fits
    mechanism: str = "gaussian"  # "skellam" for a distributed-DP plan
    from_driver: bool = False  # ε per round as the site driver computed it for the plan it received

    @property
    def fits(self) -> bool:
        return self.refusal is None


def project(epsilon: float, plan: FederationPlan, n_train: int | None, *, bounds: SiteBounds | None = None,
            ledger: dict | None = None, ledger_entries: list | None = None, accountant: str = "rdp",
            driver_epsilon: tuple[float, ...] = ()) -> Projection:
    """`ledger`: this federation's ledger summary (`PrivacyLedger.summary()`), if one exists.
    `driver_epsilon`: ε after each round still to come as the site driver computed it for a
    DP-FedSGD plan it received (`PlanReceived.epsilon_per_round`); used as is when given."""
    estimated = not n_train
    n = n_train or 2000
    delta = float(ledger["delta"]) if ledger else min(plan.delta, 1.0 / n)
    done = int(ledger["rounds"]) if ledger else 0
    spent = float(ledger["spent_epsilon"]) if ledger else 0.0
    proj = Projection(epsilon=epsilon, delta=delta, n_train=n, n_estimated=estimated, rounds=plan.rounds,
                      rounds_done=done, spent=spent)
    reasons = (bounds or SiteBounds()).violations(plan)
    if reasons:
        proj.refusal = "the plan is outside what this site accepts: " + "; ".join(reasons)
        return proj
    if not plan.dp:
        proj.refusal = "the plan is non-private"  # only reachable with require_dp off
        return proj
    if ledger and float(ledger["budget_epsilon"]) != epsilon:
        stored = float(ledger["budget_epsilon"])
        proj.refusal = (f"this federation's ledger was opened with budget ε = {stored:g}; "
                        f"a budget of {epsilon:g} cannot replace it (set ε back to {stored:g})")
        return proj
    if plan.algorithm == "fedsgd":
        return _project_fedsgd(proj, plan, ledger_entries or [], accountant, driver_epsilon)
    if n < plan.batch_size and not estimated:
        proj.refusal = f"only {n} training images, fewer than the plan's batch size {plan.batch_size}"
        return proj
    q = sample_rate(n, plan.batch_size)
    steps = steps_per_round(n, plan.batch_size, plan.local_epochs)
    proj.sample_rate, proj.steps_per_round = q, steps
    prior = [(e.sigma, e.sample_rate, e.steps) for e in (ledger_entries or [])]
    remaining = max(plan.rounds - done, 1)
    try:
        sigma = calibrate_sigma(epsilon, delta, q, steps * remaining, kind=accountant, prior=prior)  # type: ignore[arg-type]
    except BudgetTooSmall as exc:
        proj.rounds_allowed = max_rounds(MAX_SIGMA, epsilon, delta, q, steps, kind=accountant, prior=prior)  # type: ignore[arg-type]
        proj.refusal = (f"the budget is too small for this plan: {exc}. Even at the most noise allowed "
                        f"(σ = {MAX_SIGMA:g}) it covers {proj.rounds_allowed} of {remaining} rounds")
        return proj
    proj.sigma = sigma
    acc = Accountant(accountant, prior)  # type: ignore[arg-type]
    for _ in range(remaining):
        acc.step(sigma, q, steps)
        proj.epsilon_per_round.append(acc.epsilon(delta))
    proj.rounds_allowed = remaining
    return proj


def _project_fedsgd(proj: Projection, plan: FederationPlan, entries: list, accountant: str,
                    driver_epsilon: tuple[float, ...]) -> Projection:
    """A DP-FedSGD plan fixes σ and q for every site (one step per round): nothing is fitted
    here; the budget either covers the plan's rounds at that σ or the site refuses it."""
    proj.sigma, proj.sample_rate, proj.steps_per_round = plan.noise_multiplier, plan.sample_rate, 1
    proj.mechanism = "skellam" if plan.dp_mode == "distributed" else "gaussian"
    remaining = max(plan.rounds - proj.rounds_done, 0)
    if driver_epsilon:
        proj.epsilon_per_round, proj.from_driver = list(driver_epsilon), True
    elif plan.noise_multiplier > 0:
        from hemafed.core.learning.fedsgd import site_privacy
        from hemafed.core.learning.models import build_model

        dim = sum(p.numel() for p in build_model(plan.model, len(plan.classes)).parameters())
        privacy = site_privacy(plan, plan.secagg_config(dim))
        acc = Accountant(accountant, [e.accountant_entry() for e in entries])  # type: ignore[arg-type]
        proj.epsilon_per_round = [acc.projected_epsilon(privacy.sigma, privacy.sample_rate, r, proj.delta,
                                                        skellam=privacy.skellam) for r in range(1, remaining + 1)]
    else:
        proj.refusal = "the plan has no noise multiplier σ"
        return proj
    proj.rounds_allowed = sum(1 for e in proj.epsilon_per_round if e <= proj.epsilon)
    if proj.epsilon_per_round and proj.epsilon_per_round[-1] > proj.epsilon:
        proj.refusal = (f"the budget is too small for this plan: its {len(proj.epsilon_per_round)} rounds at the "
                        f"federation's noise σ = {plan.noise_multiplier:.3g} would spend ε = "
                        f"{proj.epsilon_per_round[-1]:.3g}, more than this site's budget {proj.epsilon:g}; "
                        f"the budget covers {proj.rounds_allowed} of them")
    return proj
