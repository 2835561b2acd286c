"""Does 64-pixel input raise what fixed, data-free features can reach? (research script, issue 16)

Non-private linear probes on the validation split, one view per image, 6,000 training images (the issue's quick
measurements used the same size): the recipe's 28-px features (`scatter_synth_inv_28`'s single view: scattering
J = 2 pooled 3×3 and the procedural encoder's maps pooled 2×2) beside features of the same images at 64 px from
`bloodmnist_64.npz` — the shipped procedural encoder (trained on 28-px dead leaves) run on 64-px input, its
16×16 maps pooled 2×2 / 4×4, and scattering J = 3 at 64 px pooled 2×2.

    python -m bench.accuracy.res64_screen cache      # /tmp/res64/*.pt, with per-image feature cost
    python -m bench.accuracy.res64_screen ceiling    # linear probes, validation
    python -m bench.accuracy.res64_screen cache-full # every training image (28-px features, 64-px encoder)
    python -m bench.accuracy.res64_screen dp --eps 8 # DP-SGD screen, 3 seeds, validation
    python -m bench.accuracy.res64_screen cache-views             # 8-view 28-px features, each 64-px view apart
    python -m bench.accuracy.res64_screen dp-views --eps 8 --lr 0.5 # the 64-px maps from 1, 2, 4 or 8 views
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.accuracy.head_ceiling import fit

OUT = Path("/tmp/res64")


def _subset(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(rng.permutation(len(labels))[:n])


def cache(n_train: int) -> None:
    from hemafed.core.data.bloodmnist import load_splits, locate
    from hemafed.core.learning.features import Scattering2D, scatter_features
    from hemafed.core.learning.models import _normalisation, build_model, images_to_tensor
    from hemafed.core.learning.procedural_features import procedural_features

    OUT.mkdir(parents=True, exist_ok=True)
    path28 = locate(None)
    s28, s64 = load_splits(path28), load_splits(path28.parent / "bloodmnist_64.npz")
    model = build_model("scatter_synth_inv_28")
    scat64 = Scattering2D(64, 3, 8)
    mean, std = _normalisation()
    for split in ("val", "train"):
        idx = _subset(s28[split].labels.reshape(-1), n_train) if split == "train" else slice(None)
        x28 = images_to_tensor(s28[split].images[idx], 28)
        x64 = images_to_tensor(s64[split].images[idx], 64)
        plain64 = x64 * std + mean  # the procedural encoder takes [0, 1] images
        out, cost = {"y": torch.as_tensor(s28[split].labels[idx].reshape(-1)).long()}, {}
        for name, fn in (
            ("f28", lambda x28=x28: model.features(x28).flatten(1)),
            ("enc64_p4", lambda plain64=plain64: procedural_features(plain64, 256, 4).flatten(1)),
            ("scat64_j3", lambda x64=x64: F.adaptive_avg_pool2d(
                F.group_norm(scatter_features(x64, scat64, 128), 7), 2).flatten(1)),
        ):
            t = time.perf_counter()
            out[name] = fn().float()
            cost[name] = (time.perf_counter() - t) / len(out["y"]) * 1e3
        torch.save(out, OUT / f"{split}.pt")
        print(split, {k: tuple(v.shape) for k, v in out.items()}, {k: f"{v:.2f} ms/image" for k, v in cost.items()},
              flush=True)


def _pool2(x: torch.Tensor) -> torch.Tensor:
    """The 64-px encoder's 4×4 maps pooled to 2×2."""
    return F.avg_pool2d(x.view(len(x), 128, 4, 4), 2).flatten(1)


