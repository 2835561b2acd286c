"""Is this an image of a single blood cell? A check from 12 measurements of the image and the federation's DP
statistics of them.

The classifier's own confidence cannot tell (docs/ood-screening.md: it is as sure of a whole smear field as of a
cell). What can: a handful of measurements that describe what every training image shows, one stained white cell in
the middle on a plain background, at the microscope's scale. `measurements` computes 44 candidates per image, at 28
px (a larger model input is resized to 28 px first, through a Hamming window (`RESAMPLE`), so the public
standardisation and the screen's choices hold for every model): the haematoxylin and eosin optical density (colour
deconvolution, Ruifrok & Johnston 2001) and the total optical density in four rings around the centre, with their
spread and 90th percentile; the grey level's edge strength in the same rings; the share of strongly haematoxylin-
stained pixels overall and in the middle; where that stain's mass sits and how far it spreads; and the share of the
grey, haematoxylin and eosin images' energy in six spatial-frequency bands (a whole field's small cells put energy
where a single cell's outline does not). The check uses the 12 of them in `USED` (chosen by a forward selection that
simulates the federation's DP noise, docs/cell-check-screen.md): every extra measurement adds coordinates to the DP
moments (d + d(d+1)/2) and spread to an in-distribution image's score, so all 44 together flagged fewer whole fields
than these 12.

The federation estimates the mean and covariance of these measurements as part of training, at no privacy cost of
its own (`moment_vector`, `core.learning.fedsgd`): once the centre is set, each record's contribution to a round is its
clipped gradient (norm ≤ `GRADIENT_SHARE`·C) beside its clipped measurement moments (norm ≤ `MOMENT_SHARE`·C), so
the whole stays within C and the round's noise, sensitivity and ε are unchanged; the aggregator averages the
rounds' noisy moment sums. An image's score is its Mahalanobis distance to that mean; the threshold flags a stated
share of the federation's validation images (their counts above public edges, `core.rounds.calibration_sums`), or
of the site's own (never sent) when the federation sent none.

Standardisation constants: medians and spreads of the measurements on the 200 public PBC sample images
(`python -m hemafed.core.learning.cell_check --constants`), not on any hospital's records.
"""

from __future__ import annotations

import argparse
import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.appearance import HED_FROM_RGB as _HED_FROM_RGB  # Ruifrok & Johnston's stain vectors
from ..data.imaging import resize_array_batch
from ..rounds.calibration_sums import CELL_FALSE_ALARMS as FALSE_ALARMS

_RINGS = ((0.0, 0.35), (0.35, 0.7), (0.7, 1.0), (1.0, 2.0))  # radius / half the side
_BANDS = (0.01, 0.06, 0.11, 0.17, 0.25, 0.35, 0.8)  # cycles per pixel
# (index into `measurements`, what it is), in the order the forward selection picked them
USED: tuple[tuple[int, str], ...] = (
    (41, "share of strongly haematoxylin-stained pixels in the middle"),
    (26, "grey-level energy at 0.25–0.35 cycles per pixel"),
    (18, "grey-level edge strength in the centre"),
    (27, "grey-level energy at 0.35–0.8 cycles per pixel"),
    (0, "haematoxylin in the centre"),
    (1, "haematoxylin in the inner ring"),
    (7, "eosin in the inner ring"),
    (19, "grey-level edge strength in the inner ring"),
    (25, "grey-level energy at 0.17–0.25 cycles per pixel"),
    (5, "haematoxylin's 90th percentile"),
    (37, "eosin energy at 0.17–0.25 cycles per pixel"),
    (15, "optical density in the corners"),
)
_USED = np.array([i for i, _ in USED])
CANDIDATES = 44
SIZE = 28  # the measurements' scale: the public constants below were taken there
# A larger input (a 64-px model's) comes to SIZE through a Hamming window rather than the bilinear filter that made
# it: its sharper kernel keeps more of the 0.17-0.8 cycles-per-pixel energy that tells a whole field's many small
# cells from one cell's outline, which a second bilinear pass damps (screening fields at 64 px, central simulation
# with the federation's noise: 96.9 % flagged through bilinear, 100 % through Hamming; docs/cell-check-screen.md)
RESAMPLE = Image.Resampling.HAMMING
DIM = len(USED)
MOMENT_RADIUS = 24.0  # a record's moment vector is clipped to this norm (|z|² ≲ 24: |z| ≲ 4.9 σ, as DIM = 12)
MOMENT_SHARE = 0.4  # of the clip norm C, for the moments; the gradient keeps √(1 − 0.4²) ≈ 0.917 of it
GRADIENT_SHARE = math.sqrt(1.0 - MOMENT_SHARE**2)
SHRINK = 0.0  # covariance shrinkage towards its diagonal (the eigenvalue floor did better in screening)
EIGEN_FLOOR = 0.03  # smallest variance kept in any direction (standardised units): DP noise swamps smaller ones

