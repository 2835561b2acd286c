"""Probe (issue 18): can a hospital read its own stain strength off all its images at once, to undo it with one
factor per hospital (unlike `normalise_stain`, which rescales each image by its own level and so removes the
class information a cell's staining carries)?

For each hospital of the simulation (seeds 0–2, `hemafed simulate --appearance shifted`), the median over its images
of a per-image stain level (after the background is subtracted, as `normalise_stain` does), in the hospital's look,
is compared with the same median over the untouched training images; its log ratio is the estimate of the log of
the hospital's true haematoxylin and eosin factors (`LOOK_RANGE`). Levels: the image's mean eosin density, and the
99th percentiles of the H and E densities after a Gaussian blur of σ pixels (0, 1.5, 3 at 64 px), which should
make the estimate less sensitive to the hospital's focus. Reads no hospital's records outside the simulation.

    python -m bench.accuracy.site_stain_probe
"""

from __future__ import annotations

import numpy as np
import torch

from hemafed.core.data.appearance import HED_FROM_RGB, hospital_looks, low_pass
from hemafed.network.sim.simulate import SimulationOptions, hospitals


def levels(images: np.ndarray, sigma: float) -> np.ndarray:
    """(N, 3): each image's mean eosin density and its H and E 99th percentiles after a blur of `sigma` pixels."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255.0
    od = -torch.log(x.clamp(1 / 255, 1))
    background = torch.quantile(od.flatten(2), 0.05, dim=2, keepdim=True)
    hed = torch.einsum("bcp,cs->bsp", (od.flatten(2) - background).clamp_min(0), torch.as_tensor(HED_FROM_RGB))
    e_mean = hed[:, 1].mean(1, keepdim=True)
    blurred = low_pass(hed.reshape(od.shape), sigma).flatten(2) if sigma > 0 else hed
    return torch.cat([e_mean, torch.quantile(blurred[:, :2], 0.99, dim=2)], 1).numpy()


def main() -> None:
    torch.set_num_threads(2)
    print("| blur σ (px at 64) | statistic | error of the log factor over 30 hospitals: mean | std |")
    print("|---:|---|---:|---:|")
    for sigma in (0.0, 1.5, 3.0):
        errors = []
        for seed in range(3):
            same = hospitals(SimulationOptions(seed=seed, appearance="same", quiet=True))
            shifted = hospitals(SimulationOptions(seed=seed, appearance="shifted", quiet=True))
            reference = np.median(np.log(levels(same.train.images, sigma) + 1e-4), 0)
            for idx, look in zip(shifted.parts, hospital_looks(len(shifted.parts), seed), strict=True):
                estimate = np.median(np.log(levels(shifted.train.images[idx], sigma) + 1e-4), 0) - reference
                errors.append(estimate - np.log([look.eosin, look.haematoxylin, look.eosin]))
        e = np.array(errors)
        for k, name in enumerate(("mean E density", "H 99th percentile", "E 99th percentile")):
            print(f"| {sigma:g} | {name} | {e[:, k].mean():+.3f} | {e[:, k].std():.3f} |", flush=True)
    print("(the true log factors are uniform on log 0.7 … log 1.3: std 0.17)")


if __name__ == "__main__":
    main()
