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
    ap.add_argument("--metric", choices=("mahalanobis", "euclidean"), default="mahalanobis")
    args = ap.parse_args()
    torch.set_num_threads(2)
    plan, model, head, val = default_model()
    yv = np.asarray(val.labels).reshape(-1)
    order = torch.randperm(len(yv), generator=torch.Generator().manual_seed(7)).numpy()
    own, judged = order[: len(yv) // 2], order[len(yv) // 2:]
    grid = [HospitalLook(haematoxylin=h, eosin=e, blur=b)
            for h, e, b in itertools.product(args.haematoxylin, args.eosin, args.blur)]
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
            gaps = [float((z[:n].mean(0) - s.mean) @ metric @ (z[:n].mean(0) - s.mean)) for z in own_z]
            best = int(np.argmin(gaps))
            t = grid[best]
            cells.append(f"{accuracy(run, best):.2%} (H {t.haematoxylin:g}, E {t.eosin:g}, blur {t.blur:g})")
        accs = [accuracy(run, i) for i in range(len(grid))]
        t = grid[int(np.argmax(accs))]
        cells.append(f"{max(accs):.2%} (H {t.haematoxylin:g}, E {t.eosin:g}, blur {t.blur:g})")
        print(f"| {run.name} | " + " | ".join(cells) + " |", flush=True)


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


if __name__ == "__main__":
    sites() if "--sites" in sys.argv else main()
