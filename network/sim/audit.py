"""`hemafed audit`: a one-run empirical privacy audit of the product's own training path.

One federation runs in process (`network.sim.inprocess`: the aggregator's and the sites' round machines,
secure aggregation, the site trainers with their Skellam noise shares, the ledgers, the server step) on
`hemafed simulate`'s hospitals and plan, with two sets of canaries, each canary put in with probability ½ at a
random hospital (Steinke, Nasr & Jagielski 2023, "Privacy Auditing with One (1) Training Run"):

* **gradient canaries** (white-box): records whose clipped gradient is C on one coordinate of the model
  ("Dirac" canaries, each on its own coordinate), added where a record's clipped gradient enters the round's
  sum (`network.sim.audit_trainer`). The attacker is the aggregator as the threat model allows it to be: it
  sees every round's unmasked sum, it colludes with the plan's c hospitals (which tell it their noise shares and
  hold no canaries), and — like the adversary of the DP definition — it knows every real record, so it
  subtracts their expected clipped sum. What is left on a canary's coordinate is the canary (if it was sampled
  that round) plus the other hospitals' noise; its score is the likelihood ratio over all rounds.
* **input canaries** (black-box): validation images no hospital holds, each given a wrong label, added to a
  hospital's training images. The attacker sees only the final model and scores each canary by the log
  probability the model gives its (wrong) label.

`core.privacy.one_run_audit` turns each attack's guesses into ε̂, a lower bound on ε at 95 % confidence. A
faithful implementation gives ε̂ well below the ε its ledger records (the accountant's ε holds for the worst
case over all attacks and data; one run with thousands of canaries can certify only a part of it); a fault that
weakens the noise (`--control noise/4`, `network.sim.audit_trainer.FAULTS`) shows up as ε̂ above ε.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from hemafed.core.learning.feature_cache import FeatureCache
from hemafed.core.learning.fedsgd import site_privacy
from hemafed.core.learning.models import build_model, set_flat_params, split_features
from hemafed.core.learning.site_trainer import SiteData, model_inputs
from hemafed.core.privacy.one_run_audit import AuditBound, epsilon_lower_bound, log_likelihood_ratio
from hemafed.core.rounds.agg_round import RoundOutcome
from hemafed.core.rounds.plan import FederationPlan, SiteBounds
from hemafed.network.sim.audit_trainer import FAULTS, AuditTrainer
from hemafed.network.sim.inprocess import InProcessFederation
from hemafed.network.sim.simulate import Hospitals, SimulationOptions, hospitals, site_seed, site_splits

log = logging.getLogger(__name__)

FORMAT = "hemafed-audit/1"


@dataclass(frozen=True)
class AuditOptions:
    """What to audit: `sim`'s hospitals and plan (the main job's recipe at `sim.epsilon` unless `plan` is given),
    with `canaries` gradient canaries and `input_canaries` input canaries, and an optional test-only `fault`."""

    sim: SimulationOptions = field(default_factory=SimulationOptions)
    plan: FederationPlan | None = None  # audit this plan (e.g. the one a site accepted) instead of the recipe
    canaries: int = 5000  # at most half the model's coordinates (the rest measure the noise)
    input_canaries: int = 1000
    fault: str | None = None
    confidence: float = 0.95
    seed: int = 0  # the canaries' draws (which, where, included); the run itself is seeded by `sim.seed`
    threads: int | None = None


@dataclass
class AuditResult:
    claimed_epsilon: float  # ε the sites' ledgers record after the run (the largest)
    delta: float
    gradient: dict  # AuditBound.to_dict() of the white-box attack
    input: dict | None  # ... of the input-space attack (None without input canaries)
    noise_ratio: float  # noise the attacker measured / noise the plan promises for the sites that took part
    fault: str | None
    plan: dict  # what identifies the plan: digest, model, rounds, q, C, σ, t, c, mode, sites
    seconds: float
    seed: int
    command: str = ""
    when: str = ""
    machine: str = ""
    version: str = ""

    @property
    def epsilon_lower_bound(self) -> float:
        """The audit's ε̂: the larger of the two attacks' bounds (each holds at the stated confidence)."""
        return max(self.gradient["epsilon_lower_bound"], (self.input or {}).get("epsilon_lower_bound", 0.0))

    @property
    def caught(self) -> bool:
        """ε̂ above the claimed ε: the claim is false (at the stated confidence)."""
        return self.epsilon_lower_bound > self.claimed_epsilon

    def to_dict(self) -> dict:
        return {"format": FORMAT, **asdict(self), "epsilon_lower_bound": self.epsilon_lower_bound,
                "caught": self.caught}

    @classmethod
    def from_dict(cls, data: dict) -> AuditResult:
        if data.get("format") != FORMAT:
            raise ValueError(f"not a hemafed audit result (format {data.get('format')!r})")
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in names})

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> AuditResult:
        return cls.from_dict(json.loads(Path(path).read_text()))


# ---------------------------------------------------------------------------------------------- the canaries


@dataclass(frozen=True)
class Canaries:
    """Which canaries there are, where each one goes and whether it is included (the audit's secret)."""

    coordinates: np.ndarray  # gradient canaries: their coordinates in the flat weight vector
    included: np.ndarray  # ... included or not
    site: np.ndarray  # ... the hospital (index) that holds it
    images: np.ndarray  # input canaries: the images
    labels: np.ndarray  # ... their (wrong) labels
    images_included: np.ndarray
    images_site: np.ndarray


def draw_canaries(rng: np.random.Generator, dim: int, m: int, images: np.ndarray, labels: np.ndarray, m_inputs: int,
                  sites: Sequence[int], n_classes: int) -> Canaries:
    """m gradient canaries on distinct coordinates (at most half of them, so the attacker can measure the noise on
    the rest), and `m_inputs` input canaries from `images` with their labels moved to another class; each at one
    of `sites` (hospital indices: the ones not colluding with the attacker)."""
    if not 1 <= m <= dim // 2:
        raise ValueError(f"between 1 and {dim // 2} gradient canaries fit this model ({dim} coordinates)")
    if not 0 <= m_inputs <= len(labels):
        raise ValueError(f"at most {len(labels)} input canaries (the images no hospital holds)")
    coordinates = np.sort(rng.choice(dim, m, replace=False))
    pick = rng.choice(len(labels), m_inputs, replace=False)
    wrong = (labels[pick] + rng.integers(1, n_classes, m_inputs)) % n_classes
    where = np.asarray(sites, np.int64)
    return Canaries(coordinates, rng.random(m) < 0.5, rng.choice(where, size=m), images[pick], wrong,
                    rng.random(m_inputs) < 0.5, rng.choice(where, size=m_inputs))


def with_input_canaries(sites: dict[str, SiteData], canaries: Canaries) -> dict[str, SiteData]:
    """Each hospital's data with the input canaries it holds (included ones only) among its training images."""
    out = {}
    for i, (name, data) in enumerate(sites.items()):
        mine = canaries.images_included & (canaries.images_site == i)
        out[name] = replace(data, train_images=np.concatenate([data.train_images, canaries.images[mine]]),
                            train_labels=np.concatenate([np.asarray(data.train_labels).reshape(-1),
                                                         canaries.labels[mine]]))
    return out


# ---------------------------------------------------------------------------------------------- the attacks


class WhiteBoxAttack:
    """The aggregator's view: every round's unmasked sum, less the real records' expected clipped sum (which
    the DP adversary can compute) and the noise shares of the c colluding sites (which they tell it), read on each
    canary's coordinate in units of C."""

    def __init__(self, plan: FederationPlan, dim: int, coordinates: np.ndarray) -> None:
        self.privacy = site_privacy(plan, plan.secagg_config(dim))  # the plan's own decoder (the aggregator's)
        self.dim = dim
        self.coordinates = coordinates
        self.others = np.ones(dim, bool)
        self.others[coordinates] = False
        self._expected: dict[int, np.ndarray] = {}
        self._known: dict[int, dict[str, np.ndarray]] = {}  # colluders' noise shares per round (gradient units)
        self.z: list[np.ndarray] = []  # per completed round: the residual on each canary's coordinate
        self.noise_var: list[float] = []  # per completed round: the residual's variance elsewhere
        self.unknown_shares: list[int] = []  # per completed round: survivors whose share the attacker does not know

    def expected(self, rnd: int, site: str, vector: np.ndarray) -> None:
        self._expected[rnd] = self._expected.get(rnd, 0.0) + vector

    def share(self, rnd: int, site: str, ring_share: np.ndarray) -> None:
        self._known.setdefault(rnd, {})[site] = ring_share.astype(np.float64) / self.privacy.codec.gamma

    def round_done(self, outcome: RoundOutcome, weights: np.ndarray) -> None:
        expected = self._expected.pop(outcome.round, None)
        known = {s: v for s, v in self._known.pop(outcome.round, {}).items() if s in outcome.survivors}
        if outcome.status != "completed" or outcome.ring_sum is None or expected is None:
            return
        decoded = self.privacy.codec.decode(np.asarray(outcome.ring_sum)[:self.dim])
        residual = (decoded - expected - sum(known.values(), np.zeros(self.dim))) / self.privacy.clip_norm
        self.z.append(residual[self.coordinates])
        self.noise_var.append(float(np.mean(residual[self.others] ** 2)))
        self.unknown_shares.append(len(outcome.survivors) - len(known))

    @property
    def noise(self) -> float:
        """The noise's standard deviation per coordinate the attacker measured (units of C)."""
        return math.sqrt(float(np.mean(self.noise_var)))

    def promised_noise(self) -> float:
        """What the plan promises for the shares the attacker does not know: each share has variance
        σ²Δ₂²/(t − c) (ring units), so k of them give σ·Δ₂/γ·√(k/(t − c)) in units of C."""
        codec = self.privacy.codec
        shares = float(np.mean(self.unknown_shares)) / (codec.threshold - codec.colluders)
        return math.sqrt(codec.total_variance * shares) / codec.gamma / self.privacy.clip_norm

    def scores(self) -> np.ndarray:
        return log_likelihood_ratio(np.vstack(self.z), self.privacy.sample_rate, self.noise)


def input_scores(plan: FederationPlan, weights: np.ndarray, images: np.ndarray, labels: np.ndarray,
                 cache: FeatureCache | None) -> np.ndarray:
    """log p(label | image) under the released model: the black-box attacker's score of each input canary."""
    model = build_model(plan.model, len(plan.classes))
    trainable = split_features(model)[1]
    set_flat_params(trainable, weights)
    inputs = model_inputs(plan, model, images, "train", cache)
    trainable.eval()
    with torch.no_grad():
        logp = torch.log_softmax(trainable(inputs).double(), dim=-1)
    if logp.dim() == 3:  # several views of each record: the mean of their log probabilities
        logp = logp.mean(dim=1)
    return logp[torch.arange(len(labels)), torch.as_tensor(labels, dtype=torch.long)].numpy()


# ---------------------------------------------------------------------------------------------- one audit


def audit_hospitals(opts: AuditOptions) -> Hospitals:
    """`hemafed simulate`'s hospitals for the audit: a site's accepted plan (`opts.plan`) names its own model, so
    their images are loaded at that model's input size (a 64-px plan audited with 28-px images failed)."""
    return hospitals(opts.sim if opts.plan is None else replace(opts.sim, model=opts.plan.model))


def run_audit(opts: AuditOptions, state: Path | None = None, command: str = "hemafed audit") -> AuditResult:
    """The audit on `hemafed simulate`'s hospitals (BloodMNIST's training split) with the plan of `opts`; the input
    canaries come from BloodMNIST's validation split, which no hospital holds."""
    from hemafed.core.data.bloodmnist import load_splits, locate

    started = time.perf_counter()
    h = audit_hospitals(opts)
    plan = opts.plan or h.plan
    sites = site_splits(h.train.images, h.train.labels, h.parts, plan)
    val = load_splits(locate(opts.sim.data, size=plan.input_size))["val"]
    seeds = {name: site_seed(opts.sim.seed, i) for i, name in enumerate(sites, start=1)} if opts.sim.seeded else None
    budget = opts.sim.epsilon if opts.plan is None else plan_budget(plan)
    result = audit_federation(plan, sites, val.images, val.labels, opts, budget=budget, seeds=seeds, state=state,
                              command=command)
    result.seconds = time.perf_counter() - started
    return result


def audit_federation(plan: FederationPlan, sites: dict[str, SiteData], pool_images: np.ndarray,
                     pool_labels: np.ndarray, opts: AuditOptions, *, budget: float,
                     seeds: dict[str, int] | None = None, state: Path | None = None,
                     command: str = "hemafed audit") -> AuditResult:
    """One audited run of `plan` over `sites`, the input canaries drawn from `pool_images` (images none of the
    sites holds), each site with ε budget `budget`."""
    from hemafed.network.provenance import version_string

    started = time.perf_counter()
    if opts.fault is not None and opts.fault not in FAULTS:
        raise ValueError(f"unknown fault {opts.fault!r}; known: {', '.join(FAULTS)}")
    if plan.algorithm != "fedsgd" or not plan.dp or not plan.secagg:
        raise ValueError("the audit runs DP-FedSGD plans with secure aggregation (the recipe)")
    dim = sum(p.numel() for p in build_model(plan.model, len(plan.classes)).parameters())
    names = list(sites)
    # the guarantee holds against the aggregator with c colluding sites: the last c play them (no canaries there)
    colluders = names[len(names) - plan.dp_colluders:] if plan.dp_mode == "distributed" else []
    honest = [i for i, name in enumerate(names) if name not in colluders]
    canaries = draw_canaries(np.random.default_rng([opts.seed, 7]), dim, min(opts.canaries, dim // 2),
                             pool_images, np.asarray(pool_labels).reshape(-1), opts.input_canaries, honest,
                             len(plan.classes))
    sites = with_input_canaries(sites, canaries)
    attack = WhiteBoxAttack(plan, dim, canaries.coordinates)

    def trainer(name: str, plan_: FederationPlan, **kwargs) -> AuditTrainer:
        i = names.index(name)
        mine = canaries.coordinates[canaries.included & (canaries.site == i)]
        return AuditTrainer(plan_, site=name, canaries=mine, expected=attack.expected,
                            canary_seed=int(np.random.SeedSequence([opts.seed, 11, i]).generate_state(1)[0]),
                            fault=opts.fault, share=attack.share if name in colluders else None, **kwargs)

    bounds = SiteBounds(max_rounds=max(plan.rounds, SiteBounds().max_rounds))
    cache = FeatureCache()
    with tempfile.TemporaryDirectory(prefix="hemafed-audit-") as tmp:
        fed = InProcessFederation(plan, sites, Path(state or tmp), budget=budget, seeds=seeds, bounds=bounds,
                                  feature_cache=cache, threads=opts.threads, trainer_factory=trainer)
        result = fed.run(attack.round_done)
        ledgers = [ledger for ledger in result.ledgers.values() if ledger is not None]
        claimed = max(ledger.spent_epsilon() for ledger in ledgers)
        delta = max(float(ledger.delta) for ledger in ledgers)
    beta = 1.0 - opts.confidence
    white = epsilon_lower_bound(attack.scores(), canaries.included, delta, beta)
    black: AuditBound | None = None
    if opts.input_canaries:
        black = epsilon_lower_bound(input_scores(plan, result.weights, canaries.images, canaries.labels, cache),
                                    canaries.images_included, delta, beta)
    codec = attack.privacy.codec
    return AuditResult(
        claimed_epsilon=float(claimed), delta=delta, gradient=white.to_dict(),
        input=None if black is None else black.to_dict(), noise_ratio=attack.noise / attack.promised_noise(),
        fault=opts.fault,
        plan={"digest": plan.digest(), "federation_id": plan.federation_id, "model": plan.model,
              "rounds": plan.rounds, "sample_rate": plan.sample_rate, "clip_norm": plan.clip_norm,
              "sigma": plan.noise_multiplier, "threshold": plan.threshold, "colluders": codec.colluders,
              "dp_mode": plan.dp_mode, "sites": len(sites), "rounds_completed": len(attack.z),
              "colluding_sites": colluders},
        seconds=time.perf_counter() - started, seed=opts.seed, command=command,
        when=time.strftime("%Y-%m-%d %H:%M:%S %Z"), machine=f"{platform.machine()}, {_cpus()} CPU cores",
        version=version_string())


def plan_budget(plan: FederationPlan) -> float:
    """A budget a given plan fits (the audit's sites must accept it): the ε its rounds spend, rounded up."""
    from hemafed.core.learning.site_trainer import FedSGDTrainer

    proj = FedSGDTrainer(plan).project(1e6, 1000)
    return float(math.ceil(proj.epsilon_per_round[-1] * 1000) / 1000) if proj.epsilon_per_round else 1e6


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