# Standardisation (public: the PBC sample's measurements at 28 px; see the module docstring).
LOC = np.array([
    1.2388, 0.6068, -0.0156, -0.0178, 0.5537, 1.3133, 0.4913, 0.2652, 0.0335, 0.0296, 0.2075, 0.5228, 2.9655,
    1.8289, 0.6564, 0.6756, 1.0091, 3.1032, 0.0636, 0.0962, 0.0480, 0.0387, -0.3703, -1.9670, -2.5549, -3.1516,
    -3.8074, -4.3856, -0.3450, -2.0643, -2.7150, -3.3056, -3.7027, -4.0774, -0.3937, -2.1426, -2.6736, -3.1200,
    -3.2982, -3.0705, 0.3310, 0.9263, 0.0399, 0.2412])
SCALE = np.array([
    0.3617, 0.3401, 0.1024, 0.0598, 0.1243, 0.4407, 0.1358, 0.1460, 0.0363, 0.0146, 0.0529, 0.2042, 0.6398,
    0.6512, 0.1889, 0.1300, 0.2176, 0.7956, 0.0324, 0.0295, 0.0211, 0.0125, 0.3430, 0.5440, 0.4118, 0.3607,
    0.3111, 0.3056, 0.2986, 0.6476, 0.4790, 0.3762, 0.3711, 0.4242, 0.3380, 0.6207, 0.4815, 0.3277, 0.3116,
    0.3708, 0.0906, 0.2002, 0.0315, 0.0298])


def measurements(images: np.ndarray) -> np.ndarray:
    """(N, CANDIDATES) raw measurements of (N, H, W, 3) uint8 RGB images, taken at `SIZE` pixels (see the module
    docstring)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError("images must be (N, H, W, 3) RGB")
    if len(images) and images.shape[1:3] != (SIZE, SIZE):
        images = resize_array_batch(images.astype(np.uint8), SIZE, RESAMPLE)
    x = images.astype(np.float64)
    n, h, w, _ = x.shape
    if n == 0:  # a party without validation images (the one-hospital baseline)
        return np.zeros((0, CANDIDATES))
    od = -np.log(np.maximum(x, 1.0) / 255.0)
    hed = od @ _HED_FROM_RGB
    yy, xx = np.mgrid[:h, :w]
    radius = np.hypot(yy - (h - 1) / 2, xx - (w - 1) / 2) / (h / 2)
    out: list[np.ndarray] = []
    for channel in (hed[..., 0], hed[..., 1], od.sum(-1)):
        flat = channel.reshape(n, -1)
        out += [channel[:, (radius >= a) & (radius < b)].mean(1) for a, b in _RINGS]
        out += [flat.std(1), np.percentile(flat, 90, axis=1)]
    grey = x.mean(-1) / 255.0
    edges = np.hypot(np.diff(grey, axis=1)[:, :, :-1], np.diff(grey, axis=2)[:, :-1, :])
    inner = radius[:-1, :-1]
    out += [edges[:, (inner >= a) & (inner < b)].mean(1) for a, b in _RINGS]
    freq = np.hypot(np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :])
    for channel in (grey, hed[..., 0], hed[..., 1]):
        power = np.abs(np.fft.fft2(channel - channel.mean((1, 2), keepdims=True))) ** 2
        total = power.reshape(n, -1).sum(1) + 1e-9
        out += [np.log(power[:, (freq >= a) & (freq < b)].sum(1) / total + 1e-6) for a, b in itertools.pairwise(_BANDS)]
    haem = hed[..., 0]
    stained = haem > np.median(haem.reshape(n, -1), axis=1)[:, None, None] + 0.15
    middle = radius < 0.5
    out += [stained.reshape(n, -1).mean(1), (stained & middle).reshape(n, -1).sum(1) / middle.sum()]
    excess = np.maximum(haem - np.median(haem.reshape(n, -1), axis=1)[:, None, None], 0.0)
    mass = excess.sum((1, 2)) + 1e-6
    cy = (excess * yy).sum((1, 2)) / mass - (h - 1) / 2
    cx = (excess * xx).sum((1, 2)) / mass - (w - 1) / 2
    spread = (excess * ((yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2)).sum((1, 2)) / mass
    out += [np.hypot(cy, cx) / h, np.sqrt(spread) / h]
    return np.stack(out, 1)


def standardised(images: np.ndarray) -> np.ndarray:
    """(N, DIM): the `USED` measurements, standardised by the public constants."""
    return ((measurements(images) - LOC) / SCALE)[:, _USED]


MOMENT_LEN = DIM + DIM * (DIM + 1) // 2


def _upper(d: int) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
    """The upper triangle's indices of a d×d matrix and their weights: off-diagonal products appear twice in z·zᵀ,
    so weighting them by √2 keeps the vector's norm equal to |z|²."""
    upper = np.triu_indices(d)
    return upper, np.where(upper[0] == upper[1], 1.0, math.sqrt(2.0))