# name → (the cached features it needs, how it combines them)
COMBOS = {
    "28 px (recipe's features)": (("f28",), lambda d: d["f28"]),
    "64 px encoder 2×2": (("enc64_p4",), lambda d: _pool2(d["enc64_p4"])),
    "64 px encoder 4×4": (("enc64_p4",), lambda d: d["enc64_p4"]),
    "64 px scattering J=3 2×2": (("scat64_j3",), lambda d: d["scat64_j3"]),
    "28 px + 64 px encoder 2×2": (("f28", "enc64_p4"), lambda d: torch.cat([d["f28"], _pool2(d["enc64_p4"])], 1)),
    "28 px + 64 px encoder 4×4": (("f28", "enc64_p4"), lambda d: torch.cat([d["f28"], d["enc64_p4"]], 1)),
    "28 px + 64 px scattering J=3 2×2": (("f28", "scat64_j3"), lambda d: torch.cat([d["f28"], d["scat64_j3"]], 1)),
    "28 px + both 64 px": (("f28", "enc64_p4", "scat64_j3"),
                           lambda d: torch.cat([d["f28"], _pool2(d["enc64_p4"]), d["scat64_j3"]], 1)),
}
DP_COMBOS = ("28 px (recipe's features)", "28 px + 64 px encoder 2×2", "28 px + 64 px encoder 4×4")


def ceiling(epochs: int, orbit: bool = False) -> None:
    if orbit:
        tr, va = torch.load(OUT / "train_full_orbit.pt"), torch.load(OUT / "val_full_orbit.pt")
    else:
        tr, va = torch.load(OUT / "train.pt"), torch.load(OUT / "val.pt")
    for name, (needs, get) in COMBOS.items():
        if not all(key in tr for key in needs):  # 64-px scattering is cached for the quick probe only
            continue
        tx, vx = get(tr), get(va)
        mu, sd = tx.mean(0), tx.std(0) + 1e-6
        torch.manual_seed(0)
        last, best = fit(torch.nn.Linear(tx.shape[1], 8), (tx - mu) / sd, tr["y"], (vx - mu) / sd, va["y"], epochs)
        label = f"{name}, every training image, 8-view average" if orbit else name
        print(f"| {label} | {tx.shape[1]} | {last:.2%} | {best:.2%} |", flush=True)


def cache_full(orbit: bool = False) -> None:
    """Every training image's 28-px recipe features and 64-px encoder maps (one view, or with `orbit` averaged over
    the 8 rotations and flips as the product trains and evaluates), for the DP screen; with `orbit` the validation
    images' too."""
    from hemafed.core.data.bloodmnist import load_splits, locate
    from hemafed.core.learning.features import dihedral
    from hemafed.core.learning.models import _normalisation, build_model, images_to_tensor
    from hemafed.core.learning.procedural_features import procedural_features

    path28 = locate(None)
    s28, s64 = load_splits(path28), load_splits(path28.parent / "bloodmnist_64.npz")
    model = build_model("scatter_synth_inv_28")
    mean, std = _normalisation()
    for split in ("train", "val") if orbit else ("train",):
        x28 = images_to_tensor(s28[split].images, 28)
        plain64 = images_to_tensor(s64[split].images, 64) * std + mean
        t = time.perf_counter()
        views = range(8) if orbit else range(1)
        out = {"y": torch.as_tensor(s28[split].labels.reshape(-1)).long(),
               "f28": sum(model.features(dihedral(x28, k)).flatten(1) for k in views).float() / len(views),
               "enc64_p4": sum(procedural_features(dihedral(plain64, k), 256, 4).flatten(1)
                               for k in views).float() / len(views)}
        name = f"{split}_full{'_orbit' if orbit else ''}.pt"
        torch.save(out, OUT / name)
        print(f"{name}: {len(out['y'])} images in {time.perf_counter() - t:.0f} s", flush=True)


def dp(eps: float, lr: float, rounds: int, seeds: list[int], orbit: bool = False) -> None:
    """Central Poisson DP-SGD on a linear head (q 0.1713, the default plan's realised noise: `private_fit`), on
    features centred by their training mean (the product estimates it privately in round 1), validation split."""
    from bench.accuracy.head_ceiling import private_fit

    if orbit:
        tr, va = torch.load(OUT / "train_full_orbit.pt"), torch.load(OUT / "val_full_orbit.pt")
    else:
        tr, va = torch.load(OUT / "train_full.pt"), torch.load(OUT / "val.pt")

    for name in DP_COMBOS:
        get = COMBOS[name][1]
        tx, vx = get(tr), get(va)
        centre = tx.mean(0)
        t = time.perf_counter()
        singles, _ = private_fit(tx - centre, tr["y"], vx - centre, va["y"], [], eps, lr, rounds, seeds)
        label = f"{name} (8-view average)" if orbit else name
        print(f"| {label} | {tx.shape[1]} | {eps:g} | {lr:g} | {np.mean(singles):.2%} ± {np.std(singles):.2%} | "
              f"{len(seeds)} | {(time.perf_counter() - t) / len(seeds):.0f} s |", flush=True)


