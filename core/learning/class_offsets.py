"""The head's 8 biases re-fitted at one hospital: what a hospital whose images look unlike the federation's can
correct locally, without sending anything (issue 18; docs/appearance-remedies.md, eighth and ninth passes).

A look (stain, lamp, focus, scale) moves every image's features by about the same offset, and a linear head turns a
constant offset into a constant shift of each class's score: what a bias absorbs. So the federation's weights stay
as released and the hospital fits one offset per class on its own labelled validation images, by maximum likelihood
under a Gaussian prior (std `PRIOR_STD` per offset) that keeps a small split from moving them far.

Two things keep the re-fit from harming a hospital:

- It learns the look, not the hospital's class mix. Under a skewed mix (one hospital sees mostly neutrophils) a
  plain re-fit would move the scores towards the classes its validation split happens to hold. The federation's
  model answers for the federation's mix; on this hospital's images its probabilities are, by Bayes' rule, shifted
  by the log-ratio of the two mixes. So the offsets are fitted with that known shift added (this hospital's class
  shares against the federation's validation shares: the row sums of the validation confusion counts the last
  completed round opened, which the aggregator sends with the final model) and answer without it. Every image
  counts once; importance weights to the federation's mix were screened too and lean on a rare class's few
  images (docs/appearance-remedies.md, ninth pass).
- A guard: the offsets are kept only if, over `FOLDS` folds of the validation images (each fitted on the others),
  they predict the held-out images with a lower cross-entropy than the released biases. Where the look did
  not move, or the split is too small to tell, the released biases stay.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PRIOR_STD = 1.0  # per offset, in logits; screened: 0.25 and 0.5 shrink too far, none costs alike hospitals ~1 point
FOLDS = 5
MIN_IMAGES = 40  # fewer validation images: no re-fit (five folds of fewer than 8 images decide nothing)


@dataclass(frozen=True)
class OffsetFit:
    """What the re-fit decided, with the figures that decided it."""

    offsets: tuple[float, ...] | None  # added to the logits (None: the released biases are kept)
    images: int
    held_out_loss_released: float | None  # held-out cross-entropy per image over the folds (mix shift added)
    held_out_loss_refitted: float | None

    @property
    def kept(self) -> bool:
        return self.offsets is not None


def mix_shift(labels: np.ndarray, federation_mix: np.ndarray) -> np.ndarray:
    """log(this hospital's class shares) − log(the federation's), each count given half an image so that a class
    one side lacks stays finite: what Bayes' rule adds to the calibrated logits between the two mixes."""
    mix = np.asarray(federation_mix, np.float64) + 0.5
    own = np.bincount(np.asarray(labels, int), minlength=len(mix)).astype(np.float64) + 0.5
    return np.log(own / own.sum()) - np.log(mix / mix.sum())


def _cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    return np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(z)), labels]


def fit_offsets(logits: np.ndarray, labels: np.ndarray, shift: np.ndarray, temperature: float = 1.0,
                prior_std: float = PRIOR_STD) -> np.ndarray:
    """Offsets b (summing to zero) minimising the mean cross-entropy of (`logits` + b) / T + `shift` on `labels`
    plus |b|² / (2 τ² n): the posterior mode under b ~ N(0, τ²) per class."""
    import torch

    x = torch.as_tensor(np.asarray(logits, np.float64))
    y = torch.as_tensor(np.asarray(labels, np.int64))
    s = torch.as_tensor(np.asarray(shift, np.float64))
    b = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([b], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy((x + b) / temperature + s, y) \
            + (b * b).sum() / (2 * prior_std ** 2 * len(y))
        loss.backward()
        return loss

    opt.step(closure)
    out = b.detach().numpy()
    return out - out.mean()


def refit_offsets(logits: np.ndarray, labels: np.ndarray, federation_mix: np.ndarray, temperature: float = 1.0,
                  prior_std: float = PRIOR_STD, folds: int = FOLDS, seed: int = 11) -> OffsetFit:
    """The guarded re-fit on one hospital's validation `logits` and `labels`, given the federation's validation
    images per class (`federation_mix`) and its calibration temperature."""
    logits, labels = np.asarray(logits, np.float64), np.asarray(labels, int)
    n = len(labels)
    if n < MIN_IMAGES:
        return OffsetFit(None, n, None, None)
    shift = mix_shift(labels, federation_mix)
    order = np.random.default_rng(seed).permutation(n)
    released = refitted = 0.0
    for part in np.array_split(order, folds):
        rest = np.setdiff1d(order, part)
        b = fit_offsets(logits[rest], labels[rest], shift, temperature, prior_std)
        refitted += float(_cross_entropy((logits[part] + b) / temperature + shift, labels[part]).sum())
        released += float(_cross_entropy(logits[part] / temperature + shift, labels[part]).sum())
    if not refitted < released:
        return OffsetFit(None, n, released / n, refitted / n)
    b = fit_offsets(logits, labels, shift, temperature, prior_std)
    return OffsetFit(tuple(float(v) for v in b), n, released / n, refitted / n)
