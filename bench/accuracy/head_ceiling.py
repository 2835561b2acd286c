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
        epochs: int = 30) -> tuple[float, float]:
    """Adam (lr 1e-3, batch 256) without privacy; (last, best) validation accuracy over the epochs."""
    opt = torch.optim.Adam(head.parameters(), 1e-3)
    best = acc = 0.0
    for _ in range(epochs):
        perm = torch.randperm(len(ty))
        for i in range(0, len(ty), 256):
            idx = perm[i:i + 256]
            opt.zero_grad()
            F.cross_entropy(head(tx[idx]), ty[idx]).backward()
            opt.step()
        with torch.no_grad():
            acc = float((head(vx).argmax(1) == vy).float().mean())
        best = max(best, acc)
    return acc, best


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
