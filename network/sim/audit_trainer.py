"""The privacy audit's site trainer: the product's `FedSGDTrainer` with gradient canaries, and the audit's faults.

`AuditTrainer` is `FedSGDTrainer` with one method overridden, `_round_sum`, the point where a record's clipped
gradient enters the round's sum before the noise. There it adds this site's *included* gradient canaries: each
one a record whose clipped gradient is C·e_j (a "Dirac" canary on coordinate j, norm exactly C), sampled into
the round with the plan's probability q like every other record. Everything after — recording the round in the
ledger, the noise share, the quantization, secure aggregation, the server step — is the product's code.

It also hands the audit what the strongest attacker differential privacy allows would know: the adversary of
the DP definition knows every record but the one in question, so it can compute the expected clipped sum of
this site's real records at the round's (public) weights, q·Σ_i clip(∇ℓ_i). What it does not know is which
records the round sampled, the noise, and which canaries were included.

Faults (`FAULTS`) exist to show the audit has power; they live only here. Nothing in a plan, a site's config,
`hemafed site` or the app can build an `AuditTrainer`: only `hemafed audit`'s in-process federation does
(`network.sim.audit`). "noise/4" makes every site draw its noise share for σ/4 while its ledger still records
the plan's σ, the kind of bug (noise computed from the wrong scale) an audit exists to catch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch

from hemafed.core.learning.fedsgd import GradientSum, SitePrivacy, clipped_round_sum
from hemafed.core.learning.site_trainer import FedSGDTrainer
from hemafed.core.rounds.plan import FederationPlan

# fault name -> what it does to the plan's `SitePrivacy` (σ recorded in the ledger stays the plan's)
FAULTS: dict[str, str] = {
    "noise/4": "every site draws its noise share for σ/4 (a sixteenth of the variance) and records σ",
}

Expected = Callable[[int, str, np.ndarray], None]  # (round, site, q·Σ clip(∇ℓ_i) of the site's real records)


def faulty_privacy(privacy: SitePrivacy, fault: str) -> SitePrivacy:
    """`privacy` with `fault` applied to the noise only (see `FAULTS`)."""
    if fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULTS)}")
    if privacy.mode != "distributed":
        raise ValueError("the audit's faults act on distributed noise shares; this plan uses local DP")
    codec = privacy.codec
    return replace(privacy, codec=replace(codec, sigma=codec.sigma / 4))


class AuditTrainer(FedSGDTrainer):
    """A site's `FedSGDTrainer` carrying gradient canaries on the coordinates `canaries` (the ones included at this
    site), telling `expected` the real records' expected clipped sum each round, with an optional `fault`."""

    def __init__(self, plan: FederationPlan, *, site: str, canaries: np.ndarray, expected: Expected,
                 canary_seed: int, fault: str | None = None, **kwargs) -> None:
        super().__init__(plan, **kwargs)
        self.site = site
        self.canaries = np.asarray(canaries, np.int64)
        self.expected = expected
        self.canary_seed = int(canary_seed)
        self.fault = fault
        if fault is not None:
            faulty_privacy(super().privacy, fault)  # refuse an unknown fault or a local-DP plan now

    @property
    def privacy(self) -> SitePrivacy:
        p = super().privacy
        return p if self.fault is None else faulty_privacy(p, self.fault)

    def _round_sum(self, rnd: int, generator: torch.Generator) -> GradientSum:
        gs = super()._round_sum(rnd, generator)
        p = self.privacy
        # the adversary's knowledge of the real records (no sampling, no noise: their expected contribution)
        everyone = clipped_round_sum(self.trainable, self.inputs, self.labels, 1.0, p.clip_norm)
        self.expected(rnd, self.site, p.sample_rate * everyone.vector.astype(np.float64))
        # this round's Poisson sample of the included canaries, from the audit's own randomness
        rng = np.random.default_rng([self.canary_seed, rnd])
        present = self.canaries[rng.random(len(self.canaries)) < p.sample_rate]
        vector = gs.vector.copy()
        vector[present] += np.float32(p.clip_norm)
        gs.vector = vector
        return gs
