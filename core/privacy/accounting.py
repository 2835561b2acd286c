"""Privacy accounting that lives across rounds.

Shaped like Opacus' `IAccountant`: the state is only what the mechanism was given,
a history of (noise_multiplier σ, sample_rate q, steps); ε is derived on demand for
a δ. One `Accountant` exists per (site, federation) and is rebuilt from the ledger,
never re-created empty per round (the trap of calling Opacus `make_private` each
round, which starts a fresh accountant every time and under-reports the spend).

The maths is Opacus' (`opacus.accountants.RDPAccountant` / `PRVAccountant`), fed
with our history on each query; we never let Opacus' optimizer hooks step an
accountant for us.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable
from typing import Literal

from .distributed_noise import ORDERS, skellam_rdp

AccountantKind = Literal["rdp", "prv"]
KINDS: tuple[str, ...] = ("rdp", "prv")
DEFAULT_DELTA = 1e-5
# PRV needs an error budget on ε; 0.01 is Opacus' default and stays well inside the
# 1 % we promise operators.
PRV_EPS_ERROR = 0.01

# (σ, q, steps): Poisson-subsampled Gaussian; (σ, q, steps, Δ₂, Δ₁): Poisson-subsampled Skellam in the
# secure-aggregation ring (core.distributed_noise), σ relative to the integer L2 sensitivity Δ₂.
Entry = tuple


def default_delta(n_samples: int | None) -> float:
    """δ = 1e-5, or 1/N when that is smaller (sites with more than 100 000 records):
    δ must not exceed 1/N, or releasing one record outright would fit the guarantee."""
    if n_samples is None or n_samples <= 0:
        return DEFAULT_DELTA
    return min(DEFAULT_DELTA, 1.0 / n_samples)


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown accountant {kind!r}; choose one of {', '.join(KINDS)}")


def _check_entry(sigma: float, q: float, steps: int, *skellam: float) -> Entry:
    if len(skellam) not in (0, 2) or any(not (float(v) > 0 and math.isfinite(float(v))) for v in skellam):
        raise ValueError(f"a Skellam entry needs positive finite sensitivities (Δ₂, Δ₁), got {skellam!r}")
    sigma, q = float(sigma), float(q)
    if isinstance(steps, bool) or int(steps) != steps:
        raise ValueError(f"steps must be an integer, got {steps!r}")
    steps = int(steps)
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"noise multiplier must be a finite number ≥ 0, got {sigma}")
    if not math.isfinite(q) or not 0 < q <= 1:
        raise ValueError(f"sample rate must be in (0, 1], got {q}")
    if steps < 0:
        raise ValueError(f"steps must be ≥ 0, got {steps}")
    return (sigma, q, steps, *(float(v) for v in skellam))


class Accountant:
    """History of (σ, q, steps) with ε computed on demand.

    `kind` is "rdp" (default, Rényi DP with Opacus' orders) or "prv" (privacy loss
    random variables, tighter). A step with σ = 0 has no privacy: ε is infinite.
    """

    def __init__(self, kind: AccountantKind = "rdp", history: Iterable[Entry] = ()) -> None:
        check_kind(kind)
        self.kind: AccountantKind = kind
        self.history: list[Entry] = []
        for entry in history:
            sigma, q, steps, *skellam = entry
            self.step(sigma, q, steps, skellam=tuple(skellam) or None)

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1, *,
             skellam: tuple[float, float] | None = None) -> None:
        """Record `steps` noisy steps; consecutive identical mechanisms are merged as Opacus does.

        `skellam` = (Δ₂, Δ₁) marks Skellam noise in the ring (distributed DP) with those integer
        sensitivities; σ is then relative to Δ₂ and ε uses the Skellam RDP bound."""
        sigma, q, steps, *extra = _check_entry(noise_multiplier, sample_rate, steps, *(skellam or ()))
        if steps == 0:
            return
        last = self.history[-1] if self.history else None
        if last is not None and (last[0], last[1], *last[3:]) == (sigma, q, *extra):
            self.history[-1] = (sigma, q, last[2] + steps, *extra)
        else:
            self.history.append((sigma, q, steps, *extra))

    def __len__(self) -> int:
        return sum(entry[2] for entry in self.history)

    def copy(self) -> Accountant:
        return Accountant(self.kind, list(self.history))

    def epsilon(self, delta: float = DEFAULT_DELTA) -> float:
        """ε spent so far at `delta` (0.0 for an empty history, inf once any step had σ = 0)."""
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if not self.history:
            return 0.0
        if any(entry[0] == 0 for entry in self.history):
            return math.inf
        return epsilon_of(self.kind, self.history, delta)

    def projected_epsilon(self, noise_multiplier: float, sample_rate: float, steps: int,
                          delta: float = DEFAULT_DELTA, *, skellam: tuple[float, float] | None = None) -> float:
        """ε after `steps` more steps at (σ, q), without changing this accountant."""
        trial = self.copy()
        trial.step(noise_multiplier, sample_rate, steps, skellam=skellam)
        return trial.epsilon(delta)

    def epsilon_curve(self, noise_multiplier: float, sample_rate: float, steps_per_round: int, rounds: int,
                      delta: float = DEFAULT_DELTA, *, skellam: tuple[float, float] | None = None) -> list[float]:
        """ε after each of `rounds` more rounds of `steps_per_round` steps at (σ, q), on top of this history,
        without changing this accountant: element r−1 equals `projected_epsilon(σ, q, r·steps_per_round)`
        exactly (what the ledger records after r such rounds). RDP: one RDP computation for all rounds."""
        if rounds <= 0:
            return []
        if self.kind != "rdp" or noise_multiplier == 0 or any(entry[0] == 0 for entry in self.history):
            return [self.projected_epsilon(noise_multiplier, sample_rate, r * steps_per_round, delta,
                                           skellam=skellam) for r in range(1, rounds + 1)]
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        trial = self.copy()
        trial.step(noise_multiplier, sample_rate, steps_per_round, skellam=skellam)
        last = trial.history[-1]  # the new mechanism, merged with the last recorded entry when they are the same
        before = last[2] - steps_per_round  # that entry's steps before the new rounds
        orders = _orders(trial.history)
        _, head = _rdp(trial.history[:-1], orders)
        unit = _unit_rdp((last[0], last[1], *last[3:]), orders)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Optimal order is the (smallest|largest) alpha")
            return [_rdp_to_epsilon(orders, head + unit * (before + r * steps_per_round), delta)
                    for r in range(1, rounds + 1)]

    def state_dict(self) -> dict:
        return {"mechanism": self.kind, "history": [list(e) for e in self.history]}

    def load_state_dict(self, state: dict) -> None:
        """Replace the history; a checkpoint from another mechanism is refused."""
        if not isinstance(state, dict) or "mechanism" not in state or "history" not in state:
            raise ValueError("accountant state needs 'mechanism' and 'history'")
        if state["mechanism"] != self.kind:
            raise ValueError(f"accountant state is for {state['mechanism']!r}, this accountant is {self.kind!r}")
        fresh = Accountant(self.kind, [tuple(e) for e in state["history"]])
        self.history = fresh.history

    @classmethod
    def from_state_dict(cls, state: dict) -> Accountant:
        acc = cls(state.get("mechanism", "rdp") if isinstance(state, dict) else "rdp")
        acc.load_state_dict(state)
        return acc


def epsilon_of(kind: AccountantKind, history: list[Entry], delta: float) -> float:
    """ε of a history under `kind` accounting (all σ > 0)."""
    # Opacus warns when the best RDP order sits at the end of its range: the ε returned is then still a
    # valid upper bound, only perhaps a loose one. Calibration probes such extreme σ on purpose, and the
    # warning reached operators' terminals on every plan; keep it out of their way.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the (smallest|largest) alpha")
        if kind == "rdp":
            orders, rdp = _rdp(history)
            return _rdp_to_epsilon(orders, rdp, delta)
        if any(len(entry) == 5 for entry in history):
            raise ValueError("Skellam (distributed DP) steps are accounted with RDP only; use the 'rdp' accountant")
        from opacus.accountants import PRVAccountant

        prv = PRVAccountant()
        prv.history = list(history)
        return float(prv.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR))


# RDP. Gaussian-only histories use Opacus' orders and its exact subsampled-Gaussian analysis, so ε is exactly
# what `opacus.accountants.RDPAccountant` reports; a history with Skellam steps uses the integer orders the
# Skellam bound needs (`core.privacy.distributed_noise.ORDERS`) for every entry. Each step's RDP is computed
# once per mechanism and scaled by the step count (RDP composes additively; Opacus scales the same way), so
# ε after each of many rounds costs one RDP computation, not one per round.


def _orders(history: Iterable[Entry]) -> tuple[float, ...]:
    from opacus.accountants import RDPAccountant

    return tuple(ORDERS) if any(len(entry) == 5 for entry in history) else tuple(RDPAccountant.DEFAULT_ALPHAS)


@functools.lru_cache(maxsize=512)
def _unit_rdp(mechanism: tuple[float, ...], orders: tuple[float, ...]):
    """RDP of one step of `mechanism` — (σ, q), or (σ, q, Δ₂, Δ₁) for Skellam — at `orders` (read-only)."""
    import numpy as np

    if len(mechanism) == 4:
        sigma, q, l2, l1 = mechanism
        out = np.asarray(skellam_rdp(q, sigma, 1, l2, l1, list(orders)), dtype=np.float64)
    else:
        from opacus.accountants.analysis.rdp import compute_rdp

        sigma, q = mechanism
        out = np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(orders)), dtype=np.float64)
    out.setflags(write=False)
    return out


def _rdp(history: list[Entry], orders: tuple[float, ...] | None = None):
    """(orders, total RDP) of a history, summed entry by entry in order (as Opacus sums)."""
    orders = orders or _orders(history)
    total = 0
    for entry in history:
        total = total + _unit_rdp((entry[0], entry[1], *entry[3:]), orders) * entry[2]
    return orders, total


def _rdp_to_epsilon(orders: tuple[float, ...], rdp, delta: float) -> float:
    from opacus.accountants.analysis.rdp import get_privacy_spent

    eps, _ = get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)
    return float(eps)
