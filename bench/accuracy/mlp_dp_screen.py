"""Screen: an MLP head under DP (research script).

Central Poisson sampling at the recipe's q (the same step as DP-FedSGD over all hospitals), the
noise the default plan realises (2× the accounted variance: t = 6, c = 1, 10 survivors), the
validation split, single view and test-time augmentation (logits averaged over the 8 views, or
the head of the mean feature). Reads the caches of `bench.accuracy.cache_features`
(`--cache`: train.pt, val.pt; `--views`: val_d1..7.pt).

    python -m bench.accuracy.mlp_dp_screen --eps 8 --hidden 64 --lr 0.5 --rounds 500   # --hidden 0: linear
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hemafed.core.learning.fedsgd import FedSGDServer, clipped_gradient_sum
from hemafed.core.learning.models import get_flat_params, set_flat_params
from hemafed.core.privacy.calibration import calibrate_sigma


def load(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    d = torch.load(path)
    x = F.adaptive_avg_pool2d(F.group_norm(d["x"].float(), 27), 3).flatten(1)
    return x, d["y"].long().reshape(-1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", type=Path, default=Path("/tmp/acc"))
    ap.add_argument("--views", type=Path, default=Path("/tmp/acc2"))
    ap.add_argument("--eps", type=float, default=8.0)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=500)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--q", type=float, default=0.1713)
    ap.add_argument("--noise-factor", type=float, default=2.0, help="noise variance × this (realised/accounted)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tx, ty = load(args.cache / "train.pt")
    vx, vy = load(args.cache / "val.pt")
    views = [load(args.views / f"val_d{k}.pt")[0] for k in range(1, 8)]
    sigma = calibrate_sigma(args.eps, 1e-5, args.q, args.rounds)
    torch.manual_seed(args.seed)
    if args.hidden:
        head = torch.nn.Sequential(torch.nn.Linear(tx.shape[1], args.hidden), torch.nn.ReLU(),
                                   torch.nn.Linear(args.hidden, 8))
    else:
        head = torch.nn.Linear(tx.shape[1], 8)
    server = FedSGDServer(args.lr, 0.9)
    w = get_flat_params(head)
    gen = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    std = sigma * args.clip * np.sqrt(args.noise_factor)
    started = time.time()
    for _ in range(args.rounds):
        set_flat_params(head, w)
        gs = clipped_gradient_sum(head, tx, ty, args.q, args.clip, gen)
        w = server.apply(w, gs.vector + rng.normal(0, std, size=gs.vector.shape), args.q * len(ty))
    set_flat_params(head, w)
    head.eval()
    with torch.no_grad():
        logits = head(vx)
        single = float((logits.argmax(1) == vy).float().mean())
        for v in views:
            logits = logits + head(v)
        tta = float((logits.argmax(1) == vy).float().mean())
        tta_feat = float((head(sum([vx, *views]) / 8).argmax(1) == vy).float().mean())
    print(f"eps {args.eps} hidden {args.hidden} lr {args.lr} T {args.rounds} C {args.clip} σ {sigma:.3f} "
          f"params {len(w)}: single {single:.4f} tta-logits {tta:.4f} tta-feature {tta_feat:.4f} "
          f"({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