def moment_vector(z: np.ndarray, radius: float = MOMENT_RADIUS) -> np.ndarray:
    """Each standardised measurement vector's (z, upper triangle of z·zᵀ), clipped to norm `radius` (any number of
    measurements: the research screen tries other sets)."""
    z = np.asarray(z, np.float64)
    upper, weight = _upper(z.shape[1])
    v = np.concatenate([z, np.einsum("ni,nj->nij", z, z)[:, upper[0], upper[1]] * weight], 1)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return v * np.minimum(1.0, radius / np.maximum(norms, 1e-12))


@dataclass(frozen=True)
class CellStats:
    """The federation's mean and (shrunk) precision of the standardised measurements."""

    mean: np.ndarray
    precision: np.ndarray

    @classmethod
    def from_moments(cls, moments: np.ndarray) -> CellStats | None:
        """From an average of `moment_vector`s (None while it is all zeros: not estimated yet)."""
        m = np.asarray(moments, np.float64)
        if m.shape != (MOMENT_LEN,) or not m.any() or not np.isfinite(m).all():
            return None
        return cls.from_average(m, DIM)

    @classmethod
    def from_average(cls, m: np.ndarray, d: int, floor: float = EIGEN_FLOOR) -> CellStats:
        """From an average of `moment_vector`s of `d` measurements, unchecked (the research screen's entry)."""
        upper, weight = _upper(d)
        mean = m[:d]
        second = np.zeros((d, d))
        second[upper] = m[d:] / weight
        second = second + np.triu(second, 1).T
        cov = second - np.outer(mean, mean)
        cov = (1 - SHRINK) * cov + SHRINK * np.diag(np.diag(cov))
        values, vectors = np.linalg.eigh((cov + cov.T) / 2)
        return cls(mean, (vectors / np.maximum(values, floor)) @ vectors.T)

    def scores(self, images: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance of each image's measurements to the federation's mean."""
        return self.score_measurements(standardised(images))

    def score_measurements(self, z: np.ndarray) -> np.ndarray:
        """The same from already standardised measurements (`standardised`)."""
        d = np.asarray(z, np.float64) - self.mean
        return np.einsum("ij,jk,ik->i", d, self.precision, d)


def fit_threshold(moments: np.ndarray, val_images: np.ndarray, min_images: int,
                  false_alarms: float = FALSE_ALARMS) -> float | None:
    """A hospital's threshold: the federation's moments (from the model's weights) scored on its own validation
    images; None without moments or with fewer than `min_images` images."""
    stats = CellStats.from_moments(moments)
    if stats is None or len(val_images) < min_images:
        return None
    return site_threshold(stats.scores(val_images), false_alarms)


def with_site_threshold(calibration, moments: np.ndarray | None, val_images: np.ndarray, *,
                        federation_threshold: float | None = None):
    """`calibration` (`core.learning.confidence.Calibration`) with the cell-check threshold: the federation's
    (from all hospitals' validation counts, `core.rounds.agg_round.federation_cell_threshold`) when it sent one,
    else this hospital's own, fitted on its validation images (never sent); unchanged without moments, or with
    neither a federation threshold nor enough images of its own."""
    from dataclasses import replace

    from .confidence import MIN_IMAGES

    if calibration is None or moments is None or CellStats.from_moments(moments) is None:
        return calibration
    if federation_threshold is not None:
        return replace(calibration, not_a_cell_threshold=float(federation_threshold),
                       not_a_cell_false_alarms=FALSE_ALARMS, not_a_cell_from="the federation's validation images")
    threshold = fit_threshold(moments, val_images, MIN_IMAGES)
    if threshold is None:
        return calibration
    return replace(calibration, not_a_cell_threshold=threshold, not_a_cell_false_alarms=FALSE_ALARMS,
                   not_a_cell_from="this hospital's validation images")


def site_threshold(scores: np.ndarray, false_alarms: float = FALSE_ALARMS) -> float | None:
    """The score above which `false_alarms` of these (in-distribution validation) images lie."""
    scores = np.asarray(scores, np.float64)
    return float(np.quantile(scores, 1.0 - false_alarms)) if len(scores) else None


def _constants(pbc_dir: Path) -> None:
    from ..data.appearance import public_sample

    m = measurements(public_sample(pbc_dir))
    for name, values in (("LOC", np.median(m, 0)), ("SCALE", m.std(0))):
        print(f"{name} = np.array([" + ", ".join(f"{v:.4f}" for v in values) + "])")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Print the standardisation constants from the public PBC sample.")
    p.add_argument("--constants", type=Path, metavar="PBC_DIR", required=True)
    _constants(p.parse_args(argv).constants)


if __name__ == "__main__":
    main()
