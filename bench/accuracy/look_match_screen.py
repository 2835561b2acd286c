"""Screen: render a deploying hospital's images in the federation's average look before classifying them (research
script, issue 18).

`look_sensitivity` showed that a federation trained on hospitals in their own looks answers best in their average
look (simulation seed 1: 93.0 % of untouched validation images, 95.8 % with haematoxylin at 0.7, 96.5 % with a blur
of 0.4 px), and that the untouched look lies at an edge of the range (every hospital's focus is softer). The
federation already knows its average look in part: the cell check's DP mean of 12 image measurements (stain in the
centre and rings, edge strength, spatial-frequency energy; `core.learning.cell_check`), released with the model at
no privacy cost of its own. A deploying hospital can search, on its own unlabelled images, for the look `T` (a
haematoxylin factor, an eosin factor, a blur, in `apply_look`'s terms) under which their mean measurements come
closest to the federation's mean, and render every image in `T` before classifying it. Nothing is sent; no label is
needed.

The six `hemafed simulate` runs of bench.appearance: the deploying hospital holds the first n of one half of the
untouched validation split (seed 7's order, as bias_refit_screen), unlabelled; the other half is judged. Validation
only. "oracle" is the best judged accuracy over the grid (an upper bound, not a method).

    python -m bench.accuracy.look_match_screen results/appear-cells/{same,shifted}-s{0,1,2} --fit-images 100 250 856
    python -m bench.accuracy.look_match_screen --sites results/appear-cells/shifted-s{0,1,2}   # each site's own
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.accuracy.look_sensitivity import default_model, final_weights
from hemafed.core.data.appearance import HospitalLook, apply_look
from hemafed.core.learning.cell_check import CellStats, standardised
from hemafed.core.learning.models import set_flat_params
from hemafed.core.learning.site_trainer import model_inputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--fit-images", type=int, nargs="+", default=[100, 250, 856])
    ap.add_argument("--haematoxylin", type=float, nargs="+", default=[0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3])
    ap.add_argument("--eosin", type=float, nargs="+", default=[1.0])
    ap.add_argument("--blur", type=float, nargs="+", default=[0.0, 0.2, 0.4, 0.6, 0.8])
    ap.add_argument("--zoom", type=float, nargs="+", default=[1.0])
    ap.add_argument("--brightness", type=float, nargs="+", default=[1.0])
    ap.add_argument("--no-oracle", action="store_true", help="skip the oracle (features of every look on the grid)")
    ap.add_argument("--metric", choices=("mahalanobis", "euclidean"), default="mahalanobis")
    ap.add_argument("--penalty", type=float, default=0.0,
                    help="choose by n·distance + PENALTY·log(n)·(components changed) (1: BIC) instead of distance")
    args = ap.parse_args()
    torch.set_num_threads(2)
    plan, model, head, val = default_model()
    yv = np.asarray(val.labels).reshape(-1)
    order = torch.randperm(len(yv), generator=torch.Generator().manual_seed(7)).numpy()
    own, judged = order[: len(yv) // 2], order[len(yv) // 2:]
    grid = [HospitalLook(haematoxylin=h, eosin=e, blur=b, zoom=z, brightness=lamp) for h, e, b, z, lamp in
            itertools.product(args.haematoxylin, args.eosin, args.blur, args.zoom, args.brightness)]
    started = time.perf_counter()
    own_z = [standardised(apply_look(val.images[own[:max(args.fit_images)]], t)) for t in grid]
    print(f"measurements under {len(grid)} looks: {time.perf_counter() - started:.0f} s", flush=True)
    weights = {run: final_weights(run) for run in args.runs}
    stats = {}
    for run, w in weights.items():
        set_flat_params(head, w)
        stats[run] = CellStats.from_moments(head.cell_moments.detach().double().numpy())
    judged_f: dict[int, torch.Tensor] = {}

    def features(i: int) -> torch.Tensor:
        if i not in judged_f:
            judged_f[i] = model_inputs(plan, model, apply_look(val.images[judged], grid[i]), "eval")
        return judged_f[i]

    def accuracy(run: Path, i: int) -> float:
        set_flat_params(head, weights[run])
        with torch.no_grad():
            return float((head(features(i)).argmax(1).numpy() == yv[judged]).mean())

    identity = next(i for i, t in enumerate(grid) if t == HospitalLook())
    print("| run | untouched | " + " | ".join(f"matched on {n} (look)" for n in args.fit_images) + " | oracle (look) |")
    print("|---|---:|" + "---:|" * (len(args.fit_images) + 1))
    for run in args.runs:
        s = stats[run]
        metric = s.precision if args.metric == "mahalanobis" else np.eye(len(s.mean))
        cells = [f"{accuracy(run, identity):.2%}"]
        for n in args.fit_images:
            gaps = [float((z[:n].mean(0) - s.mean) @ metric @ (z[:n].mean(0) - s.mean))
                    + args.penalty * np.log(n) / n * _changed(t) for z, t in zip(own_z, grid, strict=True)]
            best = int(np.argmin(gaps))
            t = grid[best]
            cells.append(f"{accuracy(run, best):.2%} ({_named(t)})")
        if args.no_oracle:
            cells.append("–")
        else:
            accs = [accuracy(run, i) for i in range(len(grid))]
            cells.append(f"{max(accs):.2%} ({_named(grid[int(np.argmax(accs))])})")
        print(f"| {run.name} | " + " | ".join(cells) + " |", flush=True)


def _changed(t: HospitalLook) -> int:
    return sum(a != b for a, b in zip(dataclasses.astuple(t), dataclasses.astuple(HospitalLook()), strict=True))


def _named(t: HospitalLook) -> str:
    return (f"H {t.haematoxylin:g}, E {t.eosin:g}, blur {t.blur:g}"
            + (f", zoom {t.zoom:g}" if t.zoom != 1 else "") + (f", lamp {t.brightness:g}" if t.brightness != 1 else ""))


def sites() -> None:
    """`--sites`: would each participating hospital gain from its own look match when the federation ends? Each of
    the shifted runs' hospitals matches on its own validation split (in its look; at least `MIN_IMAGES`), and 600
    images of BloodMNIST's validation split shown in its look are judged with the federation's final weights, as
    they come and in the matched look. Validation only."""
    from hemafed.core.learning.look_match import MIN_IMAGES, match_look, shown_in
    from hemafed.network.sim.simulate import SimulationOptions, hospitals

    ap = argparse.ArgumentParser()
    ap.add_argument("--sites", action="store_true")
    ap.add_argument("runs", type=Path, nargs="+", help="shifted runs, named …-sS for simulation seed S")
    args = ap.parse_args()
    torch.set_num_threads(2)
    plan, model, head, val = default_model()
    keep = np.sort(np.random.default_rng(1).permutation(len(val.labels))[:600])
    judged, yj = val.images[keep], np.asarray(val.labels).reshape(-1)[keep]
    from hemafed.core.data.appearance import hospital_looks

    print("| run | hospital | validation images | look | as they come | in the matched look |")
    print("|---|---:|---:|---|---:|---:|")
    gains = []
    for run in args.runs:
        seed = int(run.name.rsplit("-s", 1)[1])
        h = hospitals(SimulationOptions(quiet=True, seed=seed, appearance="shifted"))
        set_flat_params(head, final_weights(run))
        stats = CellStats.from_moments(head.cell_moments.detach().double().numpy())
        for k, (data, look) in enumerate(zip(h.site_data().values(), hospital_looks(10, seed), strict=True)):
            if len(data.val_images) < MIN_IMAGES:
                continue
            match = match_look(stats, data.val_images)
            own = apply_look(judged, look)
            acc = []
            for shown in (own, shown_in(own, match.look)):
                with torch.no_grad():
                    acc.append(float((head(model_inputs(plan, model, shown, "eval")).argmax(1).numpy() == yj).mean()))
            gains.append(acc[1] - acc[0])
            t = "as they come" if match.look is None else f"H {match.haematoxylin:g}, blur {match.blur:g}"
            print(f"| {run.name} | {k + 1} | {len(data.val_images)} | {t} | {acc[0]:.2%} | {acc[1]:.2%} |", flush=True)
    print(f"mean gain {100 * np.mean(gains):+.2f} points over {len(gains)} hospitals (worst {100 * min(gains):+.2f})")


def per_image() -> None:
    """`--per-image`: each image shown in its own look, the one in which its own measurements come closest to the
    federation's mean (a fixed function of the image and the released mean: no privacy cost, no batch needed), kept
    as it comes unless that look lowers its squared distance by more than `--margin`. The judged half of the
    validation split, as `main`."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-image", action="store_true")
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--haematoxylin", type=float, nargs="+", default=[0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3])
    ap.add_argument("--blur", type=float, nargs="+", default=[0.0, 0.2, 0.4, 0.6, 0.8])
    ap.add_argument("--margin", type=float, nargs="+", default=[0.0, 2.0])
    args = ap.parse_args()
    torch.set_num_threads(2)
    plan, model, head, val = default_model()
    yv = np.asarray(val.labels).reshape(-1)
    judged = torch.randperm(len(yv), generator=torch.Generator().manual_seed(7)).numpy()[len(yv) // 2:]
    images = val.images[judged]
    grid = [HospitalLook(haematoxylin=h, blur=b) for h, b in itertools.product(args.haematoxylin, args.blur)]
    identity = grid.index(HospitalLook())
    shown = [images if i == identity else apply_look(images, t) for i, t in enumerate(grid)]
    z = [standardised(x) for x in shown]
    print("| run | as they come | " + " | ".join(f"margin {m:g}: accuracy (images changed)" for m in args.margin)
          + " |")
    print("|---|---:|" + "---:|" * len(args.margin))
    for run in args.runs:
        set_flat_params(head, final_weights(run))
        stats = CellStats.from_moments(head.cell_moments.detach().double().numpy())
        scores = np.stack([stats.score_measurements(zi) for zi in z], 1)  # (images, looks)

        def accuracy(choice: np.ndarray) -> float:
            x = np.stack([shown[c][i] for i, c in enumerate(choice)])
            with torch.no_grad():
                return float((head(model_inputs(plan, model, x, "eval")).argmax(1).numpy() == yv[judged]).mean())

        cells = [f"{accuracy(np.full(len(images), identity)):.2%}"]
        for m in args.margin:
            best = scores.argmin(1)
            choice = np.where(scores[np.arange(len(images)), best] < scores[:, identity] - m, best, identity)
            cells.append(f"{accuracy(choice):.2%} ({(choice != identity).mean():.0%})")
        print(f"| {run.name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    if "--per-image" in sys.argv:
        per_image()
    else:
        sites() if "--sites" in sys.argv else main()
