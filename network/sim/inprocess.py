"""A federation in one process: the product's own code with the sockets taken out.

The aggregator's round machine (`core.rounds.agg_round.FederationMachine`) with the plan's server step, and
for every hospital its round machine (`core.rounds.site_round.SiteRound`, with the secure-aggregation
machines inside), its site trainer (`core.learning.site_trainer`: preparation, σ and the ε projection, the
noise, the quantization) and its ledger — exactly what `hemafed simulate` runs as processes. Every message
travels as the bytes of a real envelope (`network.envelope`) and passes the aggregator's edge validator
(`network.protocol`), in the order a transport delivers it. What is left out: sockets, TLS, the handshake,
processes, clocks — and with them the failures they bring (dropouts, reconnects, time-outs).

With the sites' simulation seeds, a run gives bit for bit the weights `hemafed simulate` gives with the same
seed (tests/federation/test_inprocess_equals_simulate.py).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hemafed.core.errors import HemafedError
from hemafed.core.learning.models import model_problems
from hemafed.core.learning.server_opt import make_plan_optimizer
from hemafed.core.learning.site_trainer import SiteData, SiteTrainer, site_trainer
from hemafed.core.privacy.ledger import BudgetExhausted, PrivacyLedger
from hemafed.core.rounds import agg_round as R
from hemafed.core.rounds import site_round as sr
from hemafed.core.rounds.plan import FederationPlan, SiteBounds
from hemafed.core.trust.identity import IdentityKey
from hemafed.network import protocol as P
from hemafed.network.aggregator import initial_weights
from hemafed.network.envelope import Envelope, Limits
from hemafed.network.sim.simulate import hospitals, site_seed

log = logging.getLogger(__name__)

RoundHook = Callable[[R.RoundOutcome, np.ndarray], None]
# (site name, plan, keyword arguments of `site_trainer`) -> the site's trainer; the privacy audit's canaries and
# test-only faults come in this way (`network.sim.audit_trainer`), never through a plan or a site's config
TrainerFactory = Callable[..., SiteTrainer]


class FederationFailed(HemafedError, RuntimeError):
    """The in-process federation did something a healthy run never does (a refusal, a rejected message)."""


@dataclass
class _Site:
    name: str
    machine: sr.SiteRound
    trainer: object
    ledger: PrivacyLedger | None
    data: SiteData
    final: np.ndarray | None = None
    temperature: float | None = None  # the federation's calibration, as the aggregator sent it
    stopped: bool = False


@dataclass
class InProcessResult:
    weights: np.ndarray  # the released model after the last round
    outcomes: list[R.RoundOutcome] = field(default_factory=list)
    ledgers: dict[str, PrivacyLedger | None] = field(default_factory=dict)
    seconds: float = 0.0
    prepare_seconds: float = 0.0
    temperature: float | None = None  # the federation's calibration temperature (agg_round.federation_temperature)


class InProcessFederation:
    """`sites`: each hospital's data (training and validation splits, as the site itself splits them);
    `state`: a folder for the sites' ledgers; `seeds`: each site's simulation seed (None: OS randomness);
    `budget`: each site's ε budget; `initial`: the starting weights (default: the plan's seeded model);
    `trainer_factory(name, plan, **kwargs)`: each site's trainer (default `site_trainer(plan, **kwargs)`)."""

    def __init__(self, plan: FederationPlan, sites: dict[str, SiteData], state: Path, *, budget: float,
                 seeds: dict[str, int] | None = None, bounds: SiteBounds | None = None, feature_cache=None,
                 initial: np.ndarray | None = None, threads: int | None = None,
                 trainer_factory: TrainerFactory | None = None) -> None:
        self.plan = plan
        self.budget = budget
        bounds = bounds or SiteBounds(max_rounds=max(plan.rounds, SiteBounds().max_rounds))
        identities = {name: IdentityKey.generate() for name in sites}
        weights = initial if initial is not None else initial_weights(plan)
        self.dim = len(weights)
        self.agg = R.FederationMachine(plan, {n: k.public_line() for n, k in identities.items()}, weights,
                                       make_plan_optimizer(plan, self.dim))
        self.validator = P.plan_validator(plan, self.dim, len(sites))
        self.limits = Limits.for_model(self.dim, max_sites=len(sites))
        self.sites = {}
        for name, data in sites.items():
            machine = sr.SiteRound(bounds, identity=identities[name].private_key, federation=plan.federation_id,
                                   plan_problems=model_problems)
            options = {"bounds": bounds, "seed": (seeds or {}).get(name), "feature_cache": feature_cache,
                       "threads": threads}
            trainer = trainer_factory(name, plan, **options) if trainer_factory else site_trainer(plan, **options)
            ledger = trainer.open_ledger(state / name, budget, len(data.train_labels), create=True) \
                if plan.dp else None
            self.sites[name] = _Site(name, machine, trainer, ledger, data)
        self._queue: deque[tuple[str, str, Envelope]] = deque()  # (from, to, message); "" is the aggregator
        self._outcomes: list[R.RoundOutcome] = []
        self._done: np.ndarray | None = None
        self._temperature: float | None = None
        self._on_round: RoundHook | None = None
        self._prepare_s = 0.0

    # -- the transport ------------------------------------------------------------------------------

    def _carry(self, sender: str, to: str, env: Envelope) -> None:
        """What a websocket does to a message: bytes out, bytes in (the receiver checks the envelope)."""
        self._queue.append((sender, to, Envelope.decode(env.encode(), self.limits)))

    def _from_aggregator(self, actions: list[R.Action]) -> None:
        for action in actions:
            if isinstance(action, R.Send):
                self._carry("", action.site, Envelope(action.type, action.round, dict(action.body), action.blobs))
            elif isinstance(action, R.Broadcast):
                for site in action.sites:
                    self._carry("", site, Envelope(action.type, action.round, dict(action.body), action.blobs))
            elif isinstance(action, R.Reject):
                raise FederationFailed(f"the aggregator rejected {action.site}: {action.code} ({action.detail})")
            elif isinstance(action, R.RoundFinished):
                self._outcomes.append(action.outcome)
                if self._on_round is not None:
                    self._on_round(action.outcome, action.weights)
                self._from_aggregator(self.agg.recorded(action.outcome.round, time.monotonic()))
            elif isinstance(action, R.Done):
                self._done, self._temperature = action.weights, action.temperature
        self.validator.round = self.agg.round_in_progress

    def _to_aggregator(self, site: str, env: Envelope) -> None:
        self.validator(site, env)  # the aggregator's edge: type, round, stage and schema
        self._from_aggregator(self.agg.receive(R.Inbound(site, env.type, env.round, env.body, env.blobs),
                                               time.monotonic()))

    def _site_actions(self, site: _Site, actions: list[sr.Action]) -> None:
        pending = deque(actions)
        while pending:
            action = pending.popleft()
            more: list[sr.Action] = []
            if isinstance(action, sr.Send):
                self._carry(site.name, "", Envelope(action.type, action.round, action.body, action.blobs))
            elif isinstance(action, sr.Emit):
                continue
            elif isinstance(action, sr.Prepare):
                started = time.perf_counter()
                try:
                    proj = site.trainer.prepare(site.ledger, site.data, self.budget)
                except sr.PlanRefused as exc:
                    raise FederationFailed(f"{site.name} refused the plan: {exc}") from exc
                self._prepare_s += time.perf_counter() - started
                more = site.machine.prepared(proj.settings, n_params=site.trainer.n_params,
                                             epsilon_spent=proj.spent if self.plan.dp else None,
                                             epsilon_per_round=proj.epsilon_per_round)
            elif isinstance(action, sr.Featurize):
                started = time.perf_counter()
                site.trainer.featurize()
                self._prepare_s += time.perf_counter() - started
                more = site.machine.featurized()
            elif isinstance(action, sr.Train):
                try:
                    outcome = site.trainer.contribution(action.round, action.weights)
                except BudgetExhausted as exc:
                    more = site.machine.budget_exhausted(action.round, str(exc))
                else:
                    more = site.machine.trained(action.round, outcome)
            elif isinstance(action, sr.Finish):
                site.final, site.temperature = action.weights, action.temperature
            elif isinstance(action, sr.Stop):
                site.stopped = True
                raise FederationFailed(f"{site.name} stopped ({action.outcome})")
            else:
                raise FederationFailed(f"{site.name}: no in-process answer to {action!r}")
            pending.extendleft(reversed(more))

    # -- running ------------------------------------------------------------------------------------

    def run(self, on_round: RoundHook | None = None) -> InProcessResult:
        """Every round of the plan, every site taking part; `on_round(outcome, weights)` after each."""
        self._on_round = on_round
        started = time.perf_counter()
        now = time.monotonic()
        self._from_aggregator(self.agg.start(now))
        for name, site in self.sites.items():  # every site connects
            site.machine.connected()
            self._from_aggregator(self.agg.connected(name, time.monotonic()))
        while self._queue:
            sender, to, env = self._queue.popleft()
            if to == "":
                self._to_aggregator(sender, env)
            else:
                site = self.sites[to]
                try:
                    actions = site.machine.receive(env)
                except sr.MessageRefused as exc:
                    raise FederationFailed(f"{to} refused {env.type} for round {env.round}: {exc}") from exc
                self._site_actions(site, actions)
        if self._done is None:
            raise FederationFailed(f"the federation stopped at round {self.agg.round} without finishing")
        return InProcessResult(self._done, self._outcomes, {n: s.ledger for n, s in self.sites.items()},
                               time.perf_counter() - started, self._prepare_s, self._temperature)


def simulate_in_process(opts, state: Path, *, feature_cache=None, on_round: RoundHook | None = None,
                        threads: int | None = None) -> tuple[InProcessResult, object]:
    """`hemafed simulate`'s federation (`opts`: its `SimulationOptions`) in this process: the same hospitals, the
    same plan, the same simulation seeds; (the result, the `Hospitals` it ran on)."""

    h = hospitals(opts)
    sites = h.site_data()
    seeds = {name: site_seed(opts.seed, i) for i, name in enumerate(sites, start=1)} if opts.seeded else None
    bounds = SiteBounds(require_dp=opts.dp, require_secagg=opts.secagg,
                        max_rounds=max(h.plan.rounds, SiteBounds().max_rounds))
    fed = InProcessFederation(h.plan, sites, state, budget=opts.epsilon, seeds=seeds, bounds=bounds,
                              feature_cache=feature_cache, threads=threads)
    return fed.run(on_round), h
