"""The privacy audit's site trainer: the product's `FedSGDTrainer` with gradient canaries, and the audit's faults.

`AuditTrainer` is `FedSGDTrainer` with one method overridden, `_round_sum`, the point where a record's clipped
gradient enters the round's sum before the noise. There it adds this site's *included* gradient canaries: each
one a record whose clipped gradient is C·e_j (a "Dirac" canary on coordinate j, norm exactly C), sampled into
the round with the plan's probability q like every other record. Everything after — recording the round in the
ledger, the noise share, the quantization, secure aggregation, the server step — is the product's code.

It also hands the audit what the strongest attacker differential privacy allows would know: the adversary of
the DP definition knows every record but the one in question, so it can compute the expected clipped sum of
this site's real records at the round's (public) weights, q·Σ_i clip(∇ℓ_i). What it does not know is which
records the round sampled, the noise, and which canaries were included. A site playing one of the plan's c
colluders (the guarantee of distributed DP holds against the aggregator plus c sites) also tells the attacker
its own noise share each round (`share`), read off the product's noise hook; such a site holds no canaries.

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
    "noise/4": "every site draws its noise share for σ/4, a sixteenth of the variance, while its ledger records σ",
}

Expected = Callable[[int, str, np.ndarray], None]  # (round, site, q·Σ clip(∇ℓ_i) of the site's real records)
Share = Callable[[int, str, np.ndarray], None]  # (round, site, the noise share it added, int32 ring units)


class _TellingNoise:
    """A colluding site's ring encoding: the product's own noise hook, whose share the site also tells the
    attacker (the guarantee allows c colluders; each knows its own share). Everything else is the codec's."""

    def __init__(self, codec, tell: Callable[[np.ndarray], None]) -> None:
        self._codec, self._tell = codec, tell

    def __getattr__(self, name: str):
        return getattr(self._codec, name)

    def noise_hook(self, rng: np.random.Generator | None = None) -> Callable[[np.ndarray], None]:
        hook = self._codec.noise_hook(rng)

        def add(ring_view: np.ndarray) -> None:
            before = ring_view.view(np.uint32).copy()
            hook(ring_view)
            self._tell((ring_view.view(np.uint32) - before).view(np.int32).copy())

        return add


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
                 canary_seed: int, fault: str | None = None, share: Share | None = None, **kwargs) -> None:
        super().__init__(plan, **kwargs)
        self.site = site
        self.canaries = np.asarray(canaries, np.int64)
        self.expected = expected
        self.canary_seed = int(canary_seed)
        self.fault = fault
        self.share = share  # set for a colluding site: it tells the attacker its noise share each round
        self._round = 0
        if fault is not None:
            faulty_privacy(super().privacy, fault)  # refuse an unknown fault or a local-DP plan now

    @property
    def privacy(self) -> SitePrivacy:
        p = super().privacy
        if self.fault is not None:
            p = faulty_privacy(p, self.fault)
        if self.share is not None:
            tell = self.share
            p = replace(p, codec=_TellingNoise(p.codec, lambda s: tell(self._round, self.site, s)))
        return p

    def _round_sum(self, rnd: int, generator: torch.Generator) -> GradientSum:
        self._round = rnd
        gs = super()._round_sum(rnd, generator)
        p = self.privacy
        # the adversary's knowledge of the real records (no sampling, no noise: their expected contribution)
        everyone = clipped_round_sum(self.trainable, self.inputs, self.labels, 1.0, p.clip_norm,
                                     moments=self.moments)
        self.expected(rnd, self.site, p.sample_rate * everyone.vector.astype(np.float64))
        # this round's Poisson sample of the included canaries, from the audit's own randomness
        rng = np.random.default_rng([self.canary_seed, rnd])
        present = self.canaries[rng.random(len(self.canaries)) < p.sample_rate]
        vector = gs.vector.copy()
        vector[present] += np.float32(p.clip_norm)
        gs.vector = vector
        return gs
