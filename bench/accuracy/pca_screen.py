"""Screen: fewer coordinates for the private head — the default model's features projected on k directions before
the linear head — and other head-side levers: how the centre is estimated, per-block weights of the features
(research script, issue 16's low budgets).

DP noise is added to every coordinate of the head (8 × 4,747 weights), while the signal lives in far fewer
directions; a projection on k directions chosen without the hospitals' data shrinks the noise's norm by √(4,747/k).
Bases screened: "oracle" (the principal directions of the training features themselves: an upper bound, not
private), "synthetic" (those of the features of procedurally generated "dead leaves" scenes,
`core.learning.procedural_features.dead_leaves`: no hospital record goes into it), "random" (a Gaussian
projection), "none" (the head as it ships).

Central DP-SGD on the hospitals' pooled training splits (what the product trains on; `--records all`: every training
image) as the federation's step is (Poisson rate q, clip C = 1, the noise of the default plan with all 10 hospitals:
σ·C·√(10/8) for t = 9, c = 1), the features centred by their mean plus the private estimate's noise (`--centre`),
server SGD with momentum 0.9 at lr = min(1, k/σ); validation split with the product's test-time augmentation.
Reads the product's feature cache (warm after any run of the default model).

    python -m bench.accuracy.pca_screen --eps 1 --dims 128 512 --basis oracle synthetic random   # projections
    python -m bench.accuracy.pca_screen --eps 1 3 --basis --centre R:1 R:4 R:10 s:0.2           # the centre
    python -m bench.accuracy.pca_screen --eps 1 3 8 --basis --centre R:10 --scale none block:3,1,1  # block weights
    python -m bench.accuracy.pca_screen --eps 8 --basis --centre exact --scale block:3,1,1 \
        --noise-factor 1 0.5 0 --lr-schedule constant cosine --rounds 0 1000 --smoothing 0 0.1   # eighteenth pass
    python -m bench.accuracy.pca_screen --eps 8 --basis --centre R:10 --scale block:3,1,1 \
        --optimizer sgd adam:0.01 adambc:0.003                # the server's step (twenty-second pass)
    python -m bench.accuracy.pca_screen --eps 8 3 --basis --centre R:10 --scale block:3,1,1 \
        --encoder results/cellscenes/enc_cells_looks.npz     # another procedural encoder (twenty-third pass)
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

# of C for the gradient beside the cell check's moments: √(1 − 0.4²) ≈ 0.917 (`core.learning.cell_check`)
SHARE = 0.917


def _features(synthetic: int, records: str = "sites", encoder: Path | None = None):
    from hemafed.core.data.bloodmnist import load_splits, locate
    from hemafed.core.learning.models import build_model
    from hemafed.core.learning.site_trainer import model_inputs
    from hemafed.network.sim.simulate import SimulationOptions, hospitals

    h = hospitals(SimulationOptions(quiet=True))
    model = build_model(h.plan.model, len(h.plan.classes))
    if encoder is not None:  # the same model with another procedural encoder (the feature cache keys on its digest)
        model.encoder = str(encoder)
    images, labels = sites_training(h) if records == "sites" else (h.train.images, h.train.labels)
    xt = model_inputs(h.plan, model, images, "train").double()
    val = load_splits(locate(None, size=h.plan.input_size))["val"]
    xv = model_inputs(h.plan, model, val.images, "eval").double()
    xs = None
    if synthetic:
        from hemafed.core.learning.procedural_features import dead_leaves

        gen = torch.Generator().manual_seed(12345)
        scenes = torch.cat([dead_leaves(min(256, synthetic - i), gen, size=h.plan.input_size)
                            for i in range(0, synthetic, 256)])
        images = (scenes.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
        xs = model_inputs(h.plan, model, images, "train", cache=_NoCache()).double()
    yt = torch.as_tensor(np.asarray(labels).reshape(-1), dtype=torch.long)
    yv = torch.as_tensor(np.asarray(val.labels).reshape(-1), dtype=torch.long)
    return xt, yt, xv, yv, xs, h.plan


def sites_training(h) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels the product trains on (`network.sim.simulate.Hospitals` `h`): every hospital's
    training split, each having kept `plan.val_fraction` of its images back."""
    data = list(h.site_data().values())
    return np.concatenate([d.train_images for d in data]), np.concatenate([d.train_labels for d in data])


