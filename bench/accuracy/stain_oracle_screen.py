"""Screen: how much of the appearance-shift loss would a perfect per-hospital stain normalisation take back? (research
script, issue 18)

An upper bound, not a method. Each simulated hospital's training images are made again from BloodMNIST's originals in
its look (`hemafed simulate --appearance shifted`, `core.data.appearance.hospital_looks`) with some components reset
to the untouched look: `stain` (haematoxylin and eosin strength and tint, as a perfect per-hospital stain
normalisation to the reference would), `H` (haematoxylin strength only, what a per-hospital stain factor read off its
images aims at: eleventh pass), `blur` (focus only; no site can sharpen its images, so this bounds what focus
costs), `stain+blur` (both: what is left is lamp and magnification).
The proxy of `bench.accuracy.scatter_norm_screen` (central DP-SGD on the hospitals' training splits with the
federation's noise at ε = 8, noise seeds 0 and 1), judged on BloodMNIST's whole untouched validation split. The
test split is not touched.

    python -m bench.accuracy.stain_oracle_screen --sim-seeds 1 0 2 --variants same shipped stain H
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch

from bench.accuracy.pca_screen import _rescale, head_logits, sites_training
from bench.accuracy.scatter_norm_screen import _proxy_head
from hemafed.core.data.appearance import apply_look, hospital_looks
from hemafed.core.data.bloodmnist import load_splits, locate
from hemafed.core.learning.models import build_model, split_features
from hemafed.core.learning.site_trainer import model_inputs
from hemafed.network.sim.simulate import FederationPlan, Hospitals, SimulationOptions, hospitals

RESETS = {"shipped": {}, "stain": dict(haematoxylin=1.0, eosin=1.0, tint_h=0.0, tint_e=0.0),
          "H": dict(haematoxylin=1.0), "blur": dict(blur=0.0)}
RESETS["stain+blur"] = {**RESETS["stain"], **RESETS["blur"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sim-seeds", type=int, nargs="+", default=[1, 0, 2])
    ap.add_argument("--variants", nargs="+", default=["same", "shipped", "stain", "H"],
                    choices=["same", *RESETS])
    args = ap.parse_args()
    torch.set_num_threads(2)
    plan = FederationPlan()
    model = build_model(plan.model)
    radius = split_features(model)[1].radius
    val = load_splits(locate(None, size=plan.input_size))["val"]
    yv = torch.as_tensor(np.asarray(val.labels).reshape(-1)).long()
    xv = model_inputs(plan, model, val.images, "eval").double()
    for sim_seed in args.sim_seeds:
        same = hospitals(SimulationOptions(quiet=True, seed=sim_seed, appearance="same"))
        for variant in args.variants:
            h = same
            if variant != "same":
                images = same.train.images.copy()
                for idx, look in zip(same.parts, hospital_looks(len(same.parts), sim_seed), strict=True):
                    images[idx] = apply_look(same.train.images[idx], dataclasses.replace(look, **RESETS[variant]))
                h = Hospitals(same.plan, type(same.train)(images, same.train.labels), same.parts, same.test)
            started = time.perf_counter()
            xt = model_inputs(h.plan, model, sites_training(h)[0], "train").double()
            fit = _proxy_head(h, xt, 8.0, radius)
            accs = []
            for seed in (0, 1):
                w, centre = fit(seed)
                z = _rescale("block:3,1,1", xt - centre, xv - centre, xt)[1]
                accs.append(float((head_logits(w, z).argmax(1) == yv).double().mean()))
            print(json.dumps({"sim_seed": sim_seed, "variant": variant, "val": accs, "mean": float(np.mean(accs)),
                              "s": round(time.perf_counter() - started)}), flush=True)


if __name__ == "__main__":
    main()
