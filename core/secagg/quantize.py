"""Quantization of a site's input into the ring Z_{2^32} and back.

A site's input is (Δ, w, e): a float32 update, an integer weight (sample count) and int64 extras. The masked
vector carries, per coordinate of Δ,

    q_i = stochastic_round( (w / max_weight) * clip(Δ_i, -c, c) * L / c )   in [-L, L],  L = (2^31-1) // max_sites

stored as a two's-complement uint32, then w and the extras as plain unsigned integers. Addition is uint32
wrap-around; because |Σ q| ≤ max_sites · L < 2^31 the sum over any allowed round reads back exactly as an
int32, and Σ w, Σ e stay below 2^32 (checked by :class:`SecAggConfig`).

Dequantizing the sum gives Σ w_i·clip(Δ_i) (the aggregator divides by Σ w_i afterwards). Stochastic rounding
is unbiased and moves each site's value by less than one step, so per coordinate

    |weighted_sum - Σ w_i clip(Δ_i)| < n · max_weight · c / L            (see :func:`error_bound`)

plus float32 rounding of the result. Choose ``max_weight`` close to real sample counts: the bound on the
average is that divided by Σ w_i.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .config import SecAggConfig
from .errors import InputError
from .prg import RING_DTYPE

_CHUNK = 1 << 17


def quantize(cfg: SecAggConfig, update: np.ndarray, weight: int, extras: np.ndarray | None = None,
             rng: np.random.Generator | None = None,
             noise: Callable[[np.ndarray], None] | None = None) -> np.ndarray:
    """The site's input as one uint32 vector of length ``cfg.vector_len``.

    ``noise``, when given, is called once with the int32 view of the quantized update words (after rounding,
    before the weight and extras are written) and adds integer noise in place, wrapping modulo 2^32: the hook
    for distributed DP (`core.distributed_noise.DistributedNoise.noise_hook`), whose analysis needs the noise
    added to the rounded integers, never clipped.
    """
    update = np.asarray(update)
    if update.shape != (cfg.dim,) or not np.issubdtype(update.dtype, np.floating):
        raise InputError(f"update must be a float vector of length {cfg.dim}")
    if not np.all(np.isfinite(update)):
        raise InputError("update contains NaN or infinity")
    if isinstance(weight, bool) or not isinstance(weight, int | np.integer) or not 0 <= weight <= cfg.max_weight:
        raise InputError(f"weight must be an integer in 0..{cfg.max_weight}")
    extras = np.zeros(0, np.int64) if extras is None else np.asarray(extras)
    if extras.shape != (cfg.n_extras,) or (extras.size and not np.issubdtype(extras.dtype, np.integer)):
        raise InputError(f"extras must be an integer vector of length {cfg.n_extras}")
    if extras.size and (extras.min() < 0 or extras.max() > cfg.max_extra):
        raise InputError(f"extras must lie in 0..{cfg.max_extra}")
    rng = rng if rng is not None else np.random.default_rng()

    out = np.empty(cfg.vector_len, RING_DTYPE)
    dest = out[:cfg.dim].view(np.int32)
    factor = (int(weight) / cfg.max_weight) * cfg.scale
    # float64 is needed (|x| reaches 2^31 / max_sites, beyond float32's 24 bits); working in chunks keeps the
    # temporaries in cache, which halves the time against whole-vector passes
    x = np.empty(min(_CHUNK, cfg.dim))
    u = np.empty_like(x)
    for i in range(0, cfg.dim, _CHUNK):
        k = min(_CHUNK, cfg.dim - i)
        xs, us = x[:k], u[:k]
        np.copyto(xs, update[i:i + k])
        np.clip(xs, -cfg.clip, cfg.clip, out=xs)
        xs *= factor
        rng.random(out=us)
        xs += us  # floor(x + u), u ~ U[0,1): rounds up with probability frac(x), so E[q] = x; stays in [-L, L]
        np.floor(xs, out=xs)
        dest[i:i + k] = xs
    if noise is not None:
        noise(dest)
    out[cfg.dim] = int(weight)
    out[cfg.dim + 1:] = extras.astype(RING_DTYPE)
    return out


def dequantize(cfg: SecAggConfig, ring_sum: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
    """(Σ w_i·clip(Δ_i) as float32, Σ w_i, Σ extras as int64) from the unmasked ring sum."""
    if ring_sum.dtype != RING_DTYPE or ring_sum.shape != (cfg.vector_len,):
        raise InputError(f"ring sum must be a uint32 vector of length {cfg.vector_len}")
    weighted = ring_sum[:cfg.dim].view(np.int32).astype(np.float64)
    weighted *= cfg.max_weight / cfg.scale
    return weighted.astype(np.float32), int(ring_sum[cfg.dim]), ring_sum[cfg.dim + 1:].astype(np.int64)


def error_bound(cfg: SecAggConfig, n_sites: int) -> float:
    """Bound on |dequantized weighted sum - Σ w_i·clip(Δ_i)| per coordinate before the float32 cast."""
    return n_sites * cfg.max_weight / cfg.scale