def round_noise(plan) -> float:
    """The std per coordinate of a full round's summed noise (all 10 hospitals' shares: 10/(t − c) times the
    accounted variance)."""
    return plan.noise_multiplier * plan.clip_norm * (10 / (plan.threshold - plan.dp_colluders)) ** 0.5


class _NoCache:
    """Synthetic images are drawn afresh: keep them out of the feature cache."""

    def features(self, _kind, images, compute, progress=None, cancel=None):
        return torch.cat([compute(images[i:i + 256]) for i in range(0, len(images), 256)])


def _basis(kind: str, dim: int, xt: torch.Tensor, xs: torch.Tensor | None, seed: int) -> torch.Tensor | None:
    if kind == "none" or not dim:
        return None
    if kind == "random":
        g = torch.Generator().manual_seed(seed)
        return torch.randn(xt.shape[1], dim, generator=g, dtype=torch.float64) / dim ** 0.5
    source = xt if kind == "oracle" else xs
    centred = source - source.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    return v[:dim].T


# The server's step over the rounds, as a factor on lr at the fraction f of the rounds done (`--lr-schedule`).
LR_SCHEDULES = {
    "constant": lambda f: 1.0,
    "cosine": lambda f: 0.5 * (1 + math.cos(math.pi * f)),
    "linear-half": lambda f: min(1.0, 2 * (1 - f)),  # constant, then down to 0 over the second half
    "step-80": lambda f: 1.0 if f < 0.8 else 0.2,
}


class NoisyAdam:
    """The server's step as Adam (β 0.9, 0.999) on the noisy mean gradient, instead of SGD with momentum. With
    `noise_var` (DP-AdamBC, Tang et al. 2024) the noise's known variance per coordinate is taken off the second
    moment before it scales the step, floored at `floor` × that variance, so the step is scaled by the gradient's own
    size rather than by the noise's."""

    def __init__(self, lr: float, noise_var: float | None = None, floor: float = 0.1) -> None:
        self.lr, self.noise_var, self.floor = lr, noise_var, floor
        self.m = self.v = None
        self.t = 0

    def apply(self, weights: np.ndarray, noisy_sum: np.ndarray, expected_batch: float, _center=None,
              _clip: float = 1.0) -> np.ndarray:
        g = noisy_sum / expected_batch
        if self.m is None:
            self.m, self.v = np.zeros_like(g), np.zeros_like(g)
        self.t += 1
        self.m = 0.9 * self.m + 0.1 * g
        self.v = 0.999 * self.v + 0.001 * g * g
        m, v = self.m / (1 - 0.9 ** self.t), self.v / (1 - 0.999 ** self.t)
        if self.noise_var is not None:
            v = np.maximum(v - self.noise_var, self.floor * self.noise_var)
        return weights - self.lr * m / (np.sqrt(v) + 1e-12)


def server_for(optimizer: str, base_lr: float, momentum: float, noise_sigma: float, expected_batch: float):
    """'sgd' (the product's `FedSGDServer`), 'adam:LR' or 'adambc:LR[:FLOOR]' (`NoisyAdam`)."""
    from hemafed.core.learning.fedsgd import FedSGDServer

    kind, *rest = optimizer.split(":")
    if kind == "sgd":
        return FedSGDServer(base_lr, momentum)
    if kind == "adam":
        return NoisyAdam(float(rest[0]))
    if kind == "adambc":
        return NoisyAdam(float(rest[0]), (noise_sigma / expected_batch) ** 2, *(float(f) for f in rest[1:]))
    raise ValueError(f"unknown optimizer {optimizer!r}")


