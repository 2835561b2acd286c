"""Show a hospital's images to the federation's model in the federation's own look (`hemafed calibrate`).

A federation whose hospitals each have their own stain batch and focus learns their average look. A hospital whose
images look otherwise (stained more strongly, or in sharper focus than any of them: the untouched look of the
simulation is both) loses accuracy (docs/appearance-remedies.md). The federation already knows its average look in
part: the cell check's mean of 12 image measurements (stain in the centre and rings, edge strength,
spatial-frequency energy; `core.learning.cell_check`), estimated under DP beside the gradient and carried in the model
file. On its own images, without labels, a hospital finds the look (a haematoxylin and an eosin strength, a focus
and a lamp level, in `core.data.appearance.apply_look`'s terms) in which their mean measurements come closest to the
federation's mean, in the Mahalanobis distance of the federation's spread; every image is then shown in that look
before its features are computed. Each component a look changes must earn its place: the search minimises the
distance plus log(n)/n per changed component (the Bayesian information criterion, n the images measured), without
which 100 images of hospitals alike chose a stronger stain by chance. Where the hospital's images already look like
the federation's, that look is none (screened on six federations, each matched on 100 to 856 images:
docs/appearance-remedies.md, twelfth and thirteenth passes).

Privacy: the federation's mean is already released (its cost counted with training); the search reads only this
hospital's images, locally, and nothing is sent. The look found is a statistic of those images without DP noise, so
the model file that carries it stays at this hospital, as its re-fitted layer does (docs/privacy.md, "Calibration").
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from ..data.appearance import HospitalLook, apply_look
from .cell_check import CellStats, standardised

# Fewer images than this leave the mean measurements too noisy to choose a look by (the screen used 100 and more).
MIN_IMAGES = 100
# The looks searched: the simulation's haematoxylin range in steps of 0.1 and its focus range (σ in pixels at 28 px)
# in steps of 0.2; eosin ±0.1; a lamp as it is or 7 % brighter, the middle of the half of the range that clips (a
# dimmer lamp the canonical look undoes). Magnification (0.95 and 1.05 screened) was never chosen and is left out.
# The first of each is "as it comes": a tie keeps the images as they are.
HAEMATOXYLIN = (1.0, 0.7, 0.8, 0.9, 1.1, 1.2, 1.3)
EOSIN = (1.0, 0.9, 1.1)
BLUR = (0.0, 0.2, 0.4, 0.6, 0.8)
LAMP = (1.0, 1.07)
_SAMPLE = 250  # images measured per look (the search's cost: 210 looks; the screen chose alike from 250 and 856)


@dataclass(frozen=True)
class LookMatch:
    """The look chosen for a hospital's images, and how far their mean measurements lay from the federation's."""

    haematoxylin: float
    blur: float
    images: int
    distance_before: float  # squared Mahalanobis distance of the mean measurements, as the images come
    distance_after: float  # the same in the chosen look
    eosin: float = 1.0
    lamp: float = 1.0

    @property
    def look(self) -> HospitalLook | None:
        """None when the images are best shown as they come."""
        look = HospitalLook(haematoxylin=self.haematoxylin, eosin=self.eosin, brightness=self.lamp, blur=self.blur)
        return None if look == HospitalLook() else look


def match_look(stats: CellStats, images: np.ndarray) -> LookMatch | None:
    """The look in which `images` (N, H, W, 3 uint8, this hospital's, unlabelled) come closest to the federation's
    mean measurements `stats`; None with fewer than `MIN_IMAGES` images."""
    images = np.asarray(images)
    if len(images) < MIN_IMAGES:
        return None
    sample = images[np.linspace(0, len(images) - 1, min(len(images), _SAMPLE)).round().astype(int)]
    per_change = np.log(len(sample)) / len(sample)

    def scored(h: float, e: float, blur: float, lamp: float) -> tuple[float, float, tuple[float, ...]]:
        look = HospitalLook(haematoxylin=h, eosin=e, brightness=lamp, blur=blur)
        gap = standardised(sample if look == HospitalLook() else apply_look(sample, look)).mean(0) - stats.mean
        distance = float(gap @ stats.precision @ gap)
        changed = (h != 1.0) + (e != 1.0) + (blur != 0.0) + (lamp != 1.0)
        return distance + per_change * changed, distance, (h, e, blur, lamp)

    looks = [scored(*look) for look in itertools.product(HAEMATOXYLIN, EOSIN, BLUR, LAMP)]
    _, distance, (h, e, blur, lamp) = min(looks, key=lambda s: s[0])  # the first of equals: as they come
    return LookMatch(h, blur, len(images), looks[0][1], distance, eosin=e, lamp=lamp)


def shown_in(images: np.ndarray, look: HospitalLook | None) -> np.ndarray:
    """`images` in `look` (as they are for None)."""
    return images if look is None else apply_look(images, look)
