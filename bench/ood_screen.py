"""Screening for "not an image of a single blood cell": which score from the released model separates them?

Not a product feature yet (issue 18): this measures candidate scores on the federation's final model before one is
built. In-distribution: BloodMNIST's validation split sets each score's threshold at a 2 % false-alarm rate; its
test split checks that rate. Out-of-distribution sets made from the 200 PBC sample JPEGs (kept out of any tuning):
whole "fields" (3×3 mosaics of full-size images, many cells at the microscope's scale), "red cells" (110-px corner
crops at native scale: red cells, no centred white cell) and uniform noise; the PBC images themselves as a second
in-distribution check. Scores: the distance and the cosine distance of an image's fixed features to the feature
average the federation estimated under DP in round 1 (already in the model: no new release), one minus the
calibrated top probability, and the energy (−T·logsumexp(logits/T)). Writes docs/ood-screening.md.

    python -m bench.ood_screen [--model results/calibration/hospital_01-final.npz]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hemafed.core.data.bloodmnist import load_splits, locate
from hemafed.core.data.imaging import centre_crop_resize
from hemafed.core.learning.classify import load_model_file
from hemafed.core.learning.confidence import softmax
from hemafed.core.learning.models import split_features
from hemafed.core.learning.site_trainer import model_inputs
from hemafed.network.sim.simulate import SimulationOptions, hospitals

DOCS = Path(__file__).resolve().parent.parent / "docs"
FALSE_ALARMS = 0.02


def ood_sets(pbc_dir: Path, rng: np.random.Generator, size: int = 28) -> dict[str, list[np.ndarray]]:
    """The screening sets at `size` pixels (a 64-px model's app and sites give it 64-px crops)."""
    images = [Image.open(p).convert("RGB") for p in sorted(pbc_dir.glob("*/*.jpg"))]
    w, h = images[0].size
    fields = []
    for _ in range(100):
        canvas = Image.new("RGB", (3 * w, 3 * h))
        for j, k in enumerate(rng.choice(len(images), 9, replace=False)):
            canvas.paste(images[k].resize((w, h)), ((j % 3) * w, (j // 3) * h))
        fields.append(centre_crop_resize(canvas, size))
    reds = [centre_crop_resize(im.crop((x, y, x + 110, y + 110)), size)
            for im in images[:100] for x, y in ((0, 0), (im.size[0] - 110, im.size[1] - 110))]
    noise = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(100)]
    return {"whole fields": fields, "red cells": reds, "noise": noise,
            "PBC cells (in-distribution)": [centre_crop_resize(im, size) for im in images]}


MAHA = "Mahalanobis to the nearest class mean, central (upper bound: not DP, not shippable)"


def _mahalanobis(plan, model, train_images: np.ndarray, train_labels: np.ndarray):
    """A score from class means and a shared covariance of every training image's features, computed in one place:
    what DP estimates of the same statistics could at best reach."""

    def features(images) -> np.ndarray:
        with torch.no_grad():
            return model_inputs(plan, model, np.asarray(images), "eval").double().numpy()

    f, y = features(train_images), np.asarray(train_labels).reshape(-1)
    means = np.stack([f[y == k].mean(0) for k in range(len(plan.classes))])
    residual = f - means[y]
    cov = residual.T @ residual / len(residual)
    precision = np.linalg.inv(cov + np.eye(len(cov)) * 1e-3 * np.trace(cov) / len(cov))

    def score(images) -> np.ndarray:
        g = features(images)
        return np.stack([np.einsum("ij,jk,ik->i", g - m, precision, g - m) for m in means], 1).min(1)

    return score


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=Path("results/calibration/hospital_01-final.npz"))
    p.add_argument("--data", type=Path, default=None, help="BloodMNIST (default: the shared data's)")
    args = p.parse_args(argv)
    started = time.perf_counter()
    data = locate(args.data)
    pbc_dir = data.parent.parent / "pbc_sample"
    model_file = load_model_file(args.model)
    model, plan = model_file.model, hospitals(SimulationOptions(data=args.data)).plan
    head = split_features(model)[1]
    temperature = model_file.calibration.temperature if model_file.calibration else 1.0

    def scores(images) -> dict[str, np.ndarray]:
        with torch.no_grad():
            f = model_inputs(plan, model, np.asarray(images), "eval").double()
            logits = head(f.float()).double().numpy()
            center = head.center.detach().double()
            return {"distance to the feature average": torch.linalg.norm(f - center, dim=1).numpy(),
                    "cosine distance to the feature average":
                        1 - torch.nn.functional.cosine_similarity(f, center[None], dim=1).numpy(),
                    "1 − calibrated top probability": 1 - softmax(logits, temperature).max(1),
                    "energy": -temperature * np.log(np.exp(logits / temperature).sum(1))}

    splits = load_splits(data)
    maha = _mahalanobis(plan, model, splits["train"].images, splits["train"].labels)
    val, test = scores(splits["val"].images), scores(splits["test"].images)
    sets = {name: scores(images) for name, images in ood_sets(pbc_dir, np.random.default_rng(0)).items()}
    for d, images in [(val, splits["val"].images), (test, splits["test"].images),
                      *zip(sets.values(), ood_sets(pbc_dir, np.random.default_rng(0)).values(), strict=True)]:
        d[MAHA] = maha(images)
    rows = []
    for name in val:
        threshold = np.quantile(val[name], 1 - FALSE_ALARMS)
        cells = [f"{np.mean(test[name] > threshold):.1%}"] + [f"{np.mean(s[name] > threshold):.0%}"
                                                               for s in sets.values()]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    doc = [
        "# Screening: \"not an image of a single blood cell\"",
        "",
        f"Generated by `python -m bench.ood_screen` ({time.perf_counter() - started:.0f} s) from `{args.model}` "
        f"(the main job's final model with the federation's calibration), {time.strftime('%Y-%m-%d')}. What it "
        "measures and how the sets are made: the script's docstring. Each score's threshold flags "
        f"{FALSE_ALARMS:.0%} of BloodMNIST's validation images; the other columns are the share flagged.",
        "",
        "| score | test split (in-distribution) | " + " | ".join(sets) + " |",
        "|---|---:|" + "---:|" * len(sets),
        *rows,
        "",
        "Not good enough to ship: the goal is ≥ 95 % of whole fields and of single red cells flagged at ≤ 2 % of "
        "in-distribution images. The scores of the classifier's own outputs flag almost nothing (the model is as "
        "sure of a field as of a cell); distances of the fixed features to the federation's DP feature average "
        "(no new privacy cost) catch noise and part of the fields and red cells. Even class-conditional statistics "
        "computed centrally on every training image (the Mahalanobis row: an upper bound for a DP estimate of the "
        "same statistics through secure aggregation) miss a fifth of the red cells. Next levers: that score "
        "estimated under DP for the fields, and features that see more of the image than the centre crop for the "
        "red cells.",
        "",
    ]
    (DOCS / "ood-screening.md").write_text("\n".join(doc))
    print("\n".join(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
