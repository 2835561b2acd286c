"""DP-FedSGD: one Poisson-sampled DP-SGD step per round, summed over hospitals.

Each round every hospital draws its own Poisson batch (each of its records joins
independently with probability q), computes per-sample gradients of the global
model, clips each to L2 norm C and sums them. The aggregator learns only the sum
over hospitals (secure aggregation) plus noise, divides by the expected batch
q·ΣN and takes one SGD-with-momentum step. With the same q at every hospital the
union of the hospitals' batches *is* a Poisson sample of the union at rate q, so
this is exactly central DP-SGD over all hospitals' records (Dirichlet label skew
does not bias it: every record counts once, wherever it lives).

Noise (`core.distributed_noise` and the plan's `dp_mode`):

* ``local``: each hospital adds N(0, σ²C²) to its own sum before it leaves; the
  sum over n hospitals carries nσ²C² (√n more noise than needed), trusting no one.
* ``distributed``: each hospital adds an integer Skellam share of variance
  σ²Δ²/t in the secure-aggregation ring; any ≥ t survivors' sum carries ≥ σ²Δ².

Per-record ε is the same (σ, q, steps) in both modes; see docs/privacy.md for what
each mode protects against.

Feature centring (a `CenteredLinear` head, `core.models`): while the head's center is
all zeros, a round's per-record vector is the record's feature vector clipped to the
head's radius R and scaled by C/R (so its norm is ≤ C, as a clipped gradient's), and
the server sets the center to R/C · noisy sum / expected batch instead of stepping.
Same q, σ, C and mechanism as any round: the ledger and accountant count it as one.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..privacy.distributed_noise import DistributedNoise
from ..privacy.ledger import Protection
from ..rounds.plan import PlanError
from .cell_check import GRADIENT_SHARE, MOMENT_RADIUS, MOMENT_SHARE
from .models import MODELS, CenteredLinear, build_model, split_features
from .per_sample import make_clipper


@dataclass
class GradientSum:
    """One hospital's contribution before noise: Σ_i clip_C(∇ℓ_i) over its Poisson batch.

    `batch_size` (the realised Poisson batch) must never leave the site in the clear:
    the expected batch q·N is what the server divides by.
    """

    vector: np.ndarray  # float32, flat, over the trainable parameters in `parameters()` order
    batch_size: int
    loss_sum: float
    n_samples: int
    sample_rate: float
    clip_norm: float


def prepare_inputs(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The fixed (data-independent) part of the model applied once to all of a site's images."""

    features, _ = split_features(model)
    return features(images)


def _sum_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy. Logits (B, k, C) are k views of each record (augmentation
    multiplicity, De et al. 2022): the record's loss is the mean over its views, so its
    per-sample gradient — the thing clipped — is the average of the k views' gradients."""
    if logits.dim() == 3:
        k = logits.shape[1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[2]), labels.repeat_interleave(k),
                               reduction="sum") / k
    return F.cross_entropy(logits, labels, reduction="sum")


