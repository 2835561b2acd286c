"""What each recipe costs a hospital before its first round: the fixed features of its images (issue 16).

    .venv/bin/python -m bench.prepare [--models M ...] [--images 256] [--threads 1 2]

A site computes its images' fixed features once (the feature cache keeps them): the training images in the
training view, its validation images in the evaluation view (one pass when the model trains on what it evaluates,
as the recipes' rotation- and flip-averaged features do). This times exactly that code path
(`core.learning.site_trainer.model_inputs` into an empty feature cache in a temporary folder) on the first
`--images` training images at the model's resolution, per torch thread count, interleaved model by model so one
load shapes every row; then scales it to the hospitals of `hemafed simulate`'s seed-0 federation (Dirichlet 0.5,
the median and the largest hospital's images) and to the whole federation on this machine (all hospitals'
images over its cores, one thread each: what the main job's first run waits for before round 1).
Writes the `prepare` section of docs/benchmarks.md, which docs/RESULTS.md quotes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench._report import machine_line, write_section
from hemafed.core.data.bloodmnist import load_splits, locate
from hemafed.core.learning.feature_cache import FeatureCache
from hemafed.core.learning.models import build_model, feature_kinds, get_spec
from hemafed.core.learning.recipe import RECIPE
from hemafed.core.learning.site_trainer import model_inputs
from hemafed.core.rounds.plan import FederationPlan
from hemafed.network.sim.simulate import SimulationOptions, hospitals

# the default, the 64-px default before it (the encoder before its cell scenes: the same network, so the same cost
# is expected), the 28-px previous default, the 64-px default without the canonical look, and the default with the
# 56-px scattering beside it (accuracy-levers.md, seventeenth pass)
MODELS = (RECIPE["model"], "scatter_synth_inv_cc_ms4p_lf_looks_hed_bw_64", "scatter_synth_inv_cc_lf_looks_hed_28",
          "scatter_synth_inv_cc_ms4p_looks_hed_64", "scatter_synth_inv_cc_ms4p_lf_looks_hed_s56_bw_64")


def seconds_per_image(model_name: str, images: np.ndarray, threads: int) -> float:
    """Wall seconds per image of one site's preparation of `images` (training and evaluation views)."""
    torch.set_num_threads(threads)
    plan = FederationPlan(model=model_name)  # its input size follows the model
    model = build_model(model_name, len(plan.classes))
    kinds = feature_kinds(model_name, model)
    views = ["train"] if kinds is None or kinds[0] == kinds[1] else ["train", "eval"]
    with tempfile.TemporaryDirectory(prefix="hemafed-prepare-") as tmp:
        cache = FeatureCache(Path(tmp) / "features.sqlite")
        started = time.perf_counter()
        for view in views:
            model_inputs(plan, model, images, view, cache=cache)
        return (time.perf_counter() - started) / len(images)


def hospital_sizes() -> list[int]:
    """Images each hospital of `hemafed simulate`'s seed-0 federation prepares (training plus validation)."""
    sites = hospitals(SimulationOptions(quiet=True)).site_data()
    return sorted(len(s.train_labels) + len(s.val_labels) for s in sites.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=2, help="timings per model and thread count (median kept)")
    ap.add_argument("--data", type=Path)
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()

    images = {}
    for name in args.models:
        size = get_spec(name).input_size
        if size not in images:
            images[size] = load_splits(locate(args.data, size=size))["train"].images[:args.images]
    sizes = hospital_sizes()
    median, largest, total = int(statistics.median(sizes)), sizes[-1], sum(sizes)
    cores = os.cpu_count() or 1

    for name in args.models:  # a first pass builds each model and loads its encoder's weights once
        seconds_per_image(name, images[get_spec(name).input_size][:8], 1)
    timings: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.repeats):
        for threads in args.threads:
            for name in args.models:
                s = seconds_per_image(name, images[get_spec(name).input_size], threads)
                timings.setdefault((name, threads), []).append(s)
                print(f"{name} {threads} thread(s): {1000 * s:.1f} ms per image", flush=True)

    head = "| model | input | " + " | ".join(f"ms per image, {t} thread{'s' * (t > 1)}" for t in args.threads) + \
        f" | median hospital ({median} images), 1 thread | largest hospital ({largest} images), 1 thread | " \
        f"all {len(sizes)} hospitals ({total} images) over {cores} cores |"
    rows = [head, "|---|---:|" + "---:|" * (len(args.threads) + 3)]
    for name in args.models:
        per = {t: statistics.median(timings[(name, t)]) for t in args.threads}
        one = per.get(1, per[min(per)])
        rows.append(f"| `{name}` | {get_spec(name).input_size} px | "
                    + " | ".join(f"{1000 * per[t]:.1f}" for t in args.threads)
                    + f" | {_minutes(one * median)} | {_minutes(one * largest)} | {_minutes(one * total / cores)} |")
    text = "\n".join([
        "## Preparation at each hospital (`bench/prepare.py`)", "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {machine_line()}. A site's one-off feature pass "
        f"(`model_inputs` into an empty feature cache) over the first {args.images} training images at the model's "
        f"resolution, median of {args.repeats} timings, the models interleaved; the hospitals are `hemafed "
        "simulate`'s seed-0 federation (training and validation images). The last column is what the main job's "
        "first run waits for before round 1 if the hospitals share the machine's cores evenly; the cold main "
        "job's own figure, with 10 site processes, is in [main-job-fresh.md](main-job-fresh.md). A second run "
        "finds every feature in the cache.", "", *rows])
    print(text)
    if not args.no_doc:
        write_section("prepare", text)


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


if __name__ == "__main__":
    main()
