"""From the operator's budget to a noise multiplier, and back.

A site's whole participation is one composition: `rounds × steps_per_round` steps of
the subsampled Gaussian mechanism at rate q = B/N. Calibration picks the smallest σ
(to a relative precision of 1e-3) whose ε over the whole plan stays within the
budget, so the plan fits before the first round runs; `max_rounds` answers the
reverse question for a given σ.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from ..errors import HemafedError
from .accounting import Accountant, AccountantKind, Entry, check_kind

# Above this σ the mechanism is so noisy that no model would learn; a budget that
# needs more is refused rather than silently met with a useless plan.
MAX_SIGMA = 1000.0
SIGMA_RTOL = 1e-3


class BudgetTooSmall(HemafedError, ValueError):
    """No noise multiplier up to `MAX_SIGMA` makes the plan fit the budget."""


def sample_rate(n_samples: int, batch_size: int) -> float:
    """Poisson sampling rate q = B/N (capped at 1)."""
    if n_samples <= 0 or batch_size <= 0:
        raise ValueError("samples and batch size must be positive")
    return min(1.0, batch_size / n_samples)


def steps_per_epoch(n_samples: int, batch_size: int) -> int:
    """Steps that visit N records in expectation at q = B/N: ⌈N/B⌉ (never under-counts)."""
    return max(1, math.ceil(n_samples / batch_size))


def steps_per_round(n_samples: int, batch_size: int, local_epochs: int = 1, local_steps: int | None = None) -> int:
    """Local DP-SGD steps in one round: `local_steps` when a plan fixes them, else epochs × ⌈N/B⌉."""
    if local_steps is not None:
        if local_steps <= 0:
            raise ValueError("local steps must be positive")
        return int(local_steps)
    if local_epochs <= 0:
        raise ValueError("local epochs must be positive")
    return local_epochs * steps_per_epoch(n_samples, batch_size)


def _epsilon(kind: AccountantKind, prior: list[Entry], sigma: float, q: float, steps: int, delta: float,
             skellam: tuple[float, float] | None = None) -> float:
    acc = Accountant(kind, prior)
    acc.step(sigma, q, steps, skellam=skellam)
    return acc.epsilon(delta)


def calibrate_sigma(epsilon: float, delta: float, sample_rate: float, steps: int, *,
                    kind: AccountantKind = "rdp", prior: Iterable[Entry] = (),
                    skellam: tuple[float, float] | None = None) -> float:
    """Smallest σ (within relative 1e-3, rounded up) such that `steps` more steps at
    (σ, q) on top of `prior` history keep ε(δ) ≤ `epsilon`. `skellam` = (Δ₂, Δ₁)
    calibrates distributed-DP Skellam noise instead of Gaussian noise."""
    check_kind(kind)
    prior = list(prior)
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon budget must be a positive number, got {epsilon}")
    if steps <= 0:
        raise ValueError("steps must be positive")
    if prior and Accountant(kind, prior).epsilon(delta) >= epsilon:
        raise BudgetTooSmall(f"the budget ε={epsilon:g} is already spent")
    lo, hi = 0.0, 1.0
    while _epsilon(kind, prior, hi, sample_rate, steps, delta, skellam) > epsilon:
        lo, hi = hi, hi * 2
        if hi > MAX_SIGMA:
            raise BudgetTooSmall(f"ε={epsilon:g} at δ={delta:g} would need σ > {MAX_SIGMA:g} "
                                 f"for {steps} steps at q={sample_rate:.4g}")
    while hi - lo > SIGMA_RTOL * hi:
        mid = (lo + hi) / 2
        if _epsilon(kind, prior, mid, sample_rate, steps, delta, skellam) > epsilon:
            lo = mid
        else:
            hi = mid
    return hi


def max_rounds(sigma: float, epsilon: float, delta: float, sample_rate: float, steps_per_round: int, *,
               kind: AccountantKind = "rdp", prior: Iterable[Entry] = (), limit: int = 100_000,
               skellam: tuple[float, float] | None = None) -> int:
    """How many whole rounds of `steps_per_round` steps at (σ, q) fit the budget (0 if none)."""
    check_kind(kind)
    prior = list(prior)
    if sigma <= 0:
        return 0

    def fits(rounds: int) -> bool:
        return _epsilon(kind, prior, sigma, sample_rate, rounds * steps_per_round, delta, skellam) <= epsilon

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > limit:
            return limit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
