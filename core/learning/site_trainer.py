"""The one site trainer: everything a site does with its images for a plan.

The site driver (`hemafed.network.site`), the app's Privacy page and plan review, the in-process
federation of `hemafed experiment` and the research baselines all go through it; nothing else fits
σ to a budget, projects ε per round or adds noise (tests/test_site_trainer.py checks the sources).

    trainer = site_trainer(plan, bounds=bounds)          # FedSGDTrainer or FedAvgTrainer
    trainer.project(budget, n_train, ledger)            # σ, q, steps, δ, ε after each round to come
    trainer.prepare(ledger, data, budget)               # the same for this site's data; `PlanRefused` if it
                                                        #   cannot run here; binds the ledger and the data
    trainer.featurize(progress, cancel)                 # fixed features, cached by image digest (slow, once)
    c = trainer.contribution(round, weights, cancel)    # evaluate, check the budget, train, record the spend
                                                        #   durably, add the noise, quantize: what to send

Two implementations behind that interface:

* `FedSGDTrainer` (the recipe): the plan fixes σ and q for every site; a round is one Poisson-sampled,
  clipped gradient sum over the model's fixed features, with local noise (N(0, σ²C²)) or a Skellam
  share inside the secure-aggregation ring (distributed DP);
* `FedAvgTrainer`: local epochs of DP-SGD with σ fitted so the plan's rounds fit this site's budget.

Randomness (the Poisson samples, the noise, the stochastic rounding) comes from the operating
system, unless `seed` is given: a seeded trainer draws it from (seed, round) so a simulation can be
replayed exactly — and so can anyone who knows the seed. `hemafed simulate` seeds its simulated
sites; a hospital's site never is.
"""

from __future__ import annotations

import logging
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..errors import HemafedError
from ..privacy.accounting import Accountant, default_delta
from ..privacy.calibration import MAX_SIGMA, BudgetTooSmall, calibrate_sigma, max_rounds, sample_rate, steps_per_round
from ..privacy.distributed_noise import DistributedNoise
from ..rounds.calibration_sums import CELL_SCORE_EDGES, cell_tails
from ..rounds.plan import FederationPlan, SiteBounds
from ..rounds.site_round import PlanRefused, PrivacySettings, TrainOutcome
from ..secagg.quantize import quantize
from .cell_check import CellStats, moment_vector, standardised
from .confidence import nll_sums
from .dp_train import LocalTrainConfig, train_local
from .dp_train import TrainingCancelled as StepsCancelled
from .feature_cache import FeatureCache, FeaturesCancelled
from .fedsgd import GradientSum, clipped_round_sum, gaussian_noise, moments_layout, site_privacy
from .models import (
    build_model,
    evaluation_features,
    feature_kinds,
    images_to_tensor,
    model_hash,
    set_flat_params,
    split_features,
)

log = logging.getLogger(__name__)

Progress = Callable[[int, int, float | None], None]  # (done, total, seconds left or None)
Cancel = Callable[[], bool]

BUDGET_WHAT_TO_DO = ("raise this site's ε budget for the federation, or ask the federation's admin for fewer "
                     "rounds (or, for a plan that trains locally, fewer local epochs)")


class TrainingCancelled(HemafedError):
    """The site is leaving: the round stopped before anything was recorded or sent."""


