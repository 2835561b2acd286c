"""Scattering at a larger scale, J = 3, next to the recipe's J = 2 features (research script).

    python -m bench.accuracy.j3_features cache                       # /tmp/exp/j3_{train,val}.pt (≈ 6 min, 1 thread)
    python -m bench.accuracy.j3_features ceiling                     # non-private linear heads, validation
    python -m bench.accuracy.j3_features dp --kind both --eps 8 --lr 0.125   # DP, realised noise ×2, validation

J = 3 needs a side that is a multiple of 8: the 28-pixel images are upsampled to 32 (bilinear).
`--kind`: j2 (the recipe: J = 2 pooled 3×3), j3 (J = 3, 4×4), j3p2 / j3p3 (J = 3 pooled 2×2 / 3×3 + j2), both
(J = 3 4×4 + j2). Reads the J = 2 cache of `bench.accuracy.cache_features` from `--j2` (/tmp/acc).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.accuracy.head_ceiling import fit, private_fit


def cache(out: Path, views: bool = False) -> None:
    from hemafed.core.data.bloodmnist import load_splits, locate
    from hemafed.core.learning.features import Scattering2D, scatter_features
    from hemafed.core.learning.models import images_to_tensor

    splits = load_splits(locate(None))
    scat = Scattering2D(32, 3, 8)
    out.mkdir(parents=True, exist_ok=True)
    from hemafed.core.learning.features import dihedral

    jobs = [(name, 0) for name in ("val", "train")] + [("val", k) for k in range(1, 8) if views]
    for name, k in jobs:
        path = out / (f"j3_{name}.pt" if k == 0 else f"j3_{name}_d{k}.pt")
        if path.exists():
            continue
        x = F.interpolate(images_to_tensor(splits[name].images, 28), size=32, mode="bilinear", align_corners=False)
        started = time.time()
        f = scatter_features(dihedral(x, k), scat, 256).half()
        torch.save({"x": f, "y": torch.as_tensor(splits[name].labels)}, path)
        print(path.name, tuple(f.shape), f"{time.time() - started:.0f} s", flush=True)


def features(kind: str, split: str, j2_dir: Path, j3_dir: Path, view: int = 0,
             j2_views: Path = Path("/tmp/acc2")) -> tuple[torch.Tensor, torch.Tensor]:
    """`view` k > 0: the k-th symmetry of the square of every image (J = 2 from `j2_views`)."""
    d = torch.load(j2_dir / f"{split}.pt" if view == 0 else j2_views / f"{split}_d{view}.pt")
    j2 = F.adaptive_avg_pool2d(F.group_norm(d["x"].float(), 27), 3).flatten(1)
    y = d["y"].long().reshape(-1)
    if kind == "j2":
        return j2, y
    j3 = F.group_norm(torch.load(j3_dir / (f"j3_{split}.pt" if view == 0 else f"j3_{split}_d{view}.pt"))["x"]
                      .float(), 21)
    if kind == "j3":
        return j3.flatten(1), y
    if kind in ("j3p2", "j3p3"):
        return torch.cat([j2, F.adaptive_avg_pool2d(j3, int(kind[-1])).flatten(1)], 1), y
    return torch.cat([j2, j3.flatten(1)], 1), y


def ceiling(args: argparse.Namespace) -> None:
    for kind in args.kinds:
        tx, ty = features(kind, "train", args.j2, args.j3)
        vx, vy = features(kind, "val", args.j2, args.j3)
        torch.manual_seed(0)
        head = torch.nn.Linear(tx.shape[1], 8)
        acc, best = fit(head, tx, ty, vx, vy)
        print(f"{kind} dim {tx.shape[1]}: last {acc:.4f} best {best:.4f}", flush=True)


def dp(args: argparse.Namespace) -> None:
    tx, ty = features(args.kind, "train", args.j2, args.j3)
    vx, vy = features(args.kind, "val", args.j2, args.j3)
    views = [features(args.kind, "val", args.j2, args.j3, k)[0] for k in range(1, 8)] if args.tta else []
    singles, ttas = private_fit(tx, ty, vx, vy, views, args.eps, args.lr, args.rounds, args.seeds)
    tta = f", TTA {np.mean(ttas):.4f} ± {np.std(ttas):.4f}" if views else ""
    print(f"{args.kind} dim {tx.shape[1]} eps {args.eps} lr {args.lr} T {args.rounds} seeds {args.seeds}: "
          f"single {np.mean(singles):.4f} ± {np.std(singles):.4f}{tta}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("cache", "ceiling", "dp"))
    ap.add_argument("--j2", type=Path, default=Path("/tmp/acc"))
    ap.add_argument("--j3", type=Path, default=Path("/tmp/exp"))
    ap.add_argument("--kind", choices=("j2", "j3", "j3p2", "j3p3", "both"), default="both")
    ap.add_argument("--kinds", nargs="+", default=["j2", "j3", "j3p2", "both"], help="ceiling: these kinds")
    ap.add_argument("--eps", type=float, default=8.0)
    ap.add_argument("--lr", type=float, default=0.125)
    ap.add_argument("--rounds", type=int, default=500)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--tta", action="store_true", help="dp: also logits averaged over the 8 views (needs the views)")
    ap.add_argument("--views", action="store_true", help="cache: also the 7 other symmetries of the val split")
    args = ap.parse_args()
    torch.set_num_threads(1)
    {"cache": lambda: cache(args.j3, args.views), "ceiling": lambda: ceiling(args), "dp": lambda: dp(args)}[args.what]()


if __name__ == "__main__":
    main()
