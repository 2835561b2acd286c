"""Which part of a microscope look moves the default's answers, and through which feature block? (research script,
issue 18)

Each federation's final weights (`hemafed simulate` runs) answer 600 images of BloodMNIST's validation split as they
are and with one component of a look at an end of `LOOK_RANGE` (the rest untouched). For the first run, each of the
three feature blocks (the 28-px stain-density scattering, the 28-px procedural maps, the 64-px procedural maps) is
also shifted alone, the other two computed from the untouched image; and the median change of each block, relative
to the spread of that block over the images, is printed. The test split is not touched.

    python -m bench.accuracy.look_sensitivity results/appear-cells/same-s0 results/appear-cells/shifted-s1
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import torch

from hemafed.core.data.appearance import HospitalLook, apply_look
from hemafed.core.data.bloodmnist import load_splits, locate
from hemafed.core.learning.checkpoints import CheckpointStore
from hemafed.core.learning.models import MULTISCALE_BLOCK_WEIGHTS, build_model, set_flat_params, split_features
from hemafed.core.learning.site_trainer import model_inputs
from hemafed.network.sim.simulate import SimulationOptions

COMPONENTS = {
    "haematoxylin 0.7": HospitalLook(haematoxylin=0.7), "haematoxylin 1.3": HospitalLook(haematoxylin=1.3),
    "eosin 0.7": HospitalLook(eosin=0.7), "eosin 1.3": HospitalLook(eosin=1.3),
    "tint +0.05 (H)": HospitalLook(tint_h=0.05), "tint −0.05 (E)": HospitalLook(tint_e=-0.05),
    "lamp 0.85": HospitalLook(brightness=0.85), "lamp 1.15": HospitalLook(brightness=1.15),
    "blur 0.4": HospitalLook(blur=0.4), "blur 0.8": HospitalLook(blur=0.8),
    "zoom 0.9": HospitalLook(zoom=0.9), "zoom 1.1": HospitalLook(zoom=1.1),
}


def default_model():
    """(plan, model, head, validation split) of `hemafed simulate`'s default model."""
    plan = SimulationOptions().plan()
    model = build_model(plan.model, len(plan.classes))
    return plan, model, split_features(model)[1], load_splits(locate(None, size=plan.input_size))["val"]


def final_weights(run: Path) -> np.ndarray:
    store = CheckpointStore(run / "federation" / "state" / "checkpoints")
    return store.load(max(store.rounds())).weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", type=Path, nargs="+", help="`hemafed simulate` output folders of the default model")
    ap.add_argument("--images", type=int, default=600)
    args = ap.parse_args()
    torch.set_num_threads(2)
    plan, model, head, val = default_model()
    keep = np.sort(np.random.default_rng(1).permutation(len(val.labels))[:args.images])
    images, labels = val.images[keep], np.asarray(val.labels).reshape(-1)[keep]
    weights = {run.name: final_weights(run) for run in args.runs}
    ends = np.cumsum([0] + [n for n, _ in MULTISCALE_BLOCK_WEIGHTS])
    blocks = list(itertools.pairwise(ends))

    def accuracy(w: np.ndarray, f: torch.Tensor) -> float:
        set_flat_params(head, w)
        with torch.no_grad():
            return float((head(f).argmax(1).numpy() == labels).mean())

    untouched = model_inputs(plan, model, images, "eval")
    first = next(iter(weights.values()))
    names = list(weights)
    print(f"| component | {' | '.join(names)} | {names[0]}, only the scattering / 28-px maps / 64-px maps shifted | "
          "median change of each block, relative to its spread |")
    print("|---|" + "---:|" * (len(names) + 2))
    print(f"| none | {' | '.join(f'{accuracy(w, untouched):.2%}' for w in weights.values())} | | |")
    for name, look in COMPONENTS.items():
        f = model_inputs(plan, model, apply_look(images, look), "eval")
        alone = []
        for a, b in blocks:
            g = untouched.clone()
            g[:, a:b] = f[:, a:b]
            alone.append(f"{accuracy(first, g):.2%}")
        change = [float(((f[:, a:b] - untouched[:, a:b]).norm(dim=1)
                         / (untouched[:, a:b] - untouched[:, a:b].mean(0)).norm(dim=1)).median()) for a, b in blocks]
        print(f"| {name} | {' | '.join(f'{accuracy(w, f):.2%}' for w in weights.values())} | {' / '.join(alone)} | "
              f"{' / '.join(f'{c:.2f}' for c in change)} |", flush=True)


if __name__ == "__main__":
    main()
