"""Lever 6 of issue 9: features learned from procedurally generated images only (research script).

The encoder and its pre-training live in `core/learning/procedural_features.py` (the model `scatter_synth_28`
uses the weights it made). This script screens encoders on BloodMNIST's validation split: the
non-private linear-probe ceiling, alone and beside the scattering features, and private heads:

    python -m hemafed.core.learning.procedural_features --minutes 35 --steps 100000 --out /tmp/randp/enc.npz
    python -m bench.accuracy.procedural_pretrain probe --out /tmp/randp --cache /tmp/acc --concat
    python -m bench.accuracy.procedural_pretrain dp --ckpt /tmp/randp/enc.npz --concat --eps 8 3 --lrs 0.5 0.25
    python -m bench.accuracy.procedural_pretrain dp --ckpt assets/procedural_encoder_28.npz --concat --orbit \
        --pool 2 --center private --eps 8 5 3 --lrs 0.5 1.0       # the fifth pass (scatter_synth_inv_28)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hemafed.core.learning.procedural_features import encoder_body, load_encoder, procedural_features


def real_images() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """BloodMNIST's train and val splits as [0, 1] tensors (what the encoder was trained on)."""
    from hemafed.core.data.bloodmnist import load_splits, locate

    splits = load_splits(locate(None))
    return {name: (torch.from_numpy(s.images).permute(0, 3, 1, 2).float() / 255, torch.as_tensor(s.labels))
            for name, s in splits.items() if name in ("train", "val")}


def learned(body: nn.Module, x: torch.Tensor, pool: int = 3) -> torch.Tensor:
    return procedural_features(x, 512, pool, body).flatten(1)


def probe(args: argparse.Namespace) -> None:
    from bench.accuracy.head_ceiling import fit, load

    data = real_images()
    scat = {name: load(args.cache, name, 3)[0] for name in ("train", "val")}
    ty, vy = data["train"][1], data["val"][1]
    torch.manual_seed(0)
    encoders = [(p.stem, load_encoder(str(p))) for p in sorted(args.out.glob("*.npz"))]
    for name, body in [*encoders, ("random init", encoder_body().eval())]:  # never trained: random conv features
        feats = {split: learned(body, x) for split, (x, _) in data.items()}
        runs = [("learned", feats["train"], feats["val"])]
        if args.concat:
            runs.append(("learned + scattering", torch.cat([feats["train"], scat["train"]], 1),
                         torch.cat([feats["val"], scat["val"]], 1)))
        for label, tx, vx in runs:
            torch.manual_seed(0)
            last, best = fit(nn.Linear(tx.shape[1], 8), tx, ty, vx, vy, args.epochs)
            print(f"{name:>16} {label:>22} ({tx.shape[1]} dims): last {last:.4f} best {best:.4f}", flush=True)
    torch.manual_seed(0)
    last, best = fit(nn.Linear(scat["train"].shape[1], 8), scat["train"], ty, scat["val"], vy, args.epochs)
    print(f"{'scattering':>16} {'alone':>22} ({scat['train'].shape[1]} dims): last {last:.4f} best {best:.4f}")


def private(args: argparse.Namespace) -> None:
    """Private linear heads (`head_ceiling.private_fit`) on the learned features of `--ckpt`, with the
    recipe's scattering features beside them (`--concat`), single view and with the 8-view TTA."""
    from bench.accuracy.cache_features import dihedral
    from bench.accuracy.head_ceiling import private_fit
    from bench.accuracy.j3_features import features

    data = real_images()
    body = load_encoder(str(args.ckpt))
    (tx_img, ty), (vx_img, vy) = data["train"], data["val"]
    if args.orbit:
        return private_orbit(args, body, tx_img, ty, vx_img, vy)
    tx, vx = learned(body, tx_img, args.pool), learned(body, vx_img, args.pool)
    views = [learned(body, dihedral(vx_img, k), args.pool) for k in range(1, 8)]
    if args.concat:
        tx = torch.cat([tx, features("j2", "train", args.cache, args.cache)[0]], 1)
        vx = torch.cat([vx, features("j2", "val", args.cache, args.cache)[0]], 1)
        views = [torch.cat([v, features("j2", "val", args.cache, args.cache, k)[0]], 1)
                 for k, v in enumerate(views, 1)]
    for eps in args.eps:
        for lr in args.lrs:
            singles, ttas = private_fit(tx, ty, vx, vy, views, eps, lr, args.rounds, args.seeds)
            print(f"{'learned + scattering' if args.concat else 'learned'} dim {tx.shape[1]} eps {eps} lr {lr} "
                  f"T {args.rounds} seeds {args.seeds}: single {np.mean(singles):.4f} ± {np.std(singles):.4f}, "
                  f"TTA {np.mean(ttas):.4f} ± {np.std(ttas):.4f}", flush=True)


def orbit_mean(body: nn.Module, images: torch.Tensor, split: str, args: argparse.Namespace) -> torch.Tensor:
    """Every image's features averaged over the 8 symmetries of the square (what TTA evaluates)."""
    from bench.accuracy.cache_features import dihedral
    from bench.accuracy.j3_features import features

    total = None
    for k in range(8):
        f = learned(body, dihedral(images, k), args.pool)
        if args.concat:
            f = torch.cat([f, features("j2", split, args.cache, args.cache, k)[0]], 1)
        total = f if total is None else total + f
    return total / 8


