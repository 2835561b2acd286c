"""Does per-site appearance augmentation undo the loss from hospitals that look different? (research script, #18)

The simulation's shift (`hemafed simulate --appearance shifted`: each hospital's training images in its own stain,
lamp, focus and magnification, `core.data.appearance`) cost 3.5 points on the untouched test split. A remedy at no
privacy cost: each site replaces every training record's features by their average over the image as it is and K
copies in random looks drawn from the same documented `LOOK_RANGE` (a fixed function of that one image with the
site's own randomness, so a record's sensitivity is unchanged — as the 8-view average). This screen measures it
before building it: the recipe's 28-px features (one view, for speed), central Poisson DP-SGD on the linear head
with the default plan's noise (`bench.accuracy.head_ceiling.private_fit`, ε = 8, lr 0.5, training-mean centring),
evaluated on BloodMNIST's untouched validation split. Seed 0's partition and looks.

    python -m bench.accuracy.appearance_screen [--k 4] [--seeds 0 1]
    python -m bench.accuracy.appearance_screen --components          # which part of a look costs most
    python -m bench.accuracy.appearance_screen --low-pass 0 0.5 0.8  # a fixed blur on every image first
    python -m bench.accuracy.appearance_screen --low-pass 0.5 --stain background --encoder W --nuisance 0 16 64
        # features with the directions random looks move them most along (on public images) projected out
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def multiplicity_fit(copies: torch.Tensor, y: torch.Tensor, vx: torch.Tensor, vy: torch.Tensor, eps: float, lr: float,
                     rounds: int, seeds: list[int]) -> list[float]:
    """`private_fit` with augmentation multiplicity (De et al. 2022): a record's gradient is the mean of its
    (K+1, N, D) `copies`' gradients, clipped to C = 1 as one record, so its sensitivity is unchanged."""
    from hemafed.core.learning.fedsgd import FedSGDServer
    from hemafed.core.privacy.calibration import calibrate_sigma

    q, classes = 0.1713, 8
    sigma = calibrate_sigma(eps, 1e-5, q, rounds)
    n, d = copies.shape[1], copies.shape[2]
    onehot = torch.nn.functional.one_hot(y, classes).float()
    out = []
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        rng = np.random.default_rng(seed)
        server = FedSGDServer(lr, 0.9)
        w = np.zeros(classes * d + classes, np.float32)
        for _ in range(rounds):
            idx = torch.nonzero(torch.rand(n, generator=gen) < q).squeeze(1)
            weight = torch.from_numpy(w[:classes * d].reshape(classes, d))
            bias = torch.from_numpy(w[classes * d:])
            x = copies[:, idx]
            g = torch.softmax(x @ weight.T + bias, -1) - onehot[idx]  # (K+1, B, classes)
            gw = torch.einsum("kbc,kbd->bcd", g, x) / len(copies)
            gb = g.mean(0)
            norms = (gw.pow(2).sum((1, 2)) + gb.pow(2).sum(1)).sqrt()
            scale = (1.0 / norms.clamp_min(1e-12)).clamp(max=1.0)
            total = torch.cat([(gw * scale[:, None, None]).sum(0).flatten(), (gb * scale[:, None]).sum(0)])
            noisy = total.double().numpy() + rng.normal(0, sigma * np.sqrt(2), size=total.shape)
            w = server.apply(w, noisy, q * n).astype(np.float32)
        weight = torch.from_numpy(w[:classes * d].reshape(classes, d))
        out.append(float(((vx @ weight.T + torch.from_numpy(w[classes * d:])).argmax(1) == vy).float().mean()))
    return out