def fit_head(zt, yt, classes: int, sigma: float, noise_sigma: float, q: float, rounds: int, k: float, seed: int,
             share: float = 1.0, bias: float = 1.0, schedule: str = "constant", smoothing: float = 0.0,
             prior_bias: bool = False, init: torch.Tensor | None = None, momentum: float = 0.9,
             optimizer: str = "sgd") -> torch.Tensor:
    """The head's weights (classes, d + 1; the bias's column last, its input `bias`) after `rounds` of the
    federation's step on the centred training features `zt`: Poisson(q) batches, each record's gradient clipped to
    `share`, Gaussian noise of std `noise_sigma` on the sum, server SGD with `momentum` (the product's 0.9) at lr =
    min(1, k/σ) times `schedule`'s factor. `init`: the weights to start from (zeros by default). `smoothing`: label
    smoothing of the targets; `prior_bias`: the biases start at the centred log class frequencies of `yt` (not
    private: an upper bound on what a private prior could give); `optimizer`: `server_for`'s."""
    g = torch.Generator().manual_seed(seed)
    n, d = zt.shape
    w = torch.zeros(classes, d + 1, dtype=torch.float64) if init is None else init.clone()
    if prior_bias:
        log_prior = torch.log(torch.bincount(yt, minlength=classes).double().clamp_min(1) / n)
        w[:, -1] = (log_prior - log_prior.mean()) / bias
    base_lr = min(1.0, k / sigma)
    server = server_for(optimizer, base_lr, momentum, noise_sigma, q * n)
    flat = w.reshape(-1).numpy().copy()
    target = torch.nn.functional.one_hot(yt, classes).double() * (1 - smoothing) + smoothing / classes
    ones = torch.full((n, 1), bias, dtype=torch.float64)
    za = torch.cat([zt, ones], 1)
    norms = za.norm(dim=1)
    for step in range(rounds):
        idx = torch.nonzero(torch.rand(n, generator=g) < q).reshape(-1)
        w = torch.as_tensor(flat, dtype=torch.float64).reshape(classes, d + 1)
        p = torch.softmax(za[idx] @ w.T, 1)
        r = p - target[idx]
        scale = torch.clamp(share / (r.norm(dim=1) * norms[idx] + 1e-12), max=1.0)
        grad = (r * scale[:, None]).T @ za[idx]
        grad += torch.randn(grad.shape, generator=g, dtype=torch.float64) * noise_sigma
        if optimizer == "sgd":
            server.lr = base_lr * LR_SCHEDULES[schedule](step / rounds)
        flat = server.apply(flat, grad.reshape(-1).numpy(), q * n, None, 1.0)
    return torch.as_tensor(flat, dtype=torch.float64).reshape(classes, d + 1)


def ceiling(xt, yt, xv, yv, classes: int, hidden: int = 0, epochs: int = 40, seed: int = 0) -> float:
    """Validation accuracy after `epochs` of a head trained without privacy on standardised features
    (`head_ceiling.fit` with weight decay 1e-4): linear, or with one hidden layer of `hidden` units (dropout 0.3)."""
    from bench.accuracy.head_ceiling import fit

    torch.manual_seed(seed)
    mean, std = xt.mean(0), xt.std(0) + 1e-6
    zt, zv = ((xt - mean) / std).float(), ((xv - mean) / std).float()
    d = zt.shape[1]
    model = torch.nn.Linear(d, classes) if not hidden else torch.nn.Sequential(
        torch.nn.Linear(d, hidden), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(hidden, classes))
    return fit(model, zt, yt, zv, yv, epochs, weight_decay=1e-4)[0]


def head_logits(w: torch.Tensor, z: torch.Tensor, bias: float = 1.0) -> torch.Tensor:
    return torch.cat([z, torch.full((len(z), 1), bias, dtype=torch.float64)], 1) @ w.T


def _train(zt, yt, zv, yv, classes: int, sigma: float, noise_sigma: float, q: float, rounds: int, k: float,
           seed: int, share: float = 1.0, bias: float = 1.0, **head) -> float:
    w = fit_head(zt, yt, classes, sigma, noise_sigma, q, rounds, k, seed, share, bias, **head)
    return float((head_logits(w, zv, bias).argmax(1) == yv).double().mean())


def noisy_centre(mean: torch.Tensor, error: float, noise: float, plan, radius: float, seed: int) -> torch.Tensor:
    """The federation's estimate of the features' mean: `mean` plus `error` times one round's noise (a noisy sum of
    features clipped to `radius`, over the expected batch; `_centre_scheme`)."""
    g = torch.Generator().manual_seed(1000 + seed)
    return mean + error * torch.randn(mean.shape, generator=g, dtype=torch.float64) * (
        noise / plan.clip_norm * radius / plan.batch_size)


