"""The federation's share of calibration (core.learning.confidence): what each site adds to a secure round's masked
vector about its validation images, and the temperature the aggregator derives from the sum.

Each site sums, over its validation images, min(NLL, NLL_CAP) at each temperature of the public grid, in fixed
point; the aggregator sees only the sum over a round's hospitals and takes the temperature with the lowest total.
Like the validation confusion counts beside them, the sums carry no DP noise (docs/privacy.md, "Calibration").

The same goes for the cell check's threshold (core.learning.cell_check): after the NLL sums, each site adds how many
of its validation images score above each edge of a public grid (`CELL_SCORE_EDGES`), and the aggregator picks the
smallest edge above which at most the target share of all the round's validation images lie."""

from __future__ import annotations

import numpy as np

# Public and fixed: part of the masked vector's layout, identical at every site and the aggregator. 0.5 … 4.
CALIBRATION_GRID: tuple[float, ...] = tuple(round(0.5 * 8.0 ** (i / 31), 6) for i in range(32))
NLL_CAP = 8.0  # one image's NLL counts at most this much (bounds what one image adds to the sums)
NLL_SCALE = 16  # fixed point of the sums (1/16 nat per image; a site's 2^24 per entry allows 131,072 images)


def nll_sums(logits: np.ndarray, labels: np.ndarray, grid: tuple[float, ...] = CALIBRATION_GRID) -> np.ndarray:
    """Per temperature of `grid`: the sum over these images of min(NLL, NLL_CAP), in units of 1/NLL_SCALE nat
    (non-negative integers: they ride in the masked vector's extras)."""
    logits, labels = np.asarray(logits, np.float64), np.asarray(labels, int)
    out = np.zeros(len(grid), np.int64)
    if len(labels) == 0:
        return out
    for i, t in enumerate(grid):
        z = logits / t
        z = z - z.max(axis=1, keepdims=True)
        per_image = np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(z)), labels]
        out[i] = int(np.rint(np.minimum(per_image, NLL_CAP) * NLL_SCALE).sum())
    return out


def temperature_from_sums(sums: np.ndarray, images: int,
                          grid: tuple[float, ...] = CALIBRATION_GRID) -> float | None:
    """The temperature of `grid` with the lowest summed NLL over `images` validation images (None without any)."""
    sums = np.asarray(sums, np.int64)
    if images <= 0 or sums.shape != (len(grid),) or not sums.any():
        return None
    return float(grid[int(np.argmin(sums))])


# the share of in-distribution validation images the cell check's threshold flags (the goal: ≤ 2 % of new ones)
CELL_FALSE_ALARMS = 0.015
# Public and fixed: 96 edges from 5 to 5,000, 7.5 % apart (a 12-measurement Mahalanobis score of an image like the
# training images is mostly 3–40; one of something else, hundreds to millions). Coarser steps cost detection: with
# 10 % steps from 30 the threshold sat well above the 1.5 % point (docs/cell-check-screen.md).
CELL_SCORE_EDGES: tuple[float, ...] = tuple(round(5.0 * 1000.0 ** (i / 95), 4) for i in range(96))


def cell_tails(scores: np.ndarray, edges: tuple[float, ...] = CELL_SCORE_EDGES) -> np.ndarray:
    """Per edge of `edges`: how many of these validation images' cell-check scores lie above it."""
    scores = np.asarray(scores, np.float64)
    return np.array([int(np.sum(scores > e)) for e in edges], np.int64)


def cell_threshold_from_tails(tails: np.ndarray, images: int, false_alarms: float,
                              edges: tuple[float, ...] = CELL_SCORE_EDGES) -> float | None:
    """The smallest edge above which at most `false_alarms` of `images` validation images lie (None without images,
    counts or such an edge)."""
    tails = np.asarray(tails, np.int64)
    if images <= 0 or tails.shape != (len(edges),) or not tails.any():
        return None
    ok = np.nonzero(tails <= false_alarms * images)[0]
    return float(edges[int(ok[0])]) if len(ok) else None
