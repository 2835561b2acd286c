"""Distributed DP noise in the secure-aggregation ring: Skellam shares.

In ``distributed`` mode each hospital adds to its *integer* (quantized) gradient
sum a share of Skellam noise, Sk = Poisson(μ/2) − Poisson(μ/2) per coordinate
(variance μ). Sums of independent Skellams are exactly Skellam, so the sum the
aggregator unmasks carries Skellam noise whose variance is the sum of the
survivors' shares. Each share has variance σ²Δ₂²/(t − c), so any t survivors,
less the shares known to c colluding parties, still carry ≥ σ²Δ₂²; the plan's
secure-aggregation threshold t guarantees at least t survivors (otherwise nothing
is unmasked). c defaults to 1: every hospital knows its own share and sees the
next global model, so from its point of view the others' records are protected by
the remaining shares only.

Privacy (Agarwal, Kairouz & Liu 2021, "The Skellam Mechanism for Differentially
Private Federated Learning", NeurIPS, Cor. 3.6): for an integer-valued query with
L2/L1 sensitivities Δ₂, Δ₁ and Skellam noise of variance μ per coordinate, for
every integer α > 1

    ε(α) ≤ α Δ₂²/(2μ) + min( ((2α − 1)Δ₂² + 6Δ₁) / (4μ²),  3Δ₁/(2μ) ).

The first term is the Gaussian mechanism's with σ² = μ. Poisson subsampling at
rate q is accounted with the amplification bound for Poisson subsampling at
integer orders (Steinke 2022, arXiv 2210.00597, Thm. 29: any mechanism with an RDP
curve; it reproduces the exact subsampled-Gaussian RDP when fed the Gaussian
curve); steps compose by adding RDP, and (ε, δ) comes from Opacus' RDP→DP
conversion. `skellam_rdp` below is what `core.accounting` uses.

Sensitivity in the ring. A site scales its clipped gradient sum s by γ and rounds
each coordinate stochastically (floor(γ·s + u), u ~ U[0,1)). For any fixed u,
two neighbouring datasets (one record added or removed, ‖g‖₂ ≤ C) give rounded
vectors that differ by at most γC + √d in L2 (each coordinate's rounding moves by
less than 1) and, being integer vectors, by at most min(Δ₂², √d·Δ₂) in L1. The
released distribution is a mixture over u of Skellam mechanisms with those
sensitivities, and Rényi divergence is jointly quasi-convex, so the bound holds
for the mixture. Coordinate clipping of s before scaling is 1-Lipschitz per
coordinate and does not increase the sensitivity. Wrap-around modulo 2^32 is
post-processing of the integer sum (it cannot weaken privacy); `ring_headroom`
shows it does not happen in practice.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

# Integer RDP orders for the Skellam bound (the Zhu-Wang bound needs integer α).
ORDERS: tuple[int, ...] = tuple(range(2, 65)) + tuple(range(72, 257, 8))
# Fraction of the ring's per-site range given to the signal; the rest absorbs the noise.
SIGNAL_FRACTION = 0.5
# A site's gradient sum is clipped per coordinate at this many times C before scaling (a coordinate of a
# sum of B vectors of norm ≤ C is at most B·C; reaching 128·C needs ≥ 128 records aligned on one coordinate).
COORD_CLIP_MULT = 128.0
RING_BITS = 32


def skellam_noise(shape: int | tuple[int, ...], variance: float, rng: np.random.Generator | None = None,
                  ) -> np.ndarray:
    """Symmetric Skellam noise of the given variance per coordinate (int64): Poisson(v/2) − Poisson(v/2).

    Fresh OS randomness unless `rng` is given (tests only): the share must be unknown to everyone else.
    """
    if not variance >= 0 or not math.isfinite(variance):
        raise ValueError(f"variance must be finite and ≥ 0, got {variance}")
    rng = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
    lam = variance / 2.0
    return rng.poisson(lam, size=shape).astype(np.int64) - rng.poisson(lam, size=shape).astype(np.int64)


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def _logsumexp(xs: Sequence[float]) -> float:
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def skellam_rdp_unsampled(alpha: int, sigma: float, l2: float, l1: float) -> float:
    """Agarwal et al. Cor. 3.6 with μ = (σ·Δ₂)² (σ is the noise multiplier w.r.t. the integer Δ₂)."""
    mu = (sigma * l2) ** 2
    return alpha * l2 * l2 / (2 * mu) + min(((2 * alpha - 1) * l2 * l2 + 6 * l1) / (4 * mu * mu), 3 * l1 / (2 * mu))


def subsampled_rdp(alpha: int, q: float, eps: Callable[[int], float]) -> float:
    """RDP at integer order α ≥ 2 of a mechanism with RDP curve `eps` under Poisson(q) subsampling,
    add/remove neighbours (Steinke 2022, arXiv 2210.00597, Thm. 29; the bound Heikkilä et al. use for
    Skellam):  1/(α−1)·log[ (1−q)^(α−1)(1+(α−1)q) + Σ_{j=2..α} C(α,j)(1−q)^(α−j) q^j e^((j−1)ε(j)) ].
    For the Gaussian curve ε(j) = j/(2σ²) it equals the exact subsampled-Gaussian RDP at integer orders
    (Mironov et al. 2019), which tests/test_distributed_noise.py checks against Opacus."""
    if q >= 1.0:
        return eps(alpha)
    log_q, log_1q = math.log(q), math.log1p(-q)
    terms = [(alpha - 1) * log_1q + math.log1p((alpha - 1) * q)]
    for j in range(2, alpha + 1):
        terms.append(_log_comb(alpha, j) + j * log_q + (alpha - j) * log_1q + (j - 1) * eps(j))
    return min(_logsumexp(terms) / (alpha - 1), eps(alpha))


def skellam_rdp(q: float, sigma: float, steps: int, l2: float, l1: float,
                orders: Sequence[int] = ORDERS) -> np.ndarray:
    """RDP (per order) of `steps` Poisson-subsampled Skellam steps: `subsampled_rdp` of
    `skellam_rdp_unsampled`, vectorised over j (a ledger evaluates this twice per round)."""
    orders = [int(a) for a in orders]
    top = max(orders)
    j = np.arange(top + 1, dtype=np.float64)
    mu = (sigma * l2) ** 2
    eps = j * l2 * l2 / (2 * mu) + np.minimum(((2 * j - 1) * l2 * l2 + 6 * l1) / (4 * mu * mu), 3 * l1 / (2 * mu))
    if q >= 1.0:
        return steps * eps[orders]
    log_fact = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, top + 1, dtype=np.float64)))])
    log_q, log_1q = math.log(q), math.log1p(-q)
    out = np.empty(len(orders))
    for k, a in enumerate(orders):
        jj = np.arange(2, a + 1)
        terms = log_fact[a] - log_fact[jj] - log_fact[a - jj] + jj * log_q + (a - jj) * log_1q + (jj - 1) * eps[jj]
        first = (a - 1) * log_1q + math.log1p((a - 1) * q)
        m = max(first, float(terms.max()))
        total = m + math.log(math.exp(first - m) + float(np.exp(terms - m).sum()))
        out[k] = min(total / (a - 1), eps[a])
    return steps * out


@dataclass(frozen=True)
class DistributedNoise:
    """How a distributed-DP plan maps onto the ring; every site and the aggregator derive the same values.

    sigma:      noise multiplier of the summed noise w.r.t. the integer L2 sensitivity (what the ledger records)
    clip_norm:  C, per-sample L2 clip
    dim:        length of the gradient vector
    threshold:  t, the secure-aggregation threshold (fewer survivors: nothing is unmasked)
    colluders:  c, parties whose own shares are discounted (≥ 1: each hospital knows its own share)
    levels:     L of the secure-aggregation config (one site's coordinate range is [−L, L])
    max_sites:  largest number of sites a round may have
    """

    sigma: float
    clip_norm: float
    dim: int
    threshold: int
    colluders: int
    levels: int
    max_sites: int

    def __post_init__(self) -> None:
        if not self.sigma > 0 or not self.clip_norm > 0 or self.dim < 1:
            raise ValueError("need σ > 0, C > 0 and a non-empty vector")
        if not 0 <= self.colluders < self.threshold:
            raise ValueError(f"colluders c={self.colluders} must be below the threshold t={self.threshold}")
        if self.threshold > self.max_sites:
            raise ValueError("threshold exceeds max_sites")

    @classmethod
    def for_secagg(cls, cfg, sigma: float, clip_norm: float, colluders: int = 1) -> DistributedNoise:
        """From a `SecAggConfig` (its threshold, levels and max_sites) and the plan's σ and C."""
        return cls(sigma=float(sigma), clip_norm=float(clip_norm), dim=cfg.dim, threshold=cfg.threshold,
                   colluders=int(colluders), levels=cfg.levels, max_sites=cfg.max_sites)

    @property
    def coord_clip(self) -> float:
        return COORD_CLIP_MULT * self.clip_norm

    @property
    def gamma(self) -> float:
        """Integer steps per unit of gradient sum: ±coord_clip maps to ±SIGNAL_FRACTION·L."""
        return SIGNAL_FRACTION * self.levels / self.coord_clip

    @property
    def l2_sensitivity(self) -> float:
        """Δ₂ of one site's rounded integer vector (integer units): γC + √d."""
        return self.gamma * self.clip_norm + math.sqrt(self.dim)

    @property
    def l1_sensitivity(self) -> float:
        d2 = self.l2_sensitivity
        return min(d2 * d2, math.sqrt(self.dim) * d2)

    @property
    def total_variance(self) -> float:
        """Variance per coordinate (integer units) that ≥ t survivors less c colluders' shares carry."""
        return (self.sigma * self.l2_sensitivity) ** 2

    @property
    def share_variance(self) -> float:
        """Skellam variance each site adds per coordinate: σ²Δ₂²/(t − c)."""
        return self.total_variance / (self.threshold - self.colluders)

    def sigma_with(self, colluders: int) -> float:
        """Effective noise multiplier against `colluders` parties who pool their own shares (t survivors)."""
        if colluders >= self.threshold:
            return 0.0
        return self.sigma * math.sqrt((self.threshold - colluders) / (self.threshold - self.colluders))

    def ring_headroom(self, z: float = 10.0) -> float:
        """(2^31 − 1) minus the largest |sum| with every site at the signal limit and the noise of max_sites
        shares at z standard deviations; positive means the int32 read-back is exact (a z = 10 excursion has
        probability < 1e-23 per coordinate)."""
        signal = self.max_sites * (SIGNAL_FRACTION * self.levels + 1)
        noise = z * math.sqrt(self.max_sites * self.share_variance)
        return (2 ** (RING_BITS - 1) - 1) - (signal + noise)

    def encode(self, grad_sum: np.ndarray, secagg_clip: float) -> np.ndarray:
        """The float vector to hand to `quantize` with weight = max_weight (factor L/secagg_clip):
        quantize then computes floor(γ·clip(s, ±coord_clip) + u) exactly as analysed above."""
        s = np.clip(np.asarray(grad_sum, np.float64), -self.coord_clip, self.coord_clip)
        return (s * (SIGNAL_FRACTION * secagg_clip / self.coord_clip)).astype(np.float64)

    def noise_hook(self, rng: np.random.Generator | None = None) -> Callable[[np.ndarray], None]:
        """For `quantize(..., noise=...)`: adds this site's Skellam share to the int32 view, wrapping mod 2^32."""
        def add(ring_view: np.ndarray) -> None:
            share = skellam_noise(ring_view.shape, self.share_variance, rng)
            ring_view.view(np.uint32)[:] += share.astype(np.uint32)  # two's complement: wrap-around add

        return add

    def decode(self, ring_sum_update: np.ndarray) -> np.ndarray:
        """The noisy gradient sum (float64) from the unmasked ring words of the update part."""
        return np.asarray(ring_sum_update, np.uint32).view(np.int32).astype(np.float64) / self.gamma

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(gamma=self.gamma, l2_sensitivity=self.l2_sensitivity, l1_sensitivity=self.l1_sensitivity,
                    share_variance=self.share_variance)
        return data
