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
    python -m bench.accuracy.res64_screen encoders --encoders A.npz B.checkpoint.pt [--depths 4 0]  # quick probe
    python -m bench.accuracy.res64_screen cache-views --encoder A.npz --tag a  # the DP screen's cache with it
    python -m bench.accuracy.res64_screen cache-layers           # 64-px maps of the encoder's last two blocks
    python -m bench.accuracy.res64_screen dp-layers --eps 8 --lr 0.5  # DP screen: which block's maps
    python -m bench.accuracy.res64_screen dp-pca --eps 3 --lr 0.25     # an oracle projection's upper bound
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


def linear_probe(tx: torch.Tensor, ty: torch.Tensor, vx: torch.Tensor, vy: torch.Tensor,
                 epochs: int) -> tuple[float, float]:
    """(last, best) validation accuracy of a non-private linear head (seed 0) on features standardised by the
    training split's statistics."""
    mu, sd = tx.mean(0), tx.std(0) + 1e-6
    torch.manual_seed(0)
    return fit(torch.nn.Linear(tx.shape[1], 8), (tx - mu) / sd, ty, (vx - mu) / sd, vy, epochs)


def ceiling(epochs: int, orbit: bool = False) -> None:
    if orbit:
        tr, va = torch.load(OUT / "train_full_orbit.pt"), torch.load(OUT / "val_full_orbit.pt")
    else:
        tr, va = torch.load(OUT / "train.pt"), torch.load(OUT / "val.pt")
    for name, (needs, get) in COMBOS.items():
        if not all(key in tr for key in needs):  # 64-px scattering is cached for the quick probe only
            continue
        tx, vx = get(tr), get(va)
        last, best = linear_probe(tx, tr["y"], vx, va["y"], epochs)
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


def load_body(path: Path | None) -> torch.nn.Module | None:
    """An encoder for the 64-px maps: a pre-training's weights (.npz) or the encoder in its checkpoint (.pt);
    None: the shipped one."""
    from hemafed.core.learning.procedural_features import encoder_body, load_encoder

    if path is None or path.suffix == ".npz":
        return None if path is None else load_encoder(str(path))
    body = encoder_body()
    body.load_state_dict(torch.load(path, weights_only=True)["body"])
    return body.requires_grad_(False).to(memory_format=torch.channels_last).eval()


def encoders(paths: list[Path], n_train: int, epochs: int, depths: list[int | None] | None = None,
             look: str | None = None) -> None:
    """The quick probe (`cache`'s 6,000 training images, one view, non-private linear head, validation) of the 64-px
    encoder maps 4×4 made by each encoder, alone and beside the recipe's 28-px features (the shipped encoder's);
    `depths`: the maps after that many of the encoder's blocks (None: all 5; the product's 64-px model takes 4);
    `look`: the 64-px images first in this canonical look (the product's is "lamp-focus")."""
    from hemafed.core.data.appearance import canonical_look
    from hemafed.core.data.bloodmnist import load_splits, locate
    from hemafed.core.learning.models import _normalisation, build_model, images_to_tensor
    from hemafed.core.learning.procedural_features import procedural_features

    path28 = locate(None)
    s28, s64 = load_splits(path28), load_splits(path28.parent / "bloodmnist_64.npz")
    model = build_model("scatter_synth_inv_28")
    mean, std = _normalisation()
    data = {}
    for split in ("train", "val"):
        idx = _subset(s28[split].labels.reshape(-1), n_train) if split == "train" else slice(None)
        data[split] = (torch.as_tensor(s28[split].labels[idx].reshape(-1)).long(),
                       model.features(images_to_tensor(s28[split].images[idx], 28)).flatten(1).float(),
                       images_to_tensor(s64[split].images[idx], 64) * std + mean)
        if look:
            data[split] = (*data[split][:2], canonical_look(data[split][2], look))
    for path in [None, *paths]:
        body = load_body(path)
        for depth in depths or [None]:
            f64 = {split: procedural_features(x64, 256, 4, body=body, depth=depth).flatten(1).float()
                   for split, (_, _, x64) in data.items()}
            maps = f"64 px encoder 4×4 ({f'blocks 1–{depth}' if depth else 'all blocks'})"
            for label, (tx, vx) in ((maps, (f64["train"], f64["val"])),
                                    (f"28 px + {maps}", (torch.cat([data["train"][1], f64["train"]], 1),
                                                         torch.cat([data["val"][1], f64["val"]], 1)))):
                last, best = linear_probe(tx, data["train"][0], vx, data["val"][0], epochs)
                print(f"| {path or 'shipped encoder'} | {label} | {last:.2%} | {best:.2%} |", flush=True)


