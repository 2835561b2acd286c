"""Compute scattering features of BloodMNIST once and cache them for the accuracy screen.

Research script (not part of the product): `python -m bench.accuracy.cache_features --out /tmp/acc`.
`--dihedral` also stores the train split under the 8 flips/90° rotations (augmentation multiplicity).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from hemafed.core.data.bloodmnist import load_splits, locate
from hemafed.core.learning.features import Scattering2D, scatter_features
from hemafed.core.learning.models import images_to_tensor


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th of the 8 symmetries of the square (k = 0 identity)."""
    x = torch.rot90(x, k % 4, dims=(2, 3))
    return torch.flip(x, dims=(3,)) if k >= 4 else x


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/acc")
    ap.add_argument("--dihedral", action="store_true")
    ap.add_argument("--ks", type=int, nargs="*", default=None, help="these symmetries (0-7) of --splits")
    ap.add_argument("--splits", nargs="*", default=["train", "val", "test"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    splits = load_splits(locate(None))
    scat = Scattering2D(28, 2, 8)
    for name, split in splits.items():
        if name not in args.splits:
            continue
        x = images_to_tensor(split.images, 28)
        ks = range(8) if (args.dihedral and name == "train") else [0]
        if args.ks is not None:
            ks = args.ks
        for k in ks:
            path = out / (f"{name}.pt" if k == 0 else f"{name}_d{k}.pt")
            if path.exists():
                continue
            t = time.perf_counter()
            f = scatter_features(dihedral(x, k), scat, 256).half()
            torch.save({"x": f, "y": torch.as_tensor(split.labels)}, path)
            print(f"{path}: {tuple(f.shape)} in {time.perf_counter() - t:.1f} s", flush=True)


if __name__ == "__main__":
    main()
