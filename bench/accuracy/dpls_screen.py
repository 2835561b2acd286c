"""The head from noisy sufficient statistics instead of DP-SGD? (research script, issue 16)

DP least squares (as in Mehta et al. 2023's linear probes): every record's centred, block-weighted features are
scaled to norm ≤ 1 (divided by a radius R, the `--radius-quantile` of the training norms, and clipped), a constant
input β is appended, and the federation would release once, under the whole budget, Σ u uᵀ and α Σ u tᵀ (t the
centred one-hot label) with Gaussian noise calibrated to their joint sensitivity √(1 + α²(1 − 1/K)), times √1.25 for
the default threshold's full round; the head is (S + λI)⁻¹ B. No rounds to compose, but the noise lands on a
4,748 × 4,748 matrix. Validation split, the training features the product trains on, the exact mean (an upper bound:
the product would estimate it too).

    python -m bench.accuracy.dpls_screen --eps 8 3 1 --lam 10 30 100 300 --alpha 1 3
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch


def dp_least_squares(zt: torch.Tensor, yt: torch.Tensor, zv: torch.Tensor, classes: int, eps: float | None,
                     lam: float, alpha: float, beta: float, radius: float, seed: int) -> torch.Tensor:
    """Validation predictions of the DP least-squares head (`eps` None: no noise)."""
    from hemafed.core.privacy.calibration import calibrate_sigma

    def unit(z: torch.Tensor) -> torch.Tensor:
        z = z / radius
        z = z * torch.clamp(1 / z.norm(dim=1, keepdim=True).clamp_min(1e-12), max=1.0)
        return torch.cat([z, torch.full((len(z), 1), beta, dtype=z.dtype)], 1) / math.sqrt(1 + beta ** 2)

    ut, uv = unit(zt), unit(zv)
    target = torch.nn.functional.one_hot(yt, classes).double() - 1.0 / classes
    s, b = ut.T @ ut, alpha * (ut.T @ target)
    if eps is not None:
        sensitivity = math.sqrt(1 + alpha ** 2 * (1 - 1 / classes))
        sigma = calibrate_sigma(eps, 1e-5, 1.0, 1) * sensitivity * math.sqrt(1.25)
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(s.shape, generator=g, dtype=torch.float64) * sigma
        s = s + torch.triu(noise) + torch.triu(noise, 1).T
        b = b + torch.randn(b.shape, generator=g, dtype=torch.float64) * sigma
    w = torch.linalg.solve(s + lam * torch.eye(len(s), dtype=s.dtype), b)
    return (uv @ w).argmax(1)


def main() -> None:
    from bench.accuracy.pca_screen import _features, _rescale

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--eps", type=float, nargs="+", default=[8.0, 3.0, 1.0])
    ap.add_argument("--lam", type=float, nargs="+", default=[10.0, 30.0, 100.0, 300.0])
    ap.add_argument("--alpha", type=float, nargs="+", default=[1.0, 3.0])
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--radius-quantile", type=float, default=0.5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args()
    torch.set_num_threads(2)
    xt, yt, xv, yv, _, plan = _features(0, "sites")
    classes = len(plan.classes)
    mean = xt.mean(0)
    zt, zv = _rescale("block:3,1,1", xt - mean, xv - mean, xt)
    radius = float(torch.quantile(zt.norm(dim=1), args.radius_quantile))

    def acc(pred: torch.Tensor) -> float:
        return 100 * float((pred == yv).double().mean())

    for lam in args.lam:
        pred = dp_least_squares(zt, yt, zv, classes, None, lam, 1, args.beta, radius, 0)
        print(f"no noise, λ {lam:g}: {acc(pred):.2f} %")
    for eps in args.eps:
        for lam in args.lam:
            for alpha in args.alpha:
                accs = [acc(dp_least_squares(zt, yt, zv, classes, eps, lam, alpha, args.beta, radius, s))
                        for s in args.seeds]
                print(f"ε {eps:g}, λ {lam:g}, α {alpha:g}: {np.mean(accs):.2f} ± {np.std(accs):.2f} %", flush=True)


if __name__ == "__main__":
    main()