def cache_views(encoder: Path | None = None, tag: str = "") -> None:
    """Every training and validation image's 28-px recipe features (8-view average) and the 64-px encoder's 4×4 maps
    of each of the 8 views separately (`encoder`: another encoder for the 64-px maps, cached under `tag`)."""
    from hemafed.core.data.bloodmnist import load_splits, locate
    from hemafed.core.learning.features import dihedral
    from hemafed.core.learning.models import _normalisation, build_model, images_to_tensor
    from hemafed.core.learning.procedural_features import procedural_features

    path28 = locate(None)
    s28, s64 = load_splits(path28), load_splits(path28.parent / "bloodmnist_64.npz")
    model = build_model("scatter_synth_inv_28")
    mean, std = _normalisation()
    body = load_body(encoder)
    OUT.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        t = time.perf_counter()
        x28 = images_to_tensor(s28[split].images, 28)
        plain64 = images_to_tensor(s64[split].images, 64) * std + mean
        out = {"y": torch.as_tensor(s28[split].labels.reshape(-1)).long(),
               "f28": model.eval_features(x28).flatten(1).float(),
               "views": torch.stack([procedural_features(dihedral(plain64, k), 256, 4, body=body).flatten(1).float()
                                     for k in range(8)])}
        torch.save(out, OUT / f"{split}_views{tag}.pt")
        print(f"{split}: {len(out['y'])} images in {time.perf_counter() - t:.0f} s", flush=True)


def dp_views(eps: float, lr: float, rounds: int, seeds: list[int], tag: str = "",
             only: tuple[str, ...] = ()) -> None:
    """`dp`'s screen (8-view 28-px features beside the 64-px maps) with the 64-px maps averaged over FINE_VIEWS
    (`only`: those named), from `cache_views`' cache under `tag`."""

    tr, va = torch.load(OUT / f"train_views{tag}.pt"), torch.load(OUT / f"val_views{tag}.pt")
    for name, views in FINE_VIEWS.items():
        if only and name not in only:
            continue
        tx = torch.cat([tr["f28"], tr["views"][list(views)].mean(0)], 1)
        vx = torch.cat([va["f28"], va["views"][list(views)].mean(0)], 1)
        print(f"| {tag or 'shipped'}: 28 px (8 views) + 64 px encoder 4×4, {name} | {eps:g} | {lr:g} | "
              f"{_centred_dp(tx, tr['y'], vx, va['y'], eps, lr, rounds, seeds)} |", flush=True)


def _centred_dp(tx: torch.Tensor, ty: torch.Tensor, vx: torch.Tensor, vy: torch.Tensor, eps: float, lr: float,
                rounds: int, seeds: list[int]) -> str:
    """`private_fit` on features centred by their training mean: "mean ± std | seeds | seconds per seed"."""
    from bench.accuracy.head_ceiling import private_fit

    centre = tx.mean(0)
    t = time.perf_counter()
    singles, _ = private_fit(tx - centre, ty, vx - centre, vy, [], eps, lr, rounds, seeds)
    return (f"{np.mean(singles):.2%} ± {np.std(singles):.2%} | {len(seeds)} | "
            f"{(time.perf_counter() - t) / len(seeds):.0f} s")


def _block_maps(body: torch.nn.Module, x: torch.Tensor, blocks: tuple[int, ...], pool: int = 4,
                batch_size: int = 256) -> dict[int, torch.Tensor]:
    """The encoder's maps after each of `blocks` (0-based) for [0, 1] images, pooled and GroupNorm'd per image as
    `procedural_features` does the last block's."""
    from hemafed.core.learning.procedural_features import GROUPS, standardise

    out: dict[int, list[torch.Tensor]] = {b: [] for b in blocks}
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            h = standardise(x[i:i + batch_size]).contiguous(memory_format=torch.channels_last)
            for j, layer in enumerate(body):
                h = layer(h)
                if j in out:
                    out[j].append(F.group_norm(F.adaptive_avg_pool2d(h, pool), GROUPS).flatten(1).float())
    return {b: torch.cat(parts) for b, parts in out.items()}