def synthetic_mean(body: nn.Module, args: argparse.Namespace, n: int = 4096) -> torch.Tensor:
    """The orbit-mean features' average over `n` generated dead-leaves images (data-independent)."""
    import torch.nn.functional as F

    from bench.accuracy.cache_features import dihedral
    from hemafed.core.learning.features import Scattering2D, scatter_features
    from hemafed.core.learning.models import _normalisation
    from hemafed.core.learning.procedural_features import dead_leaves

    syn = dead_leaves(n, torch.Generator().manual_seed(0))
    mean, std = _normalisation()
    scat = Scattering2D(28, 2, 8)
    total = None
    for k in range(8):
        view = dihedral(syn, k)
        f = learned(body, view, args.pool)
        if args.concat:
            s = scatter_features((view - mean) / std, scat, 256)
            f = torch.cat([f, F.adaptive_avg_pool2d(F.group_norm(s, 27), 3).flatten(1)], 1)
        total = f if total is None else total + f
    return (total / 8).mean(0, keepdim=True)


def private_center(tx: torch.Tensor, eps: float, seed: int, radius: float) -> torch.Tensor:
    """What the product's first round releases (core.fedsgd.clipped_round_sum): the Poisson sample's
    features clipped to `radius`, scaled to norm ≤ C = 1, plus the round's noise as released (2× the
    accounted variance), rescaled by radius / expected batch."""
    from hemafed.core.privacy.calibration import calibrate_sigma

    q = 0.1713
    sigma = calibrate_sigma(eps, 1e-5, q, 500)
    gen = torch.Generator().manual_seed(100 + seed)
    x = tx[torch.nonzero(torch.rand(len(tx), generator=gen) < q).view(-1)]
    v = x * torch.clamp(radius / x.norm(dim=1, keepdim=True), max=1.0) / radius
    noisy = v.sum(0) + torch.randn(tx.shape[1], generator=gen) * sigma * np.sqrt(2)
    return noisy * radius / (q * len(tx))


def private_orbit(args: argparse.Namespace, body: nn.Module, tx_img: torch.Tensor, ty: torch.Tensor,
                  vx_img: torch.Tensor, vy: torch.Tensor) -> None:
    """Train the private head on the orbit-mean features too, so training sees what evaluation sees.
    A record's input is a fixed function of that record alone: same sensitivity, no privacy cost.
    `--center`: subtract the train split's mean (oracle, optionally with a random error of
    `--center-error` times its norm), the generated images' mean, or the product's private estimate
    (one round of the plan: T − 1 training rounds follow)."""
    from bench.accuracy.head_ceiling import fit, private_fit

    cache = Path(f"/tmp/acc2/orbit_pool{args.pool}_{'concat' if args.concat else 'learned'}.pt")
    if cache.exists():
        tx, vx = torch.load(cache)
    else:
        tx, vx = orbit_mean(body, tx_img, "train", args), orbit_mean(body, vx_img, "val", args)
        torch.save((tx, vx), cache)
    mu = tx.mean(0, keepdim=True)
    print(f"|mean| {mu.norm():.2f}, mean |x| {tx.norm(dim=1).mean():.2f}, "
          f"mean |x - mean| {(tx - mu).norm(dim=1).mean():.2f}", flush=True)
    if args.center == "oracle":  # would cost privacy: an upper bound
        noise = torch.randn(mu.shape, generator=torch.Generator().manual_seed(5))
        center = mu + noise / noise.norm() * args.center_error * mu.norm()
    elif args.center == "synthetic":
        center = synthetic_mean(body, args)
        print(f"|synthetic mean - mean| {(center - mu).norm():.2f}", flush=True)
    else:
        center = torch.zeros_like(mu)
    if args.center != "private":
        tx, vx = tx - center, vx - center
        torch.manual_seed(0)
        last, best = fit(nn.Linear(tx.shape[1], 8), tx, ty, vx, vy, args.epochs)
        print(f"orbit-mean dim {tx.shape[1]} non-private: last {last:.4f} best {best:.4f}", flush=True)
    for eps in args.eps:
        for lr in args.lrs:
            if args.center == "private":
                accs = []
                for seed in args.seeds:
                    c = private_center(tx, eps, seed, args.radius)
                    accs += private_fit(tx - c, ty, vx - c, vy, [], eps, lr, args.rounds - 1, [seed])[0]
            else:
                accs, _ = private_fit(tx, ty, vx, vy, [], eps, lr, args.rounds, args.seeds)
            print(f"orbit-mean dim {tx.shape[1]} center {args.center} eps {eps} lr {lr} T {args.rounds} "
                  f"seeds {args.seeds}: {np.mean(accs):.4f} ± {np.std(accs):.4f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["probe", "dp"])
    ap.add_argument("--out", type=Path, default=Path("/tmp/randp"), help="probe: every *.npz encoder here")
    ap.add_argument("--ckpt", type=Path, default=Path("/tmp/randp/enc.npz"), help="dp: the encoder")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/acc"), help="scattering caches (cache_features)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--concat", action="store_true", help="the scattering features beside the learned ones")
    ap.add_argument("--eps", type=float, nargs="+", default=[8.0, 3.0], help="dp: these ε")
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.5, 0.25], help="dp: these server lr")
    ap.add_argument("--rounds", type=int, default=500)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pool", type=int, default=3, help="dp: pool the learned maps to pool×pool")
    ap.add_argument("--orbit", action="store_true", help="dp: train and evaluate on the 8-view mean features")
    ap.add_argument("--center", choices=["none", "oracle", "synthetic", "private"], default="none",
                    help="dp --orbit: subtract a mean (see private_orbit)")
    ap.add_argument("--center-error", type=float, default=0.0, help="--center oracle: random error, × |mean|")
    ap.add_argument("--radius", type=float, default=40.0, help="--center private: the clipping radius R")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    {"probe": probe, "dp": private}[args.what](args)


if __name__ == "__main__":
    main()