def poisson_batch(n: int, sample_rate: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of a Poisson sample: each of n records independently with probability q."""
    return torch.nonzero(torch.rand(n, generator=generator) < sample_rate).view(-1)


def _round_sample(n: int, sample_rate: float, clip_norm: float, generator: torch.Generator | None) -> torch.Tensor:
    """A round's Poisson batch of n records (from OS randomness unless `generator`), after checking q and C."""
    if not 0 < sample_rate <= 1 or not clip_norm > 0:
        raise ValueError("need 0 < sample_rate ≤ 1 and clip_norm > 0")
    if generator is None:
        generator = torch.Generator().manual_seed(secrets.randbits(63))
    return poisson_batch(n, sample_rate, generator)


def clipped_gradient_sum(trainable: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, sample_rate: float,
                         clip_norm: float, generator: torch.Generator | None = None,
                         indices: torch.Tensor | None = None) -> GradientSum:
    """Draw a Poisson batch (or use `indices`) and return the clipped per-sample gradient sum.

    `trainable` is the part of the model that is trained (`split_features(model)[1]`)
    and `inputs` what `prepare_inputs` produced. No noise is added here.
    """
    n = len(labels)
    if indices is None:
        indices = _round_sample(n, sample_rate, clip_norm, generator)
    elif not 0 < sample_rate <= 1 or not clip_norm > 0:
        raise ValueError("need 0 < sample_rate ≤ 1 and clip_norm > 0")

    if isinstance(trainable, CenteredLinear):  # W and b train on centred inputs; the center gets no gradient
        if len(indices) == 0:
            gs = clipped_gradient_sum(trainable.linear, inputs, labels, sample_rate, clip_norm, indices=indices)
        else:  # centre only the sampled records: the whole input tensor each round would dominate the step
            gs = clipped_gradient_sum(trainable.linear, trainable.centred_inputs(inputs[indices]).detach(),
                                      labels[indices], sample_rate, clip_norm,
                                      indices=torch.arange(len(indices)))
            gs.n_samples = n
        full = np.zeros(sum(p.numel() for p in trainable.parameters()), np.float32)
        rest = np.ones(full.size, bool)
        rest[trainable.center_slice()] = False
        if trainable.moments_slice() is not None:
            rest[trainable.moments_slice()] = False
        full[rest] = gs.vector  # W then b, in parameters() order
        gs.vector = full
        return gs
    params = [p for p in trainable.parameters()]
    if len(indices) == 0:
        vec = np.zeros(sum(p.numel() for p in params), np.float32)
        return GradientSum(vec, 0, 0.0, n, sample_rate, clip_norm)
    was_training = trainable.training
    trainable.train()
    clipper = make_clipper(trainable, "bk")
    try:
        with clipper:
            grads, _, loss_sum = clipper.clipped_sum(inputs[indices], labels[indices], _sum_ce, clip_norm)
    finally:
        clipper.close()
        trainable.train(was_training)
    vec = torch.cat([g.reshape(-1) for g in grads]).numpy().astype(np.float32)
    return GradientSum(vec, len(indices), float(loss_sum), n, sample_rate, clip_norm)


def clipped_round_sum(trainable: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, sample_rate: float,
                      clip_norm: float, generator: torch.Generator | None = None,
                      moments: torch.Tensor | None = None) -> GradientSum:
    """This round's per-record sum: the clipped gradient sum, or, for a `CenteredLinear` head whose center
    is not set yet, Σ_i clip_R(x_i)·C/R over the Poisson batch in the center's coordinates (zeros for W, b).
    For a head with the cell check's moments (`core.learning.cell_check`), once centred: each record's gradient
    clipped to GRADIENT_SHARE·C beside its `moments` row (norm ≤ MOMENT_RADIUS) scaled to ≤ MOMENT_SHARE·C.
    Either way each record moves the vector by at most C: the same sensitivity, the same accounting."""

    if isinstance(trainable, CenteredLinear) and trainable.centered and trainable.moments_slice() is not None:
        if moments is None:
            raise ValueError("this model's rounds carry the cell check's moments: pass them")
        indices = _round_sample(len(labels), sample_rate, clip_norm, generator)
        gs = clipped_gradient_sum(trainable, inputs, labels, sample_rate, GRADIENT_SHARE * clip_norm,
                                  indices=indices)
        rows = moments[indices].double()
        scale = (MOMENT_RADIUS / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
        gs.vector[trainable.moments_slice()] = (rows * scale).sum(0).numpy() * (MOMENT_SHARE * clip_norm
                                                                               / MOMENT_RADIUS)
        gs.clip_norm = clip_norm
        return gs
    if not isinstance(trainable, CenteredLinear) or trainable.centered:
        return clipped_gradient_sum(trainable, inputs, labels, sample_rate, clip_norm, generator)
    x = inputs[_round_sample(len(labels), sample_rate, clip_norm, generator)].double()
    norms = x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    scale = (trainable.radius / norms).clamp(max=1.0) * (clip_norm / trainable.radius)
    vec = np.zeros(sum(p.numel() for p in trainable.parameters()), np.float32)
    vec[trainable.center_slice()] = (x * scale).sum(0).numpy()
    return GradientSum(vec, len(x), 0.0, len(labels), sample_rate, clip_norm)


def center_layout(trainable: nn.Module) -> tuple[slice, float] | None:
    """(the center's coordinates in the flat weight vector, the radius) for a `CenteredLinear` head."""

    if not isinstance(trainable, CenteredLinear):
        return None
    return trainable.center_slice(), trainable.radius


def moments_layout(trainable: nn.Module) -> slice | None:
    """The cell check's moments' coordinates in the flat weight vector (None for a head without them)."""

    return trainable.moments_slice() if isinstance(trainable, CenteredLinear) else None


def gaussian_noise(dim: int, std: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """N(0, std²) per coordinate from OS randomness by default (the local-DP share)."""
    rng = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
    return rng.normal(0.0, std, size=dim).astype(np.float32)


class FedSGDServer:
    """The aggregator's step: w ← w − lr·v, v ← μ·v + g, g = noisy sum / (q·ΣN).

    Optional EMA of the weights (De et al. 2022) for evaluation and release; it is
    post-processing of already-private models and costs no privacy.
    """

    def __init__(self, lr: float, momentum: float = 0.9, ema: float = 0.0, center_rounds: int = 1) -> None:
        if not lr > 0 or not 0 <= momentum < 1 or not 0 <= ema < 1 or not center_rounds >= 1:
            raise ValueError("need lr > 0, 0 ≤ momentum < 1, 0 ≤ ema < 1, center_rounds ≥ 1")
        self.lr, self.momentum, self.ema_decay = lr, momentum, ema
        self.center_rounds = int(center_rounds)
        self.velocity: np.ndarray | None = None
        self.ema: np.ndarray | None = None
        self.moment_rounds = 0  # rounds averaged into the cell check's moments so far
        # the centre's estimates so far (their sum, how many), while fewer than `center_rounds` are in
        self.center_sum: np.ndarray | None = None
        self.center_done = 0

    def apply(self, weights: np.ndarray, noisy_sum: np.ndarray, expected_batch: float,
              center: tuple[slice, float] | None = None, clip_norm: float = 1.0,
              moments: slice | None = None) -> np.ndarray:
        """One step. With `center` (`center_layout`): while those weights are all zero this round's sum
        estimates them (radius/C · sum / expected batch, nothing else moves); after `center_rounds` such rounds
        they are set to the estimates' average (until then they stay zero, so the sites send feature sums again),
        and afterwards they stay.
        With `moments` (`moments_layout`), in every later round: those weights become the average over the
        rounds so far of R/(share·C) · sum / expected batch (the cell check's moments), not a gradient step."""
        if not expected_batch > 0 or not math.isfinite(expected_batch):
            raise ValueError("expected batch must be positive")
        if center is not None:
            where, radius = center
            if not np.any(weights[where]):
                estimate = noisy_sum[where].astype(np.float64) * (radius / clip_norm) / expected_batch
                self.center_sum = estimate if self.center_sum is None else self.center_sum + estimate
                self.center_done += 1
                new = np.array(weights, np.float32)
                if self.center_done >= self.center_rounds:
                    new[where] = self.center_sum / self.center_done
                    self.center_sum, self.center_done = None, 0
                return new
            noisy_sum = np.array(noisy_sum, np.float64)
            noisy_sum[where] = 0.0
        average = None
        if moments is not None:
            noisy_sum = np.array(noisy_sum, np.float64)
            estimate = noisy_sum[moments] * (MOMENT_RADIUS / (MOMENT_SHARE * clip_norm)) / expected_batch
            self.moment_rounds += 1
            previous = np.asarray(weights[moments], np.float64)
            average = previous + (estimate - previous) / self.moment_rounds
            noisy_sum[moments] = 0.0
        g = noisy_sum.astype(np.float64) / expected_batch
        self.velocity = g if self.velocity is None else self.momentum * self.velocity + g
        new = (weights - self.lr * self.velocity).astype(np.float32)
        if average is not None:
            new[moments] = average
        if self.ema_decay:
            self.ema = new.copy() if self.ema is None else \
                (self.ema_decay * self.ema + (1 - self.ema_decay) * new).astype(np.float32)
            if average is not None:
                self.ema[moments] = average
        return new

    def state(self) -> dict[str, np.ndarray]:
        out = {}
        if self.velocity is not None:
            out["velocity"] = self.velocity
        if self.ema is not None:
            out["ema"] = self.ema
        if self.moment_rounds:
            out["moment_rounds"] = np.array([self.moment_rounds], np.int64)
        if self.center_sum is not None:
            out["center_sum"] = self.center_sum
            out["center_done"] = np.array([self.center_done], np.int64)
        return out

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.velocity = state.get("velocity")
        self.ema = state.get("ema")
        rounds = state.get("moment_rounds")
        self.moment_rounds = int(np.asarray(rounds).reshape(-1)[0]) if rounds is not None else 0
        self.center_sum = state.get("center_sum")
        done = state.get("center_done")
        self.center_done = int(np.asarray(done).reshape(-1)[0]) if done is not None else 0


Evaluate = Callable[[np.ndarray], float]


# --------------------------------------------------------------------------- the plan's privacy parameters
#
# Every site and the aggregator derive the same `SitePrivacy` from the plan (`site_privacy`). A site's round
# goes through `core.learning.site_trainer.FedSGDTrainer`; the aggregator's step is `server_round`.


@dataclass(frozen=True)
class SitePrivacy:
    """What a site derives from the plan at join time (identical at every site and the aggregator)."""

    mode: str  # "local" | "distributed"
    sigma: float
    sample_rate: float
    clip_norm: float
    codec: object  # core.distributed_noise.DistributedNoise: the ring encoding (and, if distributed, the noise)
    # The server divides the noisy sum by this plan constant (the plan's `batch_size`, set to ≈ q·ΣN from the
    # sizes the hospitals declared), never by a count computed from the data: an exact record count in the
    # clear would not be covered by the DP guarantee.
    expected_batch: float = 1.0
    center: tuple[slice, float] | None = None  # the model head's feature center (`center_layout`)
    moments: slice | None = None  # the cell check's moments (`moments_layout`)

    @property
    def skellam(self) -> tuple[float, float] | None:
        if self.mode != "distributed":
            return None
        return (self.codec.l2_sensitivity, self.codec.l1_sensitivity)

    def protection(self):
        """The ledger's `Protection` for one round of this plan."""

        if self.mode == "local":
            return Protection()
        c = self.codec
        return Protection(
            dp_mode="distributed", mechanism="skellam", l2_sensitivity=c.l2_sensitivity,
            l1_sensitivity=c.l1_sensitivity, threshold=c.threshold, colluders=c.colluders,
            share_variance=c.share_variance,
            protection=(f"distributed DP: this site added a Skellam share (variance σ²Δ²/(t−c), "
                        f"t={c.threshold}, c={c.colluders}); the unmasked sum of ≥ {c.threshold} sites carries "
                        f"noise σ={self.sigma:.4g}. "
                        "Holds against the aggregator, every other site and users of the model, assuming a "
                        "semi-honest aggregator and secure aggregation with threshold t; "
                        f"if {c.colluders + 1} or more sites pool their own shares, σ drops to "
                        f"{c.sigma_with(c.colluders + 1):.4g} for the rest"))


def site_privacy(plan, secagg_cfg, bounds=None) -> SitePrivacy:
    """Check a DP-FedSGD plan (and the site's bounds) and derive the round's privacy parameters."""

    if plan.algorithm != "fedsgd" or not plan.dp:
        raise PlanError("site_privacy is for private fedsgd plans")
    if bounds is not None:
        problems = bounds.violations(plan)
        if problems:
            raise PlanError("; ".join(problems))
    if plan.noise_multiplier <= 0:
        raise PlanError("a fedsgd plan needs a plan-wide noise_multiplier")

    codec = DistributedNoise.for_secagg(secagg_cfg, plan.noise_multiplier, plan.clip_norm,
                                        plan.dp_colluders if plan.dp_mode == "distributed" else 0)
    spec = MODELS.get(plan.model)  # only a centred model is built here, for where its centre sits
    head = split_features(build_model(plan.model, len(plan.classes)))[1] \
        if spec is not None and spec.centred else None
    return SitePrivacy(plan.dp_mode, plan.noise_multiplier, plan.sample_rate, plan.clip_norm, codec,
                       float(plan.batch_size), center_layout(head) if head is not None else None,
                       moments_layout(head) if head is not None else None)


def server_round(server: FedSGDServer, privacy: SitePrivacy, weights: np.ndarray, ring_sum: np.ndarray,
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(new weights, summed extras) from the unmasked ring sum of one round."""
    codec = privacy.codec
    grad_sum = codec.decode(ring_sum[:codec.dim])
    return (server.apply(weights, grad_sum, privacy.expected_batch, privacy.center, privacy.clip_norm,
                         privacy.moments),
            ring_sum[codec.dim + 1:].astype(np.int64))
