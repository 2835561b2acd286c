"""In-process screen of accuracy levers (no sockets): DP-FedSGD over 10 hospitals.

Research script. Reads features cached by `bench.accuracy.cache_features`, splits
the train split across hospitals (core.partition, Dirichlet(0.5) by default) and
runs T rounds of: every hospital Poisson-samples its records at rate q, computes
its clipped gradient sum with `core.fedsgd.clipped_gradient_sum`, the noise is
added (distributed: N(0, σ²C²) in total; local: N(0, σ²C²) per hospital, i.e.
n·σ²C² in total), and `core.fedsgd.FedSGDServer` applies the step. σ is
calibrated with the project's accountant for (ε, δ, q, T) per hospital. Reports
validation accuracy (test only with --test). Each config is one JSON line.

    python -m bench.accuracy.screen --out /tmp/acc/screen.jsonl --eps 8 --steps 500 --batch 1024 --lr 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hemafed.core.data.partition import partition
from hemafed.core.learning.fedsgd import FedSGDServer, clipped_gradient_sum
from hemafed.core.learning.models import get_flat_params, set_flat_params
from hemafed.core.privacy.calibration import calibrate_sigma

AUG_PERMS: dict[int, torch.Tensor] = {}


def load(cache: Path, split: str, groups: int = 27, pool: int = 0, log: float = 0.0,
         extra_pool: int = 0, orbit: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    d = torch.load(cache / f"{split}.pt")
    x = d["x"].float()
    for k in orbit:  # average the features over symmetries of the image (invariant features, no privacy cost)
        if k:
            x += torch.load(cache / f"{split}_d{k}.pt")["x"].float()
    if orbit:
        x /= len(orbit)
    if log:  # compress the heavy-tailed scattering coefficients (sign kept for the low-pass channel)
        x = torch.sign(x) * torch.log1p(x.abs() / log)
    x = F.group_norm(x, groups)
    if pool:
        pooled = F.adaptive_avg_pool2d(x, pool).flatten(1)
        if extra_pool:
            pooled = torch.cat([pooled, F.adaptive_avg_pool2d(x, extra_pool).flatten(1)], 1)
        x = pooled
    return x, d["y"].long()


@torch.no_grad()
def accuracy(head: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, views: list[torch.Tensor] | None = None) -> float:
    """Top-1 accuracy; with `views` (features of transformed copies of the same images) the
    logits are averaged over x and every view first (test-time augmentation)."""
    head.eval()
    logits = head(x)
    for v in views or []:
        logits = logits + head(v)
    head.train()
    return float((logits.argmax(1) == y).float().mean())


def run(args: argparse.Namespace, seed: int) -> dict:
    cache = Path(args.cache)
    orbit = tuple(args.orbit)
    x_tr, y_tr = load(cache, "train", pool=args.pool, log=args.log, extra_pool=args.extra_pool, orbit=orbit)
    x_ev, y_ev = load(cache, "test" if args.test else "val", pool=args.pool, log=args.log,
                      extra_pool=args.extra_pool, orbit=orbit)
    views = None
    if args.tta:  # the 7 other symmetries of the square of every evaluation image
        split = "test" if args.test else "val"
        views = []
        for k in range(1, 8):
            d = torch.load(cache / f"{split}_d{k}.pt")
            v = F.group_norm(d["x"].float(), 27)
            views.append(F.adaptive_avg_pool2d(v, args.pool).flatten(1) if args.pool else v)
    parts = partition(y_tr.numpy(), args.sites, args.partition, seed=seed)
    if args.alone is not None:  # one hospital alone: its own records, its own DP-SGD
        sizes = np.array([len(p) for p in parts])
        order = np.argsort(sizes)
        site = int(order[len(order) // 2]) if args.alone == "median" else int(args.alone)
        idx = torch.as_tensor(parts[site])
        x_tr, y_tr = x_tr[idx], y_tr[idx]
    if args.am:  # augmentation multiplicity: each record is (N, k, D), its k views' gradients averaged
        am_views = [x_tr]
        for k in args.am:
            v, _ = load(cache, f"train_d{k}", pool=args.pool)
            am_views.append(v if args.alone is None else v[idx])
        x_tr = torch.stack(am_views, 1)
    n_total = len(y_tr)
    q = args.q if args.q else min(1.0, args.batch / n_total)
    delta = 1e-5
    sigma = calibrate_sigma(args.eps, delta, q, args.steps) if args.eps > 0 else 0.0
    n_noise = args.sites if (args.mode == "local" and args.alone is None) else 1
    # linear head on the (optionally pooled) cached features; with --pool 3 this is exactly the head of the
    # registry model scatter_linear_28 (whose `features` pool to 3×3)
    torch.manual_seed(seed)
    head = torch.nn.Sequential(torch.nn.Flatten(start_dim=-1), torch.nn.Linear(x_tr.shape[-1], 8))
    server = FedSGDServer(args.lr, args.momentum, ema=args.ema)
    w = get_flat_params(head)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    curve = []
    for step in range(args.steps):
        set_flat_params(head, w)
        if args.eps > 0:
            gs = clipped_gradient_sum(head, x_tr, y_tr, q, args.clip, gen)
            noise = rng.normal(0.0, sigma * args.clip * np.sqrt(n_noise * args.noise_factor), size=gs.vector.shape)
            w = server.apply(w, gs.vector + noise, q * n_total)
        else:  # non-private: mean gradient of a Poisson batch, no clipping, no noise
            idx = torch.nonzero(torch.rand(n_total, generator=gen) < q).view(-1)
            head.zero_grad()
            F.cross_entropy(head(x_tr[idx]), y_tr[idx], reduction="sum").backward()
            g = torch.cat([p.grad.reshape(-1) for p in head.parameters()]).numpy()
            w = server.apply(w, g, q * n_total)
        if args.eval_every and (step + 1) % args.eval_every == 0:
            set_flat_params(head, server.ema if args.ema else w)
            curve.append((step + 1, accuracy(head, x_ev, y_ev)))
    set_flat_params(head, server.ema if args.ema else w)
    acc = accuracy(head, x_ev, y_ev)
    acc_tta = accuracy(head, x_ev, y_ev, views) if views else None
    return {"seed": seed, "acc": acc, "acc_tta": acc_tta, "sigma": sigma, "q": q, "n_train": n_total,
            "seconds": time.perf_counter() - t0, "curve": curve}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default="/tmp/acc")
    ap.add_argument("--out", default="/tmp/acc/screen.jsonl")
    ap.add_argument("--tag", default="")
    ap.add_argument("--eps", type=float, default=8.0, help="0: non-private")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch", type=float, default=1024, help="expected batch, all hospitals (q = B/N)")
    ap.add_argument("--q", type=float, default=0.0, help="Poisson rate per record (overrides --batch)")
    ap.add_argument("--lr", type=float, default=2.0)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--pool", type=int, default=0, help="adaptive average pool of the 7×7 maps to P×P")
    ap.add_argument("--extra-pool", type=int, default=0, help="also concatenate a second pooling size")
    ap.add_argument("--log", type=float, default=0.0, help="log(1 + |x|/s) before GroupNorm, s = this")
    ap.add_argument("--orbit", type=int, nargs="*", default=[], help="average features over these symmetries")
    ap.add_argument("--ema", type=float, default=0.0)
    ap.add_argument("--mode", choices=("distributed", "local"), default="distributed")
    ap.add_argument("--noise-factor", type=float, default=1.0,
                    help="noise variance × this: survivors/(t − c) for distributed shares (10/(6 − 1) = 2)")
    ap.add_argument("--sites", type=int, default=10)
    ap.add_argument("--partition", default="dirichlet:0.5")
    ap.add_argument("--alone", default=None, help="'median' or a hospital index: train one hospital alone")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--eval-every", type=int, default=0)
    ap.add_argument("--test", action="store_true", help="evaluate on the test split (final numbers only)")
    ap.add_argument("--am", type=int, nargs="*", default=[],
                    help="augmentation multiplicity: also these symmetries' train features (train_dK.pt)")
    ap.add_argument("--tta", action="store_true",
                    help="also report accuracy with logits averaged over the 8 dihedral views ({split}_d1..7.pt)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res = [run(args, s) for s in args.seeds]
    accs = [r["acc"] for r in res]
    line = {k: v for k, v in vars(args).items() if k not in ("cache", "out", "threads")}
    line.update({"split": "test" if args.test else "val", "acc_mean": float(np.mean(accs)),
                 "acc_std": float(np.std(accs)), "runs": res})
    if args.tta:
        tta = [r["acc_tta"] for r in res]
        line.update({"acc_tta_mean": float(np.mean(tta)), "acc_tta_std": float(np.std(tta))})
    with open(args.out, "a") as fh:
        fh.write(json.dumps(line) + "\n")
    print(f"{args.tag} eps={args.eps} mode={args.mode} T={args.steps} B={args.batch} q={res[0]['q']:.4f} "
          f"lr={args.lr} "
          f"clip={args.clip} ema={args.ema} pool={args.pool}+{args.extra_pool} log={args.log} alone={args.alone}: "
          f"acc {np.mean(accs):.4f} ± {np.std(accs):.4f} "
          f"{'tta {:.4f} ± {:.4f} '.format(line['acc_tta_mean'], line['acc_tta_std']) if args.tta else ''}"
          f"nf={args.noise_factor} "
          f"σ={res[0]['sigma']:.3f} ({res[0]['seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
