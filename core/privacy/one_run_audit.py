"""The one-run privacy audit's statistics: from canary scores to a lower bound ε̂ on ε.

Steinke, Nasr & Jagielski 2023, "Privacy Auditing with One (1) Training Run" (arXiv 2305.08846). m canaries
are each put into the training data independently with probability ½; after one training run an attacker
scores every canary from what it is allowed to see, and guesses "included" for the r best-scored ones. If the
training is (ε, δ)-DP with respect to each canary, the number W of right guesses among the r satisfies
(their Theorem 3 / Proposition 5)

    P[W ≥ v] ≤ f(v) + 2·m·δ · max_{1 ≤ i ≤ v} (f(v − i) − f(v)) / i,    f(v) = P[Binomial(r, e^ε/(1+e^ε)) ≥ v].

A run whose v right guesses would be that unlikely (≤ β) under a claimed ε rejects the claim; ε̂, the largest
ε rejected at confidence 1 − β, is a lower bound: with probability ≥ 1 − β the training's true ε is at least ε̂
(whatever the attacker did, however the scores were made). `jax_privacy.auditing` implements the same
p-value (`_one_run_p_value`), which `tests/test_one_run_audit.py` checks against.

The number of guesses r is not known in advance: `epsilon_lower_bound` tries a fixed grid of r (six values
between 1 % and 32 % of the canaries) and divides β among them (Bonferroni), so the bound keeps its confidence
whichever r turns out best. Note the δ term: it grows with m (2mδ), so more canaries are not always better —
at δ = 10⁻⁵ a few thousand is where it stops paying.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq
from scipy.special import expit
from scipy.stats import binom

__all__ = ["AuditBound", "epsilon_from_guesses", "epsilon_lower_bound", "guess_grid", "log_likelihood_ratio", "p_value"]


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Upper bound on P[≥ v right of r guesses] over m canaries for an (ε, δ)-DP training (see the module)."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 ≤ v ≤ r ≤ m, got v={v}, r={r}, m={m}")
    if v == 0:
        return 1.0
    p = float(expit(epsilon))
    tail = float(binom.sf(v - 1, r, p))
    if delta == 0:
        return tail
    i = np.arange(1, v + 1)
    spread = (binom.sf(v - i - 1, r, p) - tail) / i
    return min(1.0, tail + 2 * m * delta * max(float(spread.max()), 0.0))


def epsilon_from_guesses(m: int, r: int, v: int, delta: float, beta: float = 0.05) -> float:
    """The largest ε whose (ε, δ) claim `v` right of `r` guesses rejects at level `beta` (0.0: none)."""
    if r == 0 or p_value(m, r, v, 0.0, delta) > beta:
        return 0.0

    def rejected(eps: float) -> float:  # > 0 while the claim ε is rejected
        return beta - p_value(m, r, v, eps, delta)

    lo, hi = 0.0, 1.0
    while rejected(hi) > 0:
        lo, hi = hi, 2 * hi
        if hi > 1e3:  # every guess right and δ = 0: no finite ε survives; cap the bound
            return float(hi)
    return float(brentq(rejected, lo, hi, xtol=1e-6))


GRID_FRACTIONS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32)


def guess_grid(m: int) -> tuple[int, ...]:
    """The guess counts r tried for m canaries: 1, 2, 4, 8, 16 and 32 % of m. Few points, because β is divided
    among them; doubling steps, because the best r is not known in advance (a weak attack is best with its few
    most confident guesses, a strong one with many); never above a third, where guesses are mostly coin flips."""
    return tuple(sorted({max(1, round(f * m)) for f in GRID_FRACTIONS})) if m >= 1 else ()


@dataclass(frozen=True)
class AuditBound:
    """ε̂ and how it was reached: the best of the grid's guess counts (Bonferroni over the grid)."""

    epsilon: float  # ε̂: the lower bound on ε, at confidence 1 − beta
    canaries: int  # m
    included: int  # how many canaries were in fact included (about m/2)
    guesses: int  # r of the best grid point
    correct: int  # v of the best grid point
    beta: float
    delta: float

    @property
    def confidence(self) -> float:
        return 1.0 - self.beta

    def to_dict(self) -> dict:
        return {"epsilon_lower_bound": self.epsilon, "canaries": self.canaries, "included": self.included,
                "guesses": self.guesses, "correct": self.correct, "confidence": self.confidence,
                "delta": self.delta}


def epsilon_lower_bound(scores: Sequence[float], included: Sequence[bool], delta: float, beta: float = 0.05,
                        grid: Sequence[int] | None = None) -> AuditBound:
    """ε̂ from the attacker's `scores` (higher: more likely included) and the truth `included`, guessing
    "included" for the r best-scored canaries for each r of `grid` (default `guess_grid`), at confidence
    1 − `beta` overall. Ties are broken by canary order, which is independent of inclusion."""
    s = np.asarray(scores, np.float64)
    truth = np.asarray(included, bool)
    if s.shape != truth.shape or s.ndim != 1:
        raise ValueError("scores and included must be 1-D arrays of the same length")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    m = len(s)
    grid = tuple(guess_grid(m) if grid is None else grid)
    order = np.argsort(-s, kind="stable")
    right = np.cumsum(truth[order])
    best = AuditBound(0.0, m, int(truth.sum()), 0, 0, beta, delta)
    for r in grid:
        if not 1 <= r <= m:
            raise ValueError(f"a guess count must be in [1, {m}], got {r}")
        v = int(right[r - 1])
        eps = epsilon_from_guesses(m, r, v, delta, beta / len(grid))
        if eps > best.epsilon:
            best = AuditBound(eps, m, int(truth.sum()), r, v, beta, delta)
    return best


def log_likelihood_ratio(z: np.ndarray, q: float, noise: float) -> np.ndarray:
    """Per-canary score from its observations z (rounds × canaries, in units of the canary's size): the log
    likelihood ratio of "included" (each round present with probability q, adding 1) against "not", under
    Gaussian noise of standard deviation `noise` — the optimal test for a Poisson-sampled Dirac canary."""
    if not 0 < q <= 1 or not noise > 0:
        raise ValueError("need 0 < q ≤ 1 and noise > 0")
    a = (np.asarray(z, np.float64) - 0.5) / (noise * noise)
    if q == 1:
        return a.sum(axis=0)
    return np.logaddexp(math.log1p(-q), math.log(q) + a).sum(axis=0)