def noisy_class_means(xt: torch.Tensor, yt: torch.Tensor, classes: int, noise: float, plan, radius: float,
                      rounds: int, seed: int) -> torch.Tensor:
    """Each class's mean feature vector as `rounds` rounds of noisy per-class feature sums would estimate it: each
    round's per-class sums carry the centre's noise (a record lies in one class, so releasing the class sums costs
    what the total does); the true class sizes stand in for their noisy counts."""
    g = torch.Generator().manual_seed(2000 + seed)
    means = []
    for c in range(classes):
        members = xt[yt == c]
        error = noise / plan.clip_norm * radius / (plan.sample_rate * max(len(members), 1)) / rounds ** 0.5
        means.append(members.mean(0) + torch.randn(xt.shape[1], generator=g, dtype=torch.float64) * error)
    return torch.stack(means)


def class_means_init(m: torch.Tensor, alpha: float) -> torch.Tensor:
    """Head weights (classes, d + 1) of the nearest-class-mean rule on class means `m` in the head's coordinates:
    W_c = α m_c, b_c = −α |m_c|² / 2."""
    return torch.cat([alpha * m, (-alpha * (m * m).sum(1) / 2)[:, None]], 1)


def _scattering_weights(part: str) -> torch.Tensor:
    """Weights within the scattering block, laid out (channel, coefficient, 3 × 3 positions): 'order:a,b,c' for the
    scattering's orders 0, 1 and 2 (1, 16 and 64 of each channel's 81 coefficients), 'channel:h,e,r' for the stain
    densities' haematoxylin, eosin and residual channels."""
    kind, values = part.split(":")
    w = [float(v) for v in values.split(",")]
    if kind == "order" and len(w) == 3:
        per_coefficient = torch.tensor([w[0]] + [w[1]] * 16 + [w[2]] * 64, dtype=torch.float64)
        return per_coefficient.repeat_interleave(9).repeat(3)
    if kind == "channel" and len(w) == 3:
        return torch.tensor(w, dtype=torch.float64).repeat_interleave(81 * 9)
    raise SystemExit(f"--scale …/{part}: order:a,b,c or channel:h,e,r")


