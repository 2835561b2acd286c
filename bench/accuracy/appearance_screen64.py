"""A canonical lamp and focus for the 64-px model? (research script, issue 18)

`scatter_synth_inv_cc_ms4p_looks_hed_64` sees every image as it comes, and with each hospital in its own look it lost
5.9 points in the federation (the 28-px default, which maps each image's background to the public reference and
blurs it by σ = 0.5 px first, 3.0; docs/appearance-remedies.md). This screen asks which canonical look to give each
of its two halves: the 28-px half (scattering of the stain densities beside the procedural encoder) and the 64-px
half (the encoder's maps of the full image, where a blur would also remove the detail that half is there for).

Features in one view (for speed; the product averages 8 and 4), seed `--sim-seed`'s partition and hospital looks
(`hemafed simulate --appearance shifted`), central Poisson DP-SGD on the centred linear head
(`bench.accuracy.head_ceiling.private_fit`: ε = 8, lr 0.5, 500 steps), evaluated on the untouched 64-px validation
split; noise seeds 0 and 1. Every mapping is a fixed function of one image with public constants: no privacy cost.

    python -m bench.accuracy.appearance_screen64 [--sim-seed 0] [--fine none background 0.5 1.14]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

MODEL = "scatter_synth_inv_cc_ms4p_looks_hed_64"


def main() -> None:
    from bench.accuracy.head_ceiling import private_fit
    from hemafed.core.data.appearance import low_pass, normalise_stain
    from hemafed.core.data.bloodmnist import load_splits, locate
    from hemafed.core.learning.models import ScatterSynthNet, _normalisation, build_model, images_to_tensor
    from hemafed.network.sim.simulate import SimulationOptions, hospitals

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sim-seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--coarse", nargs="+", default=["none", "lamp-focus"],
                    help="the 28-px half's canonical look: none, or lamp-focus (the 28-px default's)")
    ap.add_argument("--fine", nargs="+", default=["none", "background", "0.5", "1.14"],
                    help="the 64-px half's: none, background (the lamp and light tint only), or that and a "
                         "Gaussian low-pass of this σ in pixels at 64 px (1.14 = the 28-px default's 0.5 px); "
                         "stain, stain-SIGMA: the stain densities mapped too (normalise_stain)")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/appearance64"), help="features kept between runs")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    model = build_model(MODEL)
    mean, std = _normalisation()

    val = load_splits(locate(None, size=64))["val"]
    sets = {"val": val.images}
    for appearance in ("same", "shifted"):
        train = hospitals(SimulationOptions(seed=args.sim_seed, appearance=appearance, model=MODEL)).train
        sets[appearance] = train.images
    labels = torch.as_tensor(train.labels.reshape(-1)).long()  # the same images in both: only their look differs
    vy = torch.as_tensor(val.labels.reshape(-1)).long()

    def cached(name: str, compute) -> torch.Tensor:
        path = args.cache / f"{name}.pt"
        if path.exists():
            return torch.load(path)
        t = time.perf_counter()
        out = compute()
        torch.save(out, path)
        print(f"  {name}: {time.perf_counter() - t:.0f} s", flush=True)
        return out

    def coarse(images: np.ndarray, look: str) -> torch.Tensor:
        model.look = None if look == "none" else look
        x = images_to_tensor(images, 64)
        return torch.cat([ScatterSynthNet.features(model, model._coarse(x[i:i + 512])).float()
                          for i in range(0, len(x), 512)])

    def fine(images: np.ndarray, how: str) -> torch.Tensor:
        model.look = None  # the mapping is this screen's own, below (the model's would apply it a second time)
        out = []
        for i in range(0, len(images), 512):
            plain = images_to_tensor(images[i:i + 512], 64) * std + mean
            if how != "none":
                plain = normalise_stain(plain, stains=how.startswith("stain"))
            if how not in ("none", "background", "stain"):
                plain = low_pass(plain, float(how.removeprefix("stain-")))
            out.append(model._fine((plain - mean) / std, 256).float())
        return torch.cat(out)

    tag = f"s{args.sim_seed}"
    print(f"| 28-px half | 64-px half | all alike | each its own look | loss | sim seed {args.sim_seed} |", flush=True)
    for c in args.coarse:
        cx = {k: cached(f"coarse-{c}-{k if k == 'val' else k + tag}", lambda k=k, c=c: coarse(sets[k], c))
              for k in sets}
        for f in args.fine:
            fx = {k: cached(f"fine-{f}-{k if k == 'val' else k + tag}", lambda k=k, f=f: fine(sets[k], f))
                  for k in sets}
            acc = {}
            for k in ("same", "shifted"):
                tx, vx = torch.cat([cx[k], fx[k]], 1), torch.cat([cx["val"], fx["val"]], 1)
                centre = tx.mean(0)
                acc[k], _ = private_fit(tx - centre, labels, vx - centre, vy, [], 8.0, 0.5, 500, args.seeds)
            loss = 100 * (np.mean(acc["same"]) - np.mean(acc["shifted"]))
            print(f"| {c} | {f} | {np.mean(acc['same']):.2%} ± {np.std(acc['same']):.2%} | "
                  f"{np.mean(acc['shifted']):.2%} ± {np.std(acc['shifted']):.2%} | {loss:.2f} |", flush=True)


if __name__ == "__main__":
    main()
