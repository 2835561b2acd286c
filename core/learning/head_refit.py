"""The federation's final layer re-fitted at one hospital from its own labelled images (`hemafed calibrate`; issue
18, docs/appearance-remedies.md, tenth pass).

Class offsets (`core.learning.class_offsets`) undo the part of a look that moves every image's features by the same
amount. A look also changes how the features separate the classes (a weaker haematoxylin stain weakens what the
nuclei say), which no offset undoes. With a few hundred labelled images a hospital can re-fit every weight of the
linear head, as long as the fit stays near the federation's: the re-fit is the posterior mode under a Gaussian prior
centred on the released weights, of std `PRIOR_SCALE` times their root mean square on each weight's change (and std
1 on each class's bias change, as for the offsets). Screened on validation over the six runs of the seventh pass:
where each hospital had its own look, a hospital in the untouched look lost 0.70 points with 856 labelled images
and 1.44 with 250, against 1.87 and 2.76 with the offsets; where nothing needed correcting, nothing changed.

As with the offsets: fitted with the known shift between this hospital's class mix and the federation's added
(`class_offsets.mix_shift`), answering without it; kept only if, over `FOLDS` folds of the images (each fitted on
the others), it predicts the held-out images with a lower cross-entropy than the released layer. The held-out
logits are also what the hospital's "uncertain" threshold is then set on, so that threshold is not chosen on images
the layer was fitted to.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .class_offsets import FOLDS, MIN_IMAGES, _cross_entropy, mix_shift

PRIOR_SCALE = 1.0  # of the released weights' rms, per weight; screened 0.3, 1 and 3 (docs/appearance-remedies.md)


@dataclass(frozen=True)
class HeadFit:
    """What the re-fit decided, with the figures that decided it."""

    weight: np.ndarray | None  # (classes, features) re-fitted; None: the released layer is kept
    bias: np.ndarray | None
    images: int
    held_out_loss_released: float | None  # held-out cross-entropy per image over the folds (mix shift added)
    held_out_loss_refitted: float | None
    held_out_logits: np.ndarray | None  # each image's logits from the fold's re-fit that did not see it

    @property
    def kept(self) -> bool:
        return self.weight is not None


def fit_head(z: np.ndarray, weight: np.ndarray, bias: np.ndarray, labels: np.ndarray, shift: np.ndarray,
             temperature: float, prior_std: float) -> tuple[np.ndarray, np.ndarray]:
    """(weight, bias) minimising the mean cross-entropy of (z·Wᵀ + b) / T + `shift` plus the prior's
    |W − `weight`|² / (2 `prior_std`² n) + |b − `bias`|² / (2 n); the bias change is returned summing to zero."""
    import torch

    x = torch.as_tensor(np.asarray(z, np.float64))
    y = torch.as_tensor(np.asarray(labels, np.int64))
    s = torch.as_tensor(np.asarray(shift, np.float64))
    w0 = torch.as_tensor(np.asarray(weight, np.float64))
    b0 = torch.as_tensor(np.asarray(bias, np.float64))
    dw = torch.zeros_like(w0, requires_grad=True)
    db = torch.zeros_like(b0, requires_grad=True)
    opt = torch.optim.LBFGS([dw, db], max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = x @ (w0 + dw).T + b0 + db
        prior = (dw * dw).sum() / (2 * prior_std ** 2) + (db * db).sum() / 2
        loss = torch.nn.functional.cross_entropy(logits / temperature + s, y) + prior / len(y)
        loss.backward()
        return loss

    opt.step(closure)
    change = db.detach()
    return (w0 + dw).detach().numpy(), (b0 + change - change.mean()).numpy()


def refit_head(z: np.ndarray, weight: np.ndarray, bias: np.ndarray, labels: np.ndarray,
               federation_mix: np.ndarray, temperature: float = 1.0, prior_scale: float = PRIOR_SCALE,
               folds: int = FOLDS, seed: int = 11) -> HeadFit:
    """The guarded re-fit of the layer (`weight`, `bias`) on one hospital's centred inputs `z` (what the layer
    sees) and `labels`, given the federation's validation images per class and its calibration temperature."""
    z, labels = np.asarray(z, np.float64), np.asarray(labels, int)
    weight, bias = np.asarray(weight, np.float64), np.asarray(bias, np.float64)
    n = len(labels)
    if n < MIN_IMAGES:
        return HeadFit(None, None, n, None, None, None)
    prior_std = prior_scale * float(np.sqrt(np.mean(weight ** 2)))
    shift = mix_shift(labels, federation_mix)
    logits = z @ weight.T + bias
    held_out = np.empty_like(logits)
    for part in np.array_split(np.random.default_rng(seed).permutation(n), folds):
        rest = np.setdiff1d(np.arange(n), part)
        w, b = fit_head(z[rest], weight, bias, labels[rest], shift, temperature, prior_std)
        held_out[part] = z[part] @ w.T + b
    released = float(_cross_entropy(logits / temperature + shift, labels).mean())
    refitted = float(_cross_entropy(held_out / temperature + shift, labels).mean())
    if not refitted < released:
        return HeadFit(None, None, n, released, refitted, None)
    w, b = fit_head(z, weight, bias, labels, shift, temperature, prior_std)
    return HeadFit(w, b, n, released, refitted, held_out)
