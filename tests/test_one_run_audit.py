"""The one-run audit's bound (Steinke, Nasr & Jagielski 2023): its p-value against `jax_privacy`'s formula, exact
values where the bound has a closed form, and the two properties an audit needs — it never claims more than a
mechanism's true ε (checked on randomized response, which is exactly ε-DP per canary), and it gets close to ε
when the attack is optimal and the canaries many."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import expit
from scipy.stats import binom

from hemafed.core.privacy.one_run_audit import (
    epsilon_from_guesses,
    epsilon_lower_bound,
    guess_grid,
    log_likelihood_ratio,
    p_value,
)


def jax_privacy_p_value(m: int, n_guess: int, n_correct: int, eps: float, delta: float) -> float:
    """`jax_privacy.auditing._one_run_p_value` (google-deepmind/jax_privacy), restated with scipy: the reference."""
    q = expit(eps)
    beta = binom.sf(n_correct - 1, n_guess, q)
    if delta == 0:
        return float(beta)
    i = np.arange(1, n_correct + 1)
    alpha = np.max((binom.sf(n_correct - i - 1, n_guess, q) - beta) / i, initial=0)
    return float(min(beta + alpha * delta * 2 * m, 1))


@pytest.mark.parametrize("m, r, v", [(1000, 10, 10), (1000, 100, 80), (5000, 500, 300), (200, 100, 51),
                                     (2000, 37, 30)])
@pytest.mark.parametrize("eps", [0.0, 0.3, 1.0, 2.5, 6.0])
@pytest.mark.parametrize("delta", [0.0, 1e-5, 1e-3])
def test_p_value_is_jax_privacys(m: int, r: int, v: int, eps: float, delta: float) -> None:
    assert p_value(m, r, v, eps, delta) == pytest.approx(jax_privacy_p_value(m, r, v, eps, delta), rel=1e-12,
                                                         abs=1e-300)


def test_all_guesses_right_has_a_closed_form() -> None:
    # δ = 0, r = v: P = p^r ≤ β  ⇔  ε ≥ logit(β^(1/r))
    for r in (10, 100, 1000):
        p = 0.05 ** (1 / r)
        assert epsilon_from_guesses(5000, r, r, 0.0, 0.05) == pytest.approx(math.log(p / (1 - p)), abs=1e-5)


def test_the_bound_grows_with_right_guesses_and_shrinks_with_delta_and_confidence() -> None:
    base = epsilon_from_guesses(1000, 200, 160, 1e-5)
    assert 0 < base < epsilon_from_guesses(1000, 200, 180, 1e-5)
    assert epsilon_from_guesses(1000, 200, 160, 0.0) >= base >= epsilon_from_guesses(1000, 200, 160, 1e-3)
    assert epsilon_from_guesses(1000, 200, 160, 1e-5, beta=0.01) < base
    assert epsilon_from_guesses(1000, 200, 100, 1e-5) == 0.0  # half right: nothing is rejected


def randomized_response(eps: float, m: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Each canary's inclusion bit, told truthfully with probability e^ε/(1+e^ε): exactly ε-DP per canary, and
    the attack that guesses the told bit is optimal."""
    included = rng.random(m) < 0.5
    told = np.where(rng.random(m) < expit(eps), included, ~included)
    return told + 1e-3 * rng.random(m), included  # a tiny random tie-break, independent of inclusion


def test_never_more_than_the_true_epsilon_of_randomized_response() -> None:
    rng = np.random.default_rng(0)
    over = 0
    for eps in (0.5, 1.0, 2.0, 4.0):
        for _ in range(10):
            scores, included = randomized_response(eps, 2000, rng)
            over += epsilon_lower_bound(scores, included, delta=0.0).epsilon > eps
    assert over <= 2  # at 95 % confidence and Bonferroni over the grid: far fewer than 5 % in practice


def test_close_to_the_true_epsilon_with_many_canaries() -> None:
    rng = np.random.default_rng(1)
    scores, included = randomized_response(1.0, 20_000, rng)
    bound = epsilon_lower_bound(scores, included, delta=1e-5, grid=[10_000])
    assert 0.85 < bound.epsilon <= 1.0
    assert bound.guesses == 10_000 and bound.canaries == 20_000 and abs(bound.included - 10_000) < 400


def test_no_signal_gives_no_bound() -> None:
    rng = np.random.default_rng(2)
    bound = epsilon_lower_bound(rng.normal(size=3000), rng.random(3000) < 0.5, delta=1e-5)
    assert bound.epsilon < 0.3


def test_guess_grid() -> None:
    assert guess_grid(1000) == (10, 20, 40, 80, 160, 320)
    assert guess_grid(1) == (1,) and guess_grid(0) == () and guess_grid(50) == (1, 2, 4, 8, 16)
    with pytest.raises(ValueError):
        epsilon_lower_bound([1.0, 2.0], [True], 0.0)


def test_likelihood_ratio_ranks_a_present_dirac_canary_first() -> None:
    rng = np.random.default_rng(3)
    rounds, q, noise = 200, 0.2, 1.0
    present = (rng.random((rounds, 1)) < q).astype(float)
    z = np.hstack([present, np.zeros((rounds, 1))]) + rng.normal(0, noise, (rounds, 2))
    s = log_likelihood_ratio(z, q, noise)
    assert s.shape == (2,) and s[0] > s[1]
    # q = 1: the sum test
    assert log_likelihood_ratio(z, 1.0, 2.0) == pytest.approx((z - 0.5).sum(axis=0) / 4)
