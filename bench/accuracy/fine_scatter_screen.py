"""Screen: a second wavelet scattering block, of the 64-px image resized to `--size` px (research script, issue 16).

The default model's scattering sees the image at 28 px (J = 2, its 7×7 maps pooled 3×3); at 56 px the same
transform sees textures twice as fine (chromatin, granules). Its block: the stain densities of the image in the
canonical lamp and focus, resized to `--size` px, scattered (J = 2, 8 angles), GroupNorm'd in 27 groups and
pooled 3×3 (2,187 numbers, as the 28-px block), averaged over the first `--views` dihedral views.

Two questions, on BloodMNIST's **validation** split:

* `alone`: the block by itself in one view against the 28-px block (a non-private logistic regression, and central
  DP-SGD at the recipe's ε = 8 and 3 plans);
* `joined`: the default model's cached features with the 28-px block replaced by it ("replace") or the block added
  ("add"), weighed a, b, c[, d] per block and scaled back to the median centred norm 19.4 — `pca_screen`'s proxy of
  the federation (the hospitals' training splits, Poisson rate, clip share 0.917, the 10-round centre, the full
  round's noise, the recipe's rounds and lr·σ for each budget).

    python -m bench.accuracy.fine_scatter_screen alone --sizes 28 40 56
    python -m bench.accuracy.fine_scatter_screen joined --size 56 --views 4 --eps 3 8 1 --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.accuracy.pca_screen import (
    SHARE,
    _centre_scheme,
    _features,
    _train,
    noisy_centre,
    round_noise,
    sites_training,
)

MEDIAN_NORM = 19.4
VARIANTS = {"default": ("scatter", (3, 1, 1)), "replace": ("fine", (3, 1, 1)), "add": ("fine+scatter", (3, 3, 1, 1))}


def block(images: np.ndarray, size: int, views: int) -> torch.Tensor:
    """The scattering block of (N, 64, 64, 3) uint8 images at `size` px, averaged over `views` dihedral views."""
    from hemafed.core.data.appearance import canonical_look, stain_densities
    from hemafed.core.learning.features import Scattering2D, dihedral, scatter_features

    scattering = Scattering2D(size, 2, 8)
    out = []
    for i in range(0, len(images), 256):
        x = canonical_look(torch.as_tensor(images[i:i + 256]).permute(0, 3, 1, 2).float() / 255, "lamp-focus")
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        total = 0
        for k in range(views):
            s = scatter_features(stain_densities(dihedral(x, k)), scattering)
            total = total + F.adaptive_avg_pool2d(F.group_norm(s, 27), 3).flatten(1)
        out.append(total / views)
    return torch.cat(out).double()


def _private(xt, yt, xv, yv, eps: float, seeds, factor: torch.Tensor | None = None, centre: str = "R:10",
             radius: float = 60.0) -> list[float]:
    """Validation accuracy per seed of the proxy federation on raw features `xt`: the centre's noise is added to
    their mean as the product's centring rounds add it (to features clipped to `radius`), then each block is
    weighed by `factor` and the whole scaled to the median centred norm 19.4 (as `pca_screen --scale`)."""
    from hemafed.core.learning.recipe import lr_times_sigma, recommended_plan

    fed = recommended_plan(eps, len(yt), 10)
    noise = round_noise(fed)
    error, share, rounds = _centre_scheme(centre, SHARE, fed.rounds)
    k = lr_times_sigma(fed.model, eps, fed.rounds)
    mean, accs = xt.mean(0), []
    for seed in seeds:
        c = noisy_centre(mean, error, noise, fed, radius, seed)
        zt, zv = xt - c, xv - c
        if factor is not None:
            zt, zv = zt * factor, zv * factor
        scale = MEDIAN_NORM / zt.norm(dim=1).median()
        accs.append(_train(zt * scale, yt, zv * scale, yv, 8, fed.noise_multiplier, noise, fed.sample_rate, rounds, k,
                           seed, share))
    return accs


def _nonprivate(zt, yt, zv, yv) -> float:
    za = torch.cat([zt, torch.ones(len(zt), 1, dtype=torch.float64)], 1)
    w = torch.zeros(8, za.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(za @ w.T, yt) + 1e-4 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    zva = torch.cat([zv, torch.ones(len(zv), 1, dtype=torch.float64)], 1)
    return float(((zva @ w.detach().T).argmax(1) == yv).double().mean())


def main() -> None:
    from hemafed.core.data.bloodmnist import load_splits, locate
    from hemafed.network.sim.simulate import SimulationOptions, hospitals

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("question", choices=("alone", "joined"))
    ap.add_argument("--sizes", type=int, nargs="+", default=[28, 40, 56], help="alone: the block's image sizes")
    ap.add_argument("--size", type=int, default=56, help="joined: the block's image size")
    ap.add_argument("--views", type=int, default=4, help="joined: dihedral views averaged (alone: 1)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--eps", type=float, nargs="+", default=[3.0, 8.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--cache", type=Path, default=Path("/tmp/fine_scatter"), help="blocks kept between runs")
    args = ap.parse_args()
    torch.set_num_threads(2)
    args.cache.mkdir(parents=True, exist_ok=True)

    h = hospitals(SimulationOptions(quiet=True))
    train_images, train_labels = sites_training(h)
    val = load_splits(locate(None, size=64))["val"]
    yt = torch.as_tensor(np.asarray(train_labels).reshape(-1), dtype=torch.long)
    yv = torch.as_tensor(np.asarray(val.labels).reshape(-1), dtype=torch.long)

    def cached(size: int, views: int) -> tuple[torch.Tensor, torch.Tensor]:
        path = args.cache / f"scattering-{size}-{views}.pt"
        if not path.exists():
            started = time.perf_counter()
            torch.save((block(train_images, size, views), block(val.images, size, views)), path)
            print(f"  block at {size} px over {views} views: {time.perf_counter() - started:.0f} s", flush=True)
        return torch.load(path)

    if args.question == "alone":
        for size in args.sizes:
            xt, xv = cached(size, 1)
            scale = MEDIAN_NORM / (xt - xt.mean(0)).norm(dim=1).median()
            row = {"size": size, "nonprivate": _nonprivate((xt - xt.mean(0)) * scale, yt, (xv - xt.mean(0)) * scale,
                                                           yv)}
            for eps in args.eps:
                accs = _private(xt, yt, xv, yv, eps, args.seeds, centre="exact")
                row[f"eps{eps:g}"] = (float(np.mean(accs)), float(np.std(accs)))
            print(json.dumps(row), flush=True)
        return

    xt, _, xv, _, _, _ = _features(0, "sites")  # the default model's cached 8-view features, hospitals' splits
    ft, fv = cached(args.size, args.views)
    scattering = 243 * 9
    parts = {"scatter": (xt[:, :scattering], xv[:, :scattering]), "fine": (ft, fv)}
    rest = (xt[:, scattering:], xv[:, scattering:])
    for name in args.variants:
        first, weights = VARIANTS[name]
        blocks = [parts[p] for p in first.split("+")] + [rest]
        sizes = [b[0].shape[1] for b in blocks[:-1]] + [512, 2048]
        factor = torch.cat([torch.full((n,), float(w), dtype=torch.float64)
                            for n, w in zip(sizes, weights, strict=True)])
        at, av = torch.cat([b[0] for b in blocks], 1), torch.cat([b[1] for b in blocks], 1)
        for eps in args.eps:
            accs = _private(at, yt, av, yv, eps, args.seeds, factor)
            print(json.dumps({"variant": name, "size": args.size, "views": args.views, "eps": eps,
                              "mean": float(np.mean(accs)), "std": float(np.std(accs)), "accs": accs}), flush=True)


if __name__ == "__main__":
    main()