def cache_layers() -> None:
    """Every training and validation image's 28-px recipe features (8-view average) and the shipped encoder's 64-px
    maps after its 4th and 5th (last) blocks, pooled 4×4, averaged over the 4 rotations (eighth pass)."""
    from hemafed.core.data.bloodmnist import load_splits, locate
    from hemafed.core.learning.features import dihedral
    from hemafed.core.learning.models import _normalisation, build_model, images_to_tensor
    from hemafed.core.learning.procedural_features import load_encoder

    path28 = locate(None)
    s28, s64 = load_splits(path28), load_splits(path28.parent / "bloodmnist_64.npz")
    model = build_model("scatter_synth_inv_28")
    mean, std = _normalisation()
    body = load_encoder()
    OUT.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        t = time.perf_counter()
        plain64 = images_to_tensor(s64[split].images, 64) * std + mean
        maps = [_block_maps(body, dihedral(plain64, k), (3, 4)) for k in range(4)]
        out = {"y": torch.as_tensor(s28[split].labels.reshape(-1)).long(),
               "f28": model.eval_features(images_to_tensor(s28[split].images, 28)).flatten(1).float(),
               "b3": sum(m[3] for m in maps) / 4, "b4": sum(m[4] for m in maps) / 4}
        torch.save(out, OUT / f"{split}_layers.pt")
        print(f"{split}: {len(out['y'])} images in {time.perf_counter() - t:.0f} s", flush=True)


LAYER_COMBOS = {"last block (scatter_synth_inv_cc_ms4_64)": ("b4",), "4th block": ("b3",),
                "4th and last blocks": ("b3", "b4")}


def dp_layers(eps: float, lr: float, rounds: int, seeds: list[int]) -> None:
    """`dp`'s screen on `cache_layers`' features: the 28-px features beside each choice of 64-px maps."""

    tr, va = torch.load(OUT / "train_layers.pt"), torch.load(OUT / "val_layers.pt")
    for name, keys in LAYER_COMBOS.items():
        tx = torch.cat([tr["f28"], *(tr[k] for k in keys)], 1)
        vx = torch.cat([va["f28"], *(va[k] for k in keys)], 1)
        print(f"| 28 px (8 views) + 64 px {name}, 4 rotations | {tx.shape[1]} | {eps:g} | {lr:g} | "
              f"{_centred_dp(tx, tr['y'], vx, va['y'], eps, lr, rounds, seeds)} |", flush=True)


def dp_pca(eps: float, lr: float, rounds: int, seeds: list[int], ks: list[int]) -> None:
    """`dp_layers`' 4th-block features projected onto their top k principal directions, computed from the training
    features themselves: not private, an upper bound on what a projection could give the DP head."""
    from bench.accuracy.head_ceiling import private_fit

    tr, va = torch.load(OUT / "train_layers.pt"), torch.load(OUT / "val_layers.pt")
    tx, vx = torch.cat([tr["f28"], tr["b3"]], 1), torch.cat([va["f28"], va["b3"]], 1)
    centre = tx.mean(0)
    tx, vx = tx - centre, vx - centre
    directions = torch.pca_lowrank(tx, q=max(ks), center=False)[2]
    for k in ks:
        a, b = (tx, vx) if k >= tx.shape[1] else (tx @ directions[:, :k], vx @ directions[:, :k])
        singles, _ = private_fit(a, tr["y"], b, va["y"], [], eps, lr, rounds, seeds)
        print(f"| {min(k, tx.shape[1])} | {eps:g} | {lr:g} | {np.mean(singles):.2%} ± {np.std(singles):.2%} |",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("step", choices=("cache", "ceiling", "cache-full", "dp", "cache-views", "dp-views", "encoders",
                                     "cache-layers", "dp-layers", "dp-pca"))
    ap.add_argument("--ks", type=int, nargs="+", default=[4747, 1024, 256], help="dp-pca: projection sizes")
    ap.add_argument("--encoders", type=Path, nargs="+", default=[], help="encoder weights (.npz) or checkpoints (.pt)")
    ap.add_argument("--depths", type=int, nargs="+", default=[0],
                    help="encoders: the 64-px maps after this many blocks (0: all 5)")
    ap.add_argument("--look", default=None, help="encoders: the 64-px images in this canonical look (lamp-focus)")
    ap.add_argument("--encoder", type=Path, default=None, help="cache-views: the encoder for the 64-px maps")
    ap.add_argument("--tag", default="", help="cache-views / dp-views: the cache's name suffix")
    ap.add_argument("--views", nargs="+", default=[], help="dp-views: only these FINE_VIEWS entries")
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
        cache_views(args.encoder, args.tag)
    elif args.step == "dp-views":
        dp_views(args.eps, args.lr, args.rounds, args.seeds, args.tag, tuple(args.views))
    elif args.step == "cache-layers":
        cache_layers()
    elif args.step == "dp-layers":
        dp_layers(args.eps, args.lr, args.rounds, args.seeds)
    elif args.step == "dp-pca":
        dp_pca(args.eps, args.lr, args.rounds, args.seeds, args.ks)
    elif args.step == "encoders":
        encoders(args.encoders, args.train, args.epochs, [d or None for d in args.depths], args.look)
    else:
        dp(args.eps, args.lr, args.rounds, args.seeds, args.orbit)


if __name__ == "__main__":
    main()