def lamp_window(x: torch.Tensor, headroom: float = 1.15) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1]: one lamp factor per image (its background against the public reference, over the
    channels saturated in neither), divided out, then every image clipped at 1/`headroom` of full scale and stretched
    back, so that any lamp within that factor of the reference gives the same image (screened, not kept)."""
    from hemafed.core.data.appearance import REFERENCE_BACKGROUND

    background = torch.quantile(x.flatten(2), 0.95, dim=2)  # (B, 3): the brightest 5 % of pixels
    reference = torch.exp(-torch.as_tensor(REFERENCE_BACKGROUND, dtype=x.dtype))
    usable = (background < 250 / 255) & (reference < 250 / 255)
    ratio = torch.where(usable, background / reference, torch.zeros_like(background))
    lamp = (ratio.sum(1) / usable.sum(1).clamp_min(1)).where(usable.any(1), torch.ones_like(ratio[:, 0]))
    window = 1.0 / headroom
    return ((x / lamp.clamp(0.5, 2.0)[:, None, None, None]).clamp(max=window) / window).clamp(0.0, 1.0)


def zoom(x: torch.Tensor, factor: float) -> torch.Tensor:
    """(B, C, H, W) magnified by `factor` about the centre, same size (edges continued outwards when < 1)."""
    if factor == 1.0:
        return x
    h = x.shape[-1]
    side = max(2, round(h * factor))
    y = torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    if side >= h:
        off = (side - h) // 2
        return y[..., off:off + h, off:off + h]
    lo = (h - side) // 2
    return torch.nn.functional.pad(y, (lo, h - side - lo, lo, h - side - lo), mode="replicate")


def nuisance_directions(features, images: np.ndarray, k: int, seed: int = 0) -> torch.Tensor:
    """(D, D) eigenvectors, largest first, of the within-image scatter of `features` over each of `images` (public
    ones: no hospital record goes in) and `k` copies of it in random looks from `LOOK_RANGE`: the directions in which
    a change of look moves the features most (nuisance attribute projection, as in speaker verification)."""
    from hemafed.core.data.appearance import HospitalLook, apply_look

    rng = np.random.default_rng([seed, 0x9A9])
    views = [features(images)]
    for _ in range(k):
        views.append(features(np.concatenate([apply_look(images[i:i + 1], HospitalLook.draw(rng))
                                              for i in range(len(images))])))
    stack = torch.stack(views).double()  # (k + 1, N, D)
    delta = (stack - stack.mean(0)).flatten(0, 1)
    _, vectors = torch.linalg.eigh(delta.T @ delta)
    return vectors.flip(1).float()


def project_out(x: torch.Tensor, directions: torch.Tensor, r: int) -> torch.Tensor:
    """`x` with its components along the first `r` columns of `directions` removed."""
    if r == 0:
        return x
    u = directions[:, :r]
    return x - (x @ u) @ u.T


def main() -> None:
    from bench.accuracy.head_ceiling import private_fit
    from hemafed.core.data.appearance import HospitalLook, apply_look, low_pass, normalise_stain
    from hemafed.core.data.bloodmnist import load_splits, locate
    from hemafed.core.learning.models import _normalisation, build_model, images_to_tensor
    from hemafed.network.sim.simulate import SimulationOptions, hospitals

    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=4, help="random looks per image besides the image itself")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--multiplicity", action="store_true",
                    help="average each record's gradients over its copies instead of its features")
    ap.add_argument("--components", action="store_true",
                    help="train on each hospital's look with only one of its components kept")
    ap.add_argument("--low-pass", type=float, nargs="+", metavar="SIGMA",
                    help="a fixed Gaussian blur (σ in pixels at 28 px) on every image, training and validation, "
                         "before its features; rows with and without the shift")
    ap.add_argument("--stain", choices=("none", "background", "full", "lamp-window"), default="none",
                    help="with --low-pass: map every image's background (lamp) or background and stain densities "
                         "to the public reference first (core.data.appearance.normalise_stain), or divide out one "
                         "lamp factor and clip to a fixed window (lamp_window)")
    ap.add_argument("--zooms", type=float, nargs="+", default=[1.0],
                    help="features averaged over the image magnified by each of these (about its centre)")
    ap.add_argument("--partition", default="dirichlet:0.5", help="how the hospitals' images are divided (iid: alike)")
    ap.add_argument("--scatter-input", choices=("rgb", "od", "hed"), default="rgb",
                    help="what the scattering half sees: the normalised RGB intensities (the product), their optical "
                         "densities, or the densities unmixed into haematoxylin, eosin and residual (a stain "
                         "strength is then a per-channel scale, which the per-group GroupNorm removes)")
    ap.add_argument("--sim-seed", type=int, default=0, help="the simulation seed that draws the partition and looks")
    ap.add_argument("--encoder", help="another procedural encoder's weights (.npz) instead of the shipped one")
    ap.add_argument("--nuisance", type=int, nargs="+", metavar="R",
                    help="with --low-pass: project out the R directions random looks move the features most along "
                         "(estimated on --nuisance-source images, each in --nuisance-k random looks)")
    ap.add_argument("--nuisance-source", choices=("pbc", "synthetic"), default="pbc",
                    help="public PBC sample cells, or dead-leaves scenes (no real image)")
    ap.add_argument("--nuisance-k", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = build_model("scatter_synth_inv_28")
    model.encoder = args.encoder
    preprocess = [lambda t: t]
    mean, std = _normalisation()

    def canonical(sigma: float):
        """The preprocessing of --stain and a low-pass of `sigma` (pixels at 28 px), on normalised tensors."""
        def apply(t: torch.Tensor) -> torch.Tensor:
            plain = t * std + mean
            if args.stain == "lamp-window":
                plain = lamp_window(plain)
            elif args.stain != "none":
                plain = normalise_stain(plain, stains=args.stain == "full")
            if sigma > 0:
                plain = low_pass(plain, sigma)
            return (plain - mean) / std
        return apply

    def tag(sigma: float) -> str:
        space = "" if args.scatter_input == "rgb" else f", scattering on {args.scatter_input}"
        return f"low-pass σ = {sigma}{space}" + {"none": "", "background": ", background-normalised",
                                          "full": ", stain-normalised",
                                          "lamp-window": ", lamp window"}[args.stain]

    def density_features(x: torch.Tensor) -> torch.Tensor:
        """`model.features` with the scattering half on optical densities (--scatter-input od / hed)."""
        from hemafed.core.data.appearance import stain_densities
        from hemafed.core.learning.features import scatter_features
        from hemafed.core.learning.procedural_features import load_encoder, procedural_features

        plain = x * std + mean
        od = stain_densities(plain) if args.scatter_input == "hed" else -torch.log(plain.clamp(1 / 255, 1.0))
        scat = torch.nn.functional.group_norm(scatter_features(od, model.scattering), model.groups)
        scat = torch.nn.functional.adaptive_avg_pool2d(scat, model.pool).flatten(1)
        learned = procedural_features(plain, 256, model.learned_pool, body=load_encoder(model.encoder))
        return torch.cat([scat, learned.flatten(1)], 1)

    def one_view(x: torch.Tensor) -> torch.Tensor:
        return model.features(x).flatten(1).float() if args.scatter_input == "rgb" else density_features(x).float()

    def features(images: np.ndarray) -> torch.Tensor:
        x = preprocess[0](images_to_tensor(images, 28))
        return sum(one_view(zoom(x, z)) for z in args.zooms) / len(args.zooms)

    val = load_splits(locate(None))["val"]
    vx, vy = features(val.images), torch.as_tensor(val.labels.reshape(-1)).long()
    same = hospitals(SimulationOptions(seed=args.sim_seed, partition=args.partition))
    shifted = hospitals(SimulationOptions(seed=args.sim_seed, appearance="shifted", partition=args.partition))
    labels = torch.as_tensor(same.train.labels.reshape(-1)).long()

    def random_looks(images: np.ndarray, parts, k: int):
        """k copies of the training images, each image in a random look of its own (drawn site by site)."""
        rng = np.random.default_rng([0, 0xA06])
        for _ in range(k):
            copy = images.copy()
            for idx in parts:
                for i in idx:
                    copy[i] = apply_look(images[i:i + 1], HospitalLook.draw(rng))[0]
            yield copy

    def augmented(images: np.ndarray, parts, k: int) -> torch.Tensor:
        return sum((features(c) for c in random_looks(images, parts, k)), features(images)) / (k + 1)

    rows = []

    def row(name: str, tx: torch.Tensor, vx: torch.Tensor) -> float:
        centre = tx.mean(0)
        acc, _ = private_fit(tx - centre, labels, vx - centre, vy, [], 8.0, 0.5, 500, args.seeds)
        rows.append(f"| {name} | {np.mean(acc):.2%} ± {np.std(acc):.2%} | {len(args.seeds)} |")
        print(rows[-1], flush=True)
        return float(np.mean(acc))

    if args.components:
        from dataclasses import fields, replace

        from hemafed.core.data.appearance import hospital_looks

        preprocess[0] = canonical((args.low_pass or [0.0])[0])
        vx = features(val.images)
        print(f"  every image: {tag((args.low_pass or [0.0])[0])}", flush=True)
        looks = hospital_looks(len(same.parts), args.sim_seed)
        kept = {"stain": ("haematoxylin", "eosin", "tint_h", "tint_e"), "brightness": ("brightness",),
                "blur": ("blur",), "zoom": ("zoom",)}
        row("all hospitals look alike", features(same.train.images), vx)
        for part, names in kept.items():
            images = same.train.images.copy()
            for idx, look in zip(same.parts, looks, strict=True):
                only = replace(HospitalLook(), **{f.name: getattr(look, f.name) for f in fields(look)
                                                  if f.name in names})
                images[idx] = apply_look(same.train.images[idx], only)
            row(f"each hospital its own {part} only", features(images), vx)
        return
    if args.low_pass is not None and args.nuisance:
        from hemafed.core.data.appearance import public_sample
        from hemafed.core.learning.procedural_features import dead_leaves

        sigma = args.low_pass[0]
        preprocess[0] = canonical(sigma)
        if args.nuisance_source == "pbc":
            source = public_sample(locate(None).parent.parent / "pbc_sample")
        else:
            scenes = dead_leaves(400, torch.Generator().manual_seed(0))
            source = (scenes.clamp(0, 1).permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
        t = time.perf_counter()
        directions = nuisance_directions(features, source, args.nuisance_k)
        print(f"  nuisance directions from {len(source)} {args.nuisance_source} images × {args.nuisance_k + 1} "
              f"looks: {time.perf_counter() - t:.0f} s", flush=True)
        v, alike_x, own_x = features(val.images), features(same.train.images), features(shifted.train.images)
        for r in args.nuisance:
            name = f"{tag(sigma)}, {r} nuisance directions ({args.nuisance_source}) out"
            alike = row(f"alike, {name}", project_out(alike_x, directions, r), project_out(v, directions, r))
            own = row(f"each its own look, {name}", project_out(own_x, directions, r), project_out(v, directions, r))
            print(f"  loss from the shift, {name}: {100 * (alike - own):+.2f} points", flush=True)
        return
    if args.low_pass is not None:
        for sigma in args.low_pass:
            preprocess[0] = canonical(sigma)
            v = features(val.images)
            alike = row(f"alike, {tag(sigma)}", features(same.train.images), v)
            own = row(f"each its own look, {tag(sigma)}", features(shifted.train.images), v)
            print(f"  loss from the shift, {tag(sigma)}: {100 * (alike - own):+.2f} points", flush=True)
        return
    if args.multiplicity:
        for name, data in (("each its own look", shifted), ("alike", same)):
            copies = torch.stack([features(data.train.images)]
                                 + [features(c) for c in random_looks(data.train.images, data.parts, args.k)])
            centre = copies.mean((0, 1))
            acc = multiplicity_fit(copies - centre, labels, vx - centre, vy, 8.0, 0.5, 500, args.seeds)
            rows.append(f"| {name}, augmentation multiplicity (image + {args.k} random looks, gradients averaged) "
                        f"| {np.mean(acc):.2%} ± {np.std(acc):.2%} | {len(args.seeds)} | – |")
            print(rows[-1], flush=True)
        return
    for name, get in (
        ("all hospitals look alike", lambda: features(same.train.images)),
        ("each hospital its own look", lambda: features(shifted.train.images)),
        (f"each its own look + {args.k} random looks per image, averaged",
         lambda: augmented(shifted.train.images, shifted.parts, args.k)),
        (f"alike + {args.k} random looks per image, averaged",
         lambda: augmented(same.train.images, same.parts, args.k)),
    ):
        t = time.perf_counter()
        tx = get()
        prepared = time.perf_counter() - t
        centre = tx.mean(0)
        acc, _ = private_fit(tx - centre, labels, vx - centre, vy, [], 8.0, 0.5, 500, args.seeds)
        rows.append(f"| {name} | {np.mean(acc):.2%} ± {np.std(acc):.2%} | {len(args.seeds)} | {prepared:.0f} s |")
        print(rows[-1], flush=True)


if __name__ == "__main__":
    main()