@dataclass(frozen=True)
class SiteData:
    """A site's images for one plan: its training split and its validation split (uint8, model size)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray


@dataclass(frozen=True)
class Projection:
    """What a plan means for this site's privacy, before and while it runs."""

    budget: float
    delta: float
    rounds: int  # the plan's rounds
    rounds_done: int  # already in this federation's ledger
    spent: float  # ε already spent in this federation
    mode: str  # "local" | "distributed" | "none" (a non-private plan)
    sigma: float | None = None
    sample_rate: float = 0.0
    steps_per_round: int = 0
    epsilon_per_round: tuple[float, ...] = ()  # cumulative ε after each round still to come
    rounds_allowed: int = 0
    refusal: str | None = None  # why this site cannot run the plan; None when it can
    what_to_do: str = ""  # the next step when it cannot
    n_train: int = 0
    n_estimated: bool = False  # no data yet: the training-set size is a placeholder

    @property
    def fits(self) -> bool:
        return self.refusal is None

    @property
    def mechanism(self) -> str:
        return "skellam" if self.mode == "distributed" else "gaussian"

    @property
    def settings(self) -> PrivacySettings | None:
        if self.sigma is None:
            return None
        return PrivacySettings(self.sigma, self.sample_rate, self.steps_per_round, self.delta)


# What `contribution` returns: the round machine's `TrainOutcome` (`ring` for a secure plan, `update` and `weight`
# for a plain one, the confusion matrix, ε spent), made only here.
Contribution = TrainOutcome


@dataclass
class _Bound:
    ledger: object
    data: SiteData
    projection: Projection