# the 64-px maps from fewer of the 8 views (seventh pass: could the 64-px model's preparation fit the cold main job's
# 15 minutes?): name → dihedral views averaged (0 identity, 1–3 rotations, 4–7 the same flipped)
FINE_VIEWS = {"1 view": (0,), "2 views (identity, 180°)": (0, 2), "2 views (identity, flip)": (0, 4),
              "4 views (rotations)": (0, 1, 2, 3), "8 views": tuple(range(8))}


def cache_views() -> None:
    """Every training and validation image's 28-px recipe features (8-view average) and the 64-px encoder's 4×4 maps
    of each of the 8 views separately."""
    from hemafed.core.data.bloodmnist import load_splits, locate
    from hemafed.core.learning.features import dihedral
    from hemafed.core.learning.models import _normalisation, build_model, images_to_tensor
    from hemafed.core.learning.procedural_features import procedural_features

    path28 = locate(None)
    s28, s64 = load_splits(path28), load_splits(path28.parent / "bloodmnist_64.npz")
    model = build_model("scatter_synth_inv_28")
    mean, std = _normalisation()
    OUT.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        t = time.perf_counter()
        x28 = images_to_tensor(s28[split].images, 28)
        plain64 = images_to_tensor(s64[split].images, 64) * std + mean
        out = {"y": torch.as_tensor(s28[split].labels.reshape(-1)).long(),
               "f28": model.eval_features(x28).flatten(1).float(),
               "views": torch.stack([procedural_features(dihedral(plain64, k), 256, 4).flatten(1).float()
                                     for k in range(8)])}
        torch.save(out, OUT / f"{split}_views.pt")
        print(f"{split}: {len(out['y'])} images in {time.perf_counter() - t:.0f} s", flush=True)


def dp_views(eps: float, lr: float, rounds: int, seeds: list[int]) -> None:
    """`dp`'s screen (8-view 28-px features beside the 64-px maps) with the 64-px maps averaged over FINE_VIEWS."""
    from bench.accuracy.head_ceiling import private_fit

    tr, va = torch.load(OUT / "train_views.pt"), torch.load(OUT / "val_views.pt")
    for name, views in FINE_VIEWS.items():
        tx = torch.cat([tr["f28"], tr["views"][list(views)].mean(0)], 1)
        vx = torch.cat([va["f28"], va["views"][list(views)].mean(0)], 1)
        centre = tx.mean(0)
        t = time.perf_counter()
        singles, _ = private_fit(tx - centre, tr["y"], vx - centre, va["y"], [], eps, lr, rounds, seeds)
        print(f"| 28 px (8 views) + 64 px encoder 4×4, {name} | {eps:g} | {lr:g} | {np.mean(singles):.2%} ± "
              f"{np.std(singles):.2%} | {len(seeds)} | {(time.perf_counter() - t) / len(seeds):.0f} s |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("step", choices=("cache", "ceiling", "cache-full", "dp", "cache-views", "dp-views"))
    ap.add_argument("--eps", type=float, default=8.0)
    ap.add_argument("--lr", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=500)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--orbit", action="store_true", help="features averaged over the 8 rotations and flips")
    ap.add_argument("--train", type=int, default=6000)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.step == "cache":
        cache(args.train)
    elif args.step == "ceiling":
        ceiling(args.epochs, args.orbit)
    elif args.step == "cache-full":
        cache_full(args.orbit)
    elif args.step == "cache-views":
        cache_views()
    elif args.step == "dp-views":
        dp_views(args.eps, args.lr, args.rounds, args.seeds)
    else:
        dp(args.eps, args.lr, args.rounds, args.seeds, args.orbit)


if __name__ == "__main__":
    main()
