"""Non-private ceiling of a head on the cached scattering features (research script).

Does a non-linear head raise what these fixed features can reach without any privacy?
Adam, lr 1e-3, batch 256, 30 epochs, validation split, single view:

    python -m bench.accuracy.head_ceiling --cache /tmp/acc --hidden 0 128 512
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def load(cache: Path, split: str, pool: int) -> tuple[torch.Tensor, torch.Tensor]:
    d = torch.load(cache / f"{split}.pt")
    x = F.group_norm(d["x"].float(), 27)
    return (F.adaptive_avg_pool2d(x, pool) if pool else x).flatten(1), d["y"].long().reshape(-1)


def fit(head: torch.nn.Module, tx: torch.Tensor, ty: torch.Tensor, vx: torch.Tensor, vy: torch.Tensor,
        epochs: int = 30, weight_decay: float = 0.0) -> tuple[float, float]:
    """Adam (lr 1e-3, batch 256; AdamW with `weight_decay`) without privacy; (last, best) validation accuracy over
    the epochs, each judged in eval mode (dropout off)."""
    opt = (torch.optim.AdamW(head.parameters(), 1e-3, weight_decay=weight_decay) if weight_decay else
           torch.optim.Adam(head.parameters(), 1e-3))
    best = acc = 0.0
    for _ in range(epochs):
        head.train()
        perm = torch.randperm(len(ty))
        for i in range(0, len(ty), 256):
            idx = perm[i:i + 256]
            opt.zero_grad()
            F.cross_entropy(head(tx[idx]), ty[idx]).backward()
            opt.step()
        head.eval()
        with torch.no_grad():
            acc = float((head(vx).argmax(1) == vy).float().mean())
        best = max(best, acc)
    return acc, best


def private_fit(tx: torch.Tensor, ty: torch.Tensor, vx: torch.Tensor, vy: torch.Tensor, views: list[torch.Tensor],
                eps: float, lr: float, rounds: int, seeds: list[int]) -> tuple[list[float], list[float]]:
    """A linear head trained by central Poisson DP-SGD steps at the recipe's q = 0.1713, with the noise the
    default plan releases (2× the accounted variance: t = 6, c = 1, 10 survivors), server SGD with momentum
    0.9. Returns per seed the validation accuracy single view and with logits summed over `views` too."""
    import numpy as np

    from hemafed.core.learning.fedsgd import FedSGDServer, clipped_gradient_sum
    from hemafed.core.learning.models import get_flat_params, set_flat_params
    from hemafed.core.privacy.calibration import calibrate_sigma

    q = 0.1713
    sigma = calibrate_sigma(eps, 1e-5, q, rounds)
    singles, ttas = [], []
    for seed in seeds:
        torch.manual_seed(seed)
        head = torch.nn.Linear(tx.shape[1], 8)
        server = FedSGDServer(lr, 0.9)
        w = get_flat_params(head)
        gen = torch.Generator().manual_seed(seed)
        rng = np.random.default_rng(seed)
        for _ in range(rounds):
            set_flat_params(head, w)
            gs = clipped_gradient_sum(head, tx, ty, q, 1.0, gen)
            w = server.apply(w, gs.vector + rng.normal(0, sigma * np.sqrt(2), size=gs.vector.shape), q * len(ty))
        set_flat_params(head, w)
        with torch.no_grad():
            logits = head(vx)
            singles.append(float((logits.argmax(1) == vy).float().mean()))
            for v in views:
                logits = logits + head(v)
            ttas.append(float((logits.argmax(1) == vy).float().mean()))
    return singles, ttas


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", type=Path, default=Path("/tmp/acc"))
    ap.add_argument("--pool", type=int, default=3)
    ap.add_argument("--hidden", type=int, nargs="+", default=[0, 128, 512], help="0: linear head")
    ap.add_argument("--epochs", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tx, ty = load(args.cache, "train", args.pool)
    vx, vy = load(args.cache, "val", args.pool)
    for hidden in args.hidden:
        torch.manual_seed(0)
        head = torch.nn.Linear(tx.shape[1], 8) if not hidden else torch.nn.Sequential(
            torch.nn.Linear(tx.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 8))
        started = time.time()
        acc, best = fit(head, tx, ty, vx, vy, args.epochs)
        print(f"pool {args.pool} hidden {hidden}: last {acc:.4f} best {best:.4f} ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