def _rescale(scale: str, zt: torch.Tensor, zv: torch.Tensor, xt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if scale == "none":
        return zt, zv
    if scale == "diag":
        factor = 1.0 / xt.std(0).clamp_min(1e-6)
    elif scale.startswith("block:"):
        from hemafed.core.learning.models import MULTISCALE_BLOCK_WEIGHTS, block_scale

        blocks, *within = scale[6:].split("/")
        weights = tuple(float(v) for v in blocks.split(","))
        sizes = [n for n, _ in MULTISCALE_BLOCK_WEIGHTS]
        factor = block_scale(tuple(zip(sizes, weights, strict=True)), zt.shape[1]).double()
        for part in within:
            factor[:sizes[0]] *= _scattering_weights(part)
    else:
        raise SystemExit(f"--scale {scale!r}")
    before = zt.norm(dim=1).median()
    zt, zv = zt * factor, zv * factor
    k = before / zt.norm(dim=1).median()
    return zt * k, zv * k


def _per_record(norm: str, zt: torch.Tensor, zv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each record's centred features rescaled on their own: 'unit' to the training features' median norm, 'cap'
    to at most that norm. In a product the norm would be a public constant; then the transform involves no other
    record and the privacy analysis stays the same."""
    if norm == "none":
        return zt, zv
    target = zt.norm(dim=1).median()

    def one(z: torch.Tensor) -> torch.Tensor:
        n = z.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return z * (target / n if norm == "unit" else (target / n).clamp(max=1.0))

    if norm not in ("unit", "cap"):
        raise SystemExit(f"--norm {norm!r}")
    return one(zt), one(zv)


def _centre_scheme(scheme: str, share: float, rounds: int) -> tuple[float, float, int]:
    """(the centre's error in units of one round's, the gradient's share of C, gradient rounds) of a `--centre`."""
    if scheme == "exact":
        return 0.0, share, rounds
    kind, value = scheme.split(":")
    if kind == "R":
        n = int(value)
        return n ** -0.5, share, rounds - (n - 1)
    if kind == "s":
        x = float(value)
        return (1 + (rounds - 2) * x * x) ** -0.5, (share * share - x * x) ** 0.5, rounds
    if kind == "noise":
        return float(value), share, rounds
    raise SystemExit(f"--centre {scheme!r}: exact, R:n, s:x or noise:c")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--eps", type=float, nargs="+", default=[1.0])
    ap.add_argument("--dims", type=int, nargs="*", default=[], help="projections to screen besides none")
    ap.add_argument("--basis", nargs="*", default=["oracle"], choices=("oracle", "synthetic", "random"))
    ap.add_argument("--k", type=float, nargs="+", default=[0.0], help="lr·σ (0: the recipe's for the budget)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--centre", nargs="+", default=["R:1"],
                    help="how the centre is estimated: 'exact' (the true mean), 'R:n' (the first n rounds' noisy "
                         "feature sums averaged, n − 1 rounds fewer for the gradient; R:1 is the product's), 's:x' "
                         "(a share x of C in every later round too, averaged by precision; the gradient keeps "
                         "√(share² − x²)), 'noise:c' (c times the round-1 estimate's error)")
    ap.add_argument("--share", type=float, default=SHARE,
                    help="of the clip norm C for the gradient (the product's: √(1 − 0.4²) ≈ 0.917 beside the cell "
                         "check's moments)")
    ap.add_argument("--scale", nargs="+", default=["none"],
                    help="coordinates rescaled before the head: 'none', 'diag' (each by its std over the training "
                         "features: an oracle, not private), 'block:a,b,c' (the scattering, coarse and fine blocks "
                         "times a, b, c); either way then scaled back to the features' median norm. The head's own "
                         "block weights (`CenteredLinear.block_weights`) are not applied: 'none' is the features as "
                         "cached, block:3,1,1 the default model's head; '/order:a,b,c' or '/channel:h,e,r' after it "
                         "weighs the scattering's orders or stain channels too")
    ap.add_argument("--norm", nargs="+", default=["none"], choices=("none", "unit", "cap"),
                    help="each record's centred (and weighted) features rescaled on their own: to the median norm "
                         "('unit') or to at most it ('cap')")
    ap.add_argument("--bias", type=float, nargs="+", default=[1.0],
                    help="the constant input beside the features that the bias multiplies (the product's: 1); larger "
                         "gives the bias a larger share of each clipped gradient")
    ap.add_argument("--records", choices=("sites", "all"), default="sites",
                    help="training records: 'sites' (the hospitals' training splits, as the product trains; each "
                         "keeps its validation split back) or 'all' (every training image: the proxy before the "
                         "sixteenth pass, which read about 0.2–0.6 points above the product)")
    ap.add_argument("--rounds", type=int, nargs="+", default=[0],
                    help="rounds at the same ε, σ re-calibrated (0: the recipe's for the budget)")
    ap.add_argument("--lr-schedule", nargs="+", default=["constant"], choices=tuple(LR_SCHEDULES),
                    help="the server's lr over the rounds")
    ap.add_argument("--noise-factor", type=float, nargs="+", default=[1.0],
                    help="times the round's noise (below 1: what less noise would give; not a private setting)")
    ap.add_argument("--momentum", type=float, nargs="+", default=[0.9],
                    help="the server's momentum (the product's: 0.9); lr·σ is --k as given")
    ap.add_argument("--init", nargs="+", default=["zero"],
                    help="the head's start: 'zero', or 'ncm:ALPHA' (the nearest-class-mean rule from noisy per-class "
                         "feature sums of the centre's 10 rounds, times ALPHA)")
    ap.add_argument("--optimizer", nargs="+", default=["sgd"],
                    help="the server's step: 'sgd' (the product's), 'adam:LR', 'adambc:LR[:FLOOR]' (DP-AdamBC)")
    ap.add_argument("--smoothing", type=float, nargs="+", default=[0.0], help="label smoothing of the targets")
    ap.add_argument("--prior-bias", action="store_true",
                    help="the biases start at the log class frequencies (not private: an upper bound)")
    ap.add_argument("--ceiling", type=int, nargs="*", default=None,
                    help="only the non-private heads: linear, and one hidden layer of each of these sizes")
    ap.add_argument("--encoder", type=Path, default=None,
                    help="the default model's features with this procedural encoder (.npz) in place of the shipped one")
    ap.add_argument("--synthetic", type=int, default=2000, help="procedural images for the synthetic basis")
    ap.add_argument("--out", type=Path, default=Path("/tmp/pca_screen.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)

    from hemafed.core.learning.models import build_model, split_features
    from hemafed.core.learning.recipe import lr_times_sigma, recommended_plan

    xt, yt, xv, yv, xs, plan = _features(args.synthetic if "synthetic" in args.basis else 0, args.records,
                                             args.encoder)
    if args.ceiling is not None:
        for hidden in [0, *args.ceiling]:
            acc = ceiling(xt, yt, xv, yv, len(plan.classes), hidden)
            print(f"no privacy, {f'{hidden} hidden units' if hidden else 'linear'}: {100 * acc:.2f} %", flush=True)
        return
    mean = xt.mean(0)
    radius = split_features(build_model(plan.model, len(plan.classes)))[1].radius
    results = []
    settings = [("none", 0)] + [(b, d) for b in args.basis for d in args.dims if d]
    grid = itertools.product(settings, args.eps, args.k, args.centre, args.scale, args.norm, args.bias, args.rounds,
                             args.lr_schedule, args.noise_factor, args.smoothing, args.init, args.momentum,
                             args.optimizer)
    for (kind, dim), eps, k, scheme, scale, norm, bias, t, schedule, factor, smoothing, init, momentum, opt in grid:
        fed = recommended_plan(eps, len(yt), 10, **({"rounds": t} if t else {}))
        noise = round_noise(fed) * factor
        head = {"schedule": schedule, "smoothing": smoothing, "prior_bias": args.prior_bias, "momentum": momentum,
                "optimizer": opt}
        cn, share, rounds = _centre_scheme(scheme, args.share, fed.rounds)
        k = k or lr_times_sigma(fed.model, eps, fed.rounds)
        accs = []
        started = time.perf_counter()
        basis = _basis(kind, dim, xt, xs, 0)
        for seed in args.seeds:
            centre = noisy_centre(mean, cn, noise, fed, radius, seed)
            zt, zv = (xt - centre, xv - centre) if basis is None else ((xt - centre) @ basis, (xv - centre) @ basis)
            classes = len(plan.classes)
            if init.startswith("ncm:"):  # the class means ride as extra rows through the same transforms
                m = noisy_class_means(xt, yt, classes, noise, fed, radius, 10, seed) - centre
                zv = torch.cat([zv, m if basis is None else m @ basis])
            zt, zv = _rescale(scale, zt, zv, xt)
            zt, zv = _per_record(norm, zt, zv)
            start = None
            if init.startswith("ncm:"):
                zv, start = zv[:-classes], class_means_init(zv[-classes:], float(init[4:]))
            accs.append(_train(zt, yt, zv, yv, classes, fed.noise_multiplier, noise, fed.sample_rate,
                               rounds, k, seed, share, bias, init=start, **head))
        row = {"basis": kind, "dim": dim or xt.shape[1], "epsilon": eps, "rounds": fed.rounds, "k": k,
               "centre": scheme, "centre_noise": cn, "share": share, "gradient_rounds": rounds, "val": accs,
               "mean": float(np.mean(accs)), "std": float(np.std(accs)), "seconds": time.perf_counter() - started,
               "scale": scale, "norm": norm, "bias": bias, "records": args.records,
               "noise_factor": factor, "sigma": fed.noise_multiplier, "init": init, **head}
        results.append(row)
        print(f"{kind:9s} d={row['dim']:5d} ε={eps:g} T={fed.rounds} k={k:g} centre {scheme} "
              f"(error ×{cn:.2f}, share {share:.3f}, {rounds} gradient rounds): "
              f"scale {scale}, norm {norm}, bias input {bias:g}, lr {schedule}, noise ×{factor:g}, "
              f"smoothing {smoothing:g}{', prior bias' if args.prior_bias else ''}, init {init}, momentum "
              f"{momentum:g}, {opt}: "
              f"{100 * row['mean']:.2f} ± {100 * row['std']:.2f} %", flush=True)
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