class SiteTrainer(ABC):
    """See the module docstring. One object per (site, plan)."""

    def __init__(self, plan: FederationPlan, *, bounds: SiteBounds | None = None, seed: int | None = None,
                 feature_cache=None, threads: int | None = None) -> None:
        self.plan = plan
        self.bounds = bounds or SiteBounds()
        self.seed = seed
        self.threads = threads
        self._cache = feature_cache
        self._model = None
        self._bound: _Bound | None = None
        if seed is not None:
            log.warning("this site's randomness (samples, noise) is SEEDED: reproducible by anyone who knows the "
                        "seed; for simulations only, never at a hospital")

    # -- what every trainer shares ------------------------------------------------------------------

    @property
    def model(self):
        if self._model is None:
            self._model = build_model(self.plan.model, len(self.plan.classes))
        return self._model

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def projection(self) -> Projection:
        if self._bound is None:
            raise RuntimeError("prepare() first")
        return self._bound.projection

    @property
    def ledger(self):
        return None if self._bound is None else self._bound.ledger

    @property
    def data(self) -> SiteData | None:
        return None if self._bound is None else self._bound.data

    def _base(self, budget: float, n_train: int | None, ledger) -> Projection:
        n = n_train or 2000
        delta = float(ledger.delta) if ledger is not None else self.ledger_delta(n)
        done = ledger.rounds if ledger is not None else 0
        spent = ledger.spent_epsilon() if ledger is not None and done else 0.0
        mode = self.plan.dp_mode if self.plan.dp else "none"
        proj = Projection(budget=float(budget), delta=delta, rounds=self.plan.rounds, rounds_done=done, spent=spent,
                          mode=mode, n_train=n, n_estimated=not n_train)
        problems = self.bounds.violations(self.plan)
        if problems:
            return replace(proj, refusal="the plan is outside what this site accepts: " + "; ".join(problems),
                           what_to_do="check the reasons with the federation's admin, or widen what this site "
                                      "accepts if your policy allows")
        if ledger is not None and float(ledger.budget_epsilon) != float(budget):
            stored = float(ledger.budget_epsilon)
            return replace(proj, refusal=f"this site's budget is ε = {budget:g}, but its privacy ledger for "
                                         f"federation {self.plan.federation_id!r} holds ε = {stored:g}",
                           what_to_do=f"change this federation's budget to {budget:g} (the app's Privacy page, or "
                                      f"`hemafed ledger budget {self.plan.federation_id} {budget:g}`), or set the "
                                      f"budget back to {stored:g}")
        return proj

    def ledger_delta(self, n_train: int) -> float:
        """The δ of this site's ledger for the plan: the plan's, and never above 1/N (nor 1e-5)."""
        return min(self.plan.delta, default_delta(n_train))

    def open_ledger(self, state, budget: float, n_train: int, *, create: bool, kind: str = "rdp"):
        """This federation's ledger in `state`: the one that exists, else (with `create`) a new one with `budget`
        and the δ the projection used; None when there is none and `create` is false (a plan being reviewed
        leaves nothing behind). Raises `PlanRefused` for a damaged ledger."""
        from ..privacy.ledger import LedgerCorrupt, PrivacyLedger

        try:
            return PrivacyLedger(self.plan.federation_id, state=state)
        except FileNotFoundError:
            if not create:
                return None
            return PrivacyLedger(self.plan.federation_id, budget, self.ledger_delta(n_train), kind=kind, state=state)
        except LedgerCorrupt as exc:
            raise PlanRefused([f"the privacy ledger is damaged ({exc})"],
                              "training is stopped until the ledger is restored from a backup; never delete it (the "
                              "spend it records would be lost)") from exc

    def bind_ledger(self, ledger) -> None:
        """The ledger created once the plan was accepted (`open_ledger(create=True)`) for the prepared data."""
        if self._bound is None:
            raise RuntimeError("prepare() first")
        self._bound.ledger = ledger

    def prepare(self, ledger, data: SiteData, budget: float) -> Projection:
        """Check the plan against this site's data, bounds and budget (fast: no features yet) and bind them.
        Raises `PlanRefused` with the reason and the next step when the site cannot run the plan."""
        problems = self._data_problems(data)
        if problems:
            raise PlanRefused(problems, "add training images to the site's data folder, or ask the federation's "
                                        "admin for a plan that fits a site of this size")
        proj = self.project(budget, len(data.train_labels), ledger)
        if proj.refusal:
            raise PlanRefused([proj.refusal], proj.what_to_do or "check the reason with the federation's admin")
        self._bound = _Bound(ledger, data, proj)
        return proj

    def featurize(self, progress: Progress | None = None, cancel: Cancel | None = None) -> None:
        """Compute what every round needs from the images (once per plan; the slow part of joining)."""
        if progress is not None:
            progress(1, 1, 0.0)

    def _randomness(self, rnd: int) -> tuple[torch.Generator, np.random.Generator]:
        """(Poisson sampling, noise and rounding) generators for round `rnd`: fresh OS randomness unless seeded."""
        if self.seed is None:
            return (torch.Generator().manual_seed(secrets.randbits(63)),
                    np.random.default_rng(secrets.randbits(128)))
        seq = np.random.SeedSequence([int(self.seed), int(rnd)])
        torch_seed, numpy_seed = seq.generate_state(2, np.uint64)
        return torch.Generator().manual_seed(int(torch_seed) >> 1), np.random.default_rng(int(numpy_seed))

    def _spent(self) -> float | None:
        ledger = self.ledger
        return None if ledger is None or not self.plan.dp else ledger.spent_epsilon()

    def _data_problems(self, data: SiteData) -> list[str]:
        if len(data.train_labels) == 0:
            return ["no usable training images"]
        return []

    def _set_threads(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)

    @abstractmethod
    def project(self, budget: float, n_train: int | None, ledger=None, *, accountant: str = "rdp") -> Projection:
        """σ, q, steps per round, δ and ε after each round still to come at this site for `budget`, on top of
        `ledger` (a `PrivacyLedger` or `LedgerView`; None: a site that has not spent anything here, accounted
        with `accountant`)."""

    @abstractmethod
    def validation_logits(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits, labels) of this site's validation images under the global `weights` (calibration)."""

    @abstractmethod
    def contribution(self, rnd: int, weights: np.ndarray, cancel: Cancel | None = None,
                     progress: Progress | None = None) -> Contribution:
        """This site's part of round `rnd` from the global `weights`: evaluate, check the budget (raises
        `BudgetExhausted`, nothing recorded), train, record the spend durably, add the noise, quantize.
        `cancel()` true before the spend is recorded raises `TrainingCancelled` (nothing recorded)."""


# ---------------------------------------------------------------------------------------------- DP-FedSGD


class FedSGDTrainer(SiteTrainer):
    """One Poisson-sampled DP-SGD step per round over the model's fixed features (`core.learning.fedsgd`)."""

    def __init__(self, plan: FederationPlan, **kwargs) -> None:
        super().__init__(plan, **kwargs)
        self._privacy = None
        self.inputs: torch.Tensor | None = None
        self.val_inputs: torch.Tensor | None = None
        self.moments: torch.Tensor | None = None
        self.val_measurements: np.ndarray | None = None

    @property
    def privacy(self):
        """The plan's `SitePrivacy` (σ, q, C, the ring encoding): identical at every site and the aggregator."""
        if self._privacy is None:
            self._privacy = site_privacy(self.plan, self.plan.secagg_config(self.n_params))
        return self._privacy

    def project(self, budget: float, n_train: int | None, ledger=None, *, accountant: str = "rdp") -> Projection:
        proj = self._base(budget, n_train, ledger)
        if proj.refusal:
            return proj
        plan = self.plan
        if not (plan.dp and plan.secagg):
            return replace(proj, refusal="a fedsgd plan must use differential privacy and secure aggregation")
        if plan.noise_multiplier <= 0:
            return replace(proj, refusal="the plan has no noise multiplier σ")
        p = self.privacy
        proj = replace(proj, sigma=p.sigma, sample_rate=p.sample_rate, steps_per_round=1)
        remaining = max(plan.rounds - proj.rounds_done, 0)
        acc = ledger.accountant() if ledger is not None else Accountant(accountant)  # type: ignore[arg-type]
        curve = tuple(acc.epsilon_curve(p.sigma, p.sample_rate, 1, remaining, proj.delta, skellam=p.skellam))
        allowed = sum(1 for e in curve if e <= budget)
        proj = replace(proj, epsilon_per_round=curve, rounds_allowed=allowed)
        if curve and curve[-1] > budget:
            return replace(proj, what_to_do=BUDGET_WHAT_TO_DO, refusal=(
                f"the budget is too small for this plan: its {len(curve)} rounds at the federation's noise "
                f"σ = {p.sigma:.3g} would spend ε = {curve[-1]:.3g}, more than this site's budget {budget:g}; the "
                f"budget covers {allowed} of them"))
        return proj

    def featurize(self, progress: Progress | None = None, cancel: Cancel | None = None) -> None:
        """The fixed features of every local training and validation image (`FeatureCache`: a second federation
        on the same images reads them back at once); for a model without fixed features, the image tensors."""

        data = self.data
        if data is None:
            raise RuntimeError("prepare() first")
        if self.inputs is None:
            self._set_threads()
            _, self.trainable = split_features(self.model)
            n_train, n_val = len(data.train_labels), len(data.val_labels)

            started, first_done = time.monotonic(), None

            def part(offset: int) -> Progress | None:
                """Progress over both sets, with the time left estimated from the rate so far (images read
                back from the cache count as done at once, not in the rate)."""
                if progress is None:
                    return None

                def report(done: int, total: int, left: float | None) -> None:
                    nonlocal first_done
                    done += offset
                    if first_done is None:
                        first_done = done
                    rate = (time.monotonic() - started) / (done - first_done) if done > first_done else None
                    remaining = n_train + n_val - done
                    progress(done, n_train + n_val, 0.0 if remaining == 0 else None if rate is None else
                             remaining * rate)

                return report

            inputs = model_inputs(self.plan, self.model, data.train_images, "train", self._cache, part(0), cancel)
            self.val_inputs = model_inputs(self.plan, self.model, data.val_images, "eval", self._cache,
                                           part(n_train), cancel)
            self.labels = torch.as_tensor(np.asarray(data.train_labels).reshape(-1), dtype=torch.long)
            self.val_labels = np.asarray(data.val_labels).reshape(-1)
            if moments_layout(self.trainable) is not None:  # the cell check's per-record moments (cheap)
                self.moments = torch.as_tensor(moment_vector(standardised(data.train_images)))
                self.val_measurements = standardised(data.val_images)
            self.inputs = inputs
        elif progress is not None:
            progress(1, 1, 0.0)  # prepared before (the same plan again after a reconnect)

    def cell_scores(self, weights: np.ndarray) -> np.ndarray | None:
        """This site's validation images' cell-check scores under the federation's moments in `weights` (None for a
        model without the check or before its moments are estimated)."""
        if self.val_measurements is None:  # set by `featurize` for a model with the check only
            return None
        stats = CellStats.from_moments(np.asarray(weights)[moments_layout(self.trainable)])
        return None if stats is None else stats.score_measurements(self.val_measurements)

    def validation_logits(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.data is None:
            raise RuntimeError("prepare() first")
        if self.inputs is None:
            self.featurize()
        set_flat_params(self.trainable, weights)
        if len(self.val_labels) == 0:  # a party without validation images (the one-party baseline)
            return np.zeros((0, len(self.plan.classes))), np.zeros(0, np.int64)
        was_training = self.trainable.training
        self.trainable.eval()
        with torch.no_grad():
            logits = self.trainable(self.val_inputs).double().numpy()
        self.trainable.train(was_training)
        return logits, np.asarray(self.val_labels).reshape(-1)

    def contribution(self, rnd: int, weights: np.ndarray, cancel: Cancel | None = None,
                     progress: Progress | None = None) -> Contribution:
        if self.inputs is None:
            self.featurize(cancel=cancel)
        self._set_threads()
        ledger, p, plan = self.ledger, self.privacy, self.plan
        confusion, extras = validation_figures(*self.validation_logits(weights), len(plan.classes),
                                               self.cell_scores(weights))
        if cancel is not None and cancel():
            raise TrainingCancelled("stopped before the round's gradient")
        generator, rng = self._randomness(rnd)
        ledger.check_round(p.sigma, p.sample_rate, 1, skellam=p.skellam)
        gs = self._round_sum(rnd, generator)
        entry = ledger.record_round(rnd, p.sigma, p.sample_rate, 1, model_hash(np.asarray(weights, np.float32)),
                                    protection=p.protection())
        # From here on the spend is on disk: the vector may leave.
        vec = gs.vector.astype(np.float64)
        hook = None
        if p.mode == "local":
            vec += gaussian_noise(len(vec), p.sigma * p.clip_norm, rng)
        else:
            hook = p.codec.noise_hook(rng)
        cfg = plan.secagg_config(self.n_params)
        ring = quantize(cfg, p.codec.encode(vec, cfg.clip), cfg.max_weight, extras, rng, noise=hook)
        if progress is not None:
            progress(1, 1, 0.0)
        return TrainOutcome(rnd, confusion, cfg.max_weight, ring=ring, epsilon_spent=ledger.spent_epsilon(),
                            loss=gs.loss_sum / max(1, gs.batch_size), steps=1, entry=entry)


    def _round_sum(self, rnd: int, generator: torch.Generator) -> GradientSum:
        """Round `rnd`'s clipped per-record sum before noise (`clipped_round_sum` over this site's Poisson sample).
        A method so that the privacy audit (`hemafed.network.sim.audit_trainer`) can add its canaries here, where
        a record's clipped gradient enters the sum; nothing else overrides it."""
        p = self.privacy
        return clipped_round_sum(self.trainable, self.inputs, self.labels, p.sample_rate, p.clip_norm, generator,
                                 self.moments)


def confusion_counts(labels: np.ndarray, predicted: np.ndarray, k: int) -> np.ndarray:
    """The k × k confusion matrix (int64, rows = true class, columns = predicted)."""
    labels = np.asarray(labels, np.int64).reshape(-1)
    return np.bincount(labels * k + np.asarray(predicted, np.int64), minlength=k * k).reshape(k, k).astype(np.int64)


def validation_figures(logits: np.ndarray, labels: np.ndarray, k: int,
                       cell_scores: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(confusion matrix, the extras a secure round's masked vector carries: the confusion counts, the NLL sums at
    each temperature of `CALIBRATION_GRID` for the federation's calibration, then how many cell-check `cell_scores`
    lie above each of `CELL_SCORE_EDGES` — zeros without them) of this site's validation images."""
    labels = np.asarray(labels, np.int64).reshape(-1)
    predicted = np.asarray(logits).argmax(axis=1) if len(labels) else np.zeros(0, np.int64)
    confusion = confusion_counts(labels, predicted, k)
    tails = cell_tails(cell_scores) if cell_scores is not None else np.zeros(len(CELL_SCORE_EDGES), np.int64)
    return confusion, np.concatenate([confusion.reshape(-1), nll_sums(logits, labels), tails]).astype(np.int64)


def model_inputs(plan: FederationPlan, model, images: np.ndarray, view: str, cache=None,
                 progress: Progress | None = None, cancel: Cancel | None = None) -> torch.Tensor:
    """What the model's trainable part takes for `images` ((N, H, W, 3) uint8): its fixed features for training
    (`view` "train") or evaluation ("eval", with its test-time augmentation), read from or added to the feature
    cache; for a model without fixed features, the normalised image tensors. `cancel()` true between chunks
    raises `TrainingCancelled` (what was computed stays cached)."""

    fmap = split_features(model)[0] if view == "train" else evaluation_features(model)
    kinds = feature_kinds(plan.model, model)
    size = plan.input_size
    if kinds is None:
        return fmap(images_to_tensor(images, size))
    cache = cache if cache is not None else FeatureCache()
    try:
        return cache.features(kinds[0 if view == "train" else 1], images,
                              lambda im: fmap(images_to_tensor(im, size)), progress=progress, cancel=cancel)
    except FeaturesCancelled as exc:
        raise TrainingCancelled(str(exc)) from exc


def fedsgd_plan_sigma(plan: FederationPlan, epsilon: float, dim: int | None = None, mode: str | None = None) -> float:
    """The σ every site of a fedsgd `plan` shares so that its rounds spend exactly `epsilon` per site under
    `mode` (default: the plan's `dp_mode`): Gaussian for local DP, Skellam in the plan's ring for distributed
    DP. The admin's side of the calibration (`core.learning.recipe`); each site then checks it with
    `FedSGDTrainer.project`."""

    if dim is None:
        dim = sum(p.numel() for p in build_model(plan.model, len(plan.classes)).parameters())
    if (mode or plan.dp_mode) == "local":
        return calibrate_sigma(epsilon, plan.delta, plan.sample_rate, plan.rounds)
    # Δ₂, Δ₁ do not depend on σ: derive them with a placeholder σ, then calibrate
    codec = DistributedNoise.for_secagg(plan.secagg_config(dim), 1.0, plan.clip_norm, plan.dp_colluders)
    return calibrate_sigma(epsilon, plan.delta, plan.sample_rate, plan.rounds,
                           skellam=(codec.l2_sensitivity, codec.l1_sensitivity))


# ---------------------------------------------------------------------------------------------- FedAvg


class FedAvgTrainer(SiteTrainer):
    """Local epochs of DP-SGD from the global model (`core.learning.dp_train`), σ fitted to this site's budget for
    the plan's remaining rounds; local DP (each site adds the full noise), masked or plain."""

    def project(self, budget: float, n_train: int | None, ledger=None, *, accountant: str = "rdp") -> Projection:
        proj = self._base(budget, n_train, ledger)
        if proj.refusal:
            return proj
        plan = self.plan
        if not plan.dp:
            return replace(proj, refusal=None if not self.bounds.require_dp else "the plan is non-private")
        n = proj.n_train
        if n < plan.batch_size and not proj.n_estimated:
            return replace(proj, refusal=f"only {n} training images, fewer than the plan's batch size "
                                         f"{plan.batch_size}")
        q, steps = sample_rate(n, plan.batch_size), steps_per_round(n, plan.batch_size, plan.local_epochs)
        proj = replace(proj, sample_rate=q, steps_per_round=steps)
        remaining = max(plan.rounds - proj.rounds_done, 1)
        acc = ledger.accountant() if ledger is not None else Accountant(accountant)  # type: ignore[arg-type]
        kind = acc.kind
        prior = list(acc.history)
        try:
            sigma = calibrate_sigma(budget, proj.delta, q, steps * remaining, kind=kind, prior=prior)
        except BudgetTooSmall as exc:
            allowed = max_rounds(MAX_SIGMA, budget, proj.delta, q, steps, kind=kind, prior=prior)
            return replace(proj, rounds_allowed=allowed, what_to_do=BUDGET_WHAT_TO_DO, refusal=(
                f"the budget is too small for this plan: {exc}. Even at the most noise allowed (σ = {MAX_SIGMA:g}) "
                f"it covers {allowed} of {remaining} rounds"))
        curve = tuple(acc.epsilon_curve(sigma, q, steps, remaining, proj.delta))
        return replace(proj, sigma=sigma, epsilon_per_round=curve, rounds_allowed=remaining)

    def _sigma_for(self, rnd: int, q: float, steps: int) -> float:
        """The projection's σ, unless this site was charged for more rounds than came before `rnd`: a round the
        aggregator re-ran after a restart is a second release and is charged again, so σ is fitted anew for the
        plan's rounds from `rnd` on in the budget that is left. The σ depends only on that count, never on the
        images. Without it the re-run would use the last round's share and the site would have to decline it."""
        proj, ledger = self.projection, self.ledger
        if ledger.rounds <= rnd - 1:
            return proj.sigma
        remaining = max(self.plan.rounds - rnd + 1, 1)
        acc = ledger.accountant()
        try:
            sigma = calibrate_sigma(proj.budget, proj.delta, q, steps * remaining, kind=acc.kind,
                                    prior=list(acc.history))
        except BudgetTooSmall:
            return proj.sigma  # check_round refuses it with the numbers
        if sigma > proj.sigma:
            log.info("round %d: %d rounds charged so far (a re-run round counts twice): σ %.4g → %.4g so that "
                     "the %d rounds left fit the budget", rnd, ledger.rounds, proj.sigma, sigma, remaining)
            curve = tuple(acc.epsilon_curve(sigma, q, steps, remaining, proj.delta))
            self._bound.projection = replace(proj, sigma=sigma, epsilon_per_round=curve, rounds_done=ledger.rounds,
                                             rounds_allowed=remaining)
            return sigma
        return proj.sigma

    def _data_problems(self, data: SiteData) -> list[str]:
        n = len(data.train_labels)
        plan = self.plan
        if n < plan.batch_size:
            return [f"only {n} training images, fewer than the batch size {plan.batch_size}"]
        if plan.secagg and n > plan.max_weight:
            return [f"{n} training images, more than the plan's max_weight {plan.max_weight}"]
        return []

    def featurize(self, progress: Progress | None = None, cancel: Cancel | None = None) -> None:
        data = self.data
        if data is None:
            raise RuntimeError("prepare() first")
        if getattr(self, "inputs", None) is None:
            self.inputs = images_to_tensor(data.train_images, self.plan.input_size)
            self.val_inputs = images_to_tensor(data.val_images, self.plan.input_size)
        if progress is not None:
            progress(1, 1, 0.0)

    def validation_logits(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.data is None:
            raise RuntimeError("prepare() first")
        if getattr(self, "inputs", None) is None:
            self.featurize()
        model = build_model(self.plan.model, len(self.plan.classes))
        set_flat_params(model, weights)
        return self._validation_logits(model)

    def _validation_logits(self, model) -> tuple[np.ndarray, np.ndarray]:
        labels = np.asarray(self.data.val_labels).reshape(-1)
        if len(labels) == 0:
            return np.zeros((0, len(self.plan.classes))), labels.astype(np.int64)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            logits = model(self.val_inputs).double().numpy()
        model.train(was_training)
        return logits, labels

    def contribution(self, rnd: int, weights: np.ndarray, cancel: Cancel | None = None,
                     progress: Progress | None = None) -> Contribution:
        if getattr(self, "inputs", None) is None:
            self.featurize()
        self._set_threads()
        plan, data, ledger = self.plan, self.data, self.ledger
        model = build_model(plan.model, len(plan.classes))
        set_flat_params(model, weights)
        confusion, extras = validation_figures(*self._validation_logits(model), len(plan.classes))
        flag = _Flag(cancel)
        if flag.is_set():
            raise TrainingCancelled("stopped before training")
        config = LocalTrainConfig(local_epochs=plan.local_epochs, batch_size=plan.batch_size, lr=plan.lr,
                                  momentum=plan.momentum, clip_norm=plan.clip_norm, dp=plan.dp)
        sigma = self.projection.sigma if plan.dp else 0.0
        labels = data.train_labels
        n = len(labels)
        if plan.dp:
            q, steps = sample_rate(n, plan.batch_size), steps_per_round(n, plan.batch_size, plan.local_epochs)
            sigma = self._sigma_for(rnd, q, steps)
            ledger.check_round(sigma, q, steps)
        start_hash = model_hash(model)
        seed = None if self.seed is None else int(np.random.SeedSequence([self.seed, rnd]).generate_state(1)[0])

        def steps_done(step: int, total: int, loss: float) -> None:
            if progress is not None:
                progress(step, total, None)

        try:
            result = train_local(model, self.inputs, labels, config, noise_multiplier=sigma, seed=seed,
                                 progress=steps_done, cancel=flag)
        except StepsCancelled as exc:
            raise TrainingCancelled(str(exc)) from exc
        entry = None
        if plan.dp:
            # what was trained must be what is recorded: a mismatch would be an accounting bug
            if (result.noise_multiplier, result.sample_rate, result.steps) != (float(sigma), q, steps):
                raise RuntimeError("trained (σ, q, steps) differ from the checked ones; refusing to record or send")
            entry = ledger.record_round(rnd, result.noise_multiplier, result.sample_rate, result.steps, start_hash)
        else:
            log.warning("round %d: NON-PRIVATE update (the plan turns differential privacy off)", rnd)
        out = TrainOutcome(rnd, confusion, n, epsilon_spent=self._spent(), loss=result.mean_loss, steps=result.steps,
                           entry=entry)
        out.update = result.update  # a secure plan sends only the ring below; the update stays here
        if plan.secagg:
            _, rng = self._randomness(rnd)
            cfg = plan.secagg_config(self.n_params)
            out.ring = quantize(cfg, result.update, n, extras, rng)
        return out


class _Flag:
    """`train_local`'s cancel flag from a `cancel()` callable."""

    def __init__(self, cancel: Cancel | None) -> None:
        self.cancel = cancel

    def is_set(self) -> bool:
        return bool(self.cancel is not None and self.cancel())


def site_trainer(plan: FederationPlan, **kwargs) -> SiteTrainer:
    """The trainer for `plan`'s algorithm (`FedSGDTrainer` or `FedAvgTrainer`)."""
    return (FedSGDTrainer if plan.algorithm == "fedsgd" else FedAvgTrainer)(plan, **kwargs)


__all__ = ["Contribution", "FedAvgTrainer", "FedSGDTrainer", "Projection", "SiteData", "SiteTrainer",
           "TrainingCancelled", "fedsgd_plan_sigma", "model_inputs", "site_trainer"]
