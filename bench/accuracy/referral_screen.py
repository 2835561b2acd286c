"""Screen: which score picks the images to refer (issue 18's "not sure"), on the validation split.

The product refers the images whose calibrated top probability is lowest (`core.learning.confidence`). This screen
ranks BloodMNIST's validation images, which no hospital holds, by other scores computed from the same model file and
reports the accuracy of the answered ones at a fixed coverage (95 %: issue 18's goal is ≥ 98.5 % right):

- from the product's logits (its 8-view test-time augmentation): the top probability at several temperatures
  (the ranking is not quite temperature-free), the margin between the top two, the entropy, the logit margin;
- the top probability less λ times the cell check's distance (`--cell-check`);
- from each of the 8 views' own logits: how many views agree with the answer, the mean and the smallest probability
  the views give the answer, and the top probability less k times the views' spread.

    python -m bench.accuracy.referral_screen results/calibration-64px-bw/hospital_01-final.npz
    python -m bench.accuracy.referral_screen RUN/final_model.npz --halves-seed 0   # per-class offsets, held out
    python -m bench.accuracy.referral_screen results/appear/same-s{0,1,2}/final_model.npz --cell-check 0.01 0.1 0.3
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def view_logits(model_file: Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(the product's logits (N, C), each view's logits (8, N, C), labels, the file's temperature) on `split`."""
    import torch

    from hemafed.core.data.bloodmnist import load_splits, locate
    from hemafed.core.learning.classify import load_model_file
    from hemafed.core.learning.features import dihedral
    from hemafed.core.learning.models import images_to_tensor, split_features

    mf = load_model_file(model_file)
    data = load_splits(locate(None, size=mf.input_size))[split]
    x = images_to_tensor(data.images, mf.input_size)
    head = split_features(mf.model)[1]
    with torch.no_grad():
        views = np.stack([head(mf.model.features(dihedral(x, k))).numpy() for k in range(8)])
    temperature = mf.calibration.temperature if mf.calibration is not None else 1.0
    return (mf.logits(data.images).astype(np.float64), views.astype(np.float64),
            np.asarray(data.labels).reshape(-1), float(temperature))


def scores(logits: np.ndarray, views: np.ndarray, temperature: float) -> dict[str, np.ndarray]:
    """Each score per image, larger meaning more sure."""
    from hemafed.core.learning.confidence import softmax

    p = softmax(logits, temperature)
    answer = p.argmax(1)
    top2 = np.sort(p, 1)[:, -2:]
    sorted_logits = np.sort(logits, 1)
    per_view = np.stack([softmax(v, temperature) for v in views])  # (8, N, C)
    p_answer = per_view[:, np.arange(len(answer)), answer]
    out = {f"top probability, T = {t:g}": softmax(logits, t).max(1) for t in (1.0, 2.0, 3.0)}
    out[f"top probability, the file's T = {temperature:.2f} (the product)"] = p.max(1)
    out["margin p1 − p2"] = top2[:, 1] - top2[:, 0]
    out["− entropy"] = (p * np.log(p + 1e-300)).sum(1)
    out["logit margin"] = sorted_logits[:, -1] - sorted_logits[:, -2]
    # ties in agreement broken by the top probability
    out["views agreeing with the answer"] = (per_view.argmax(2) == answer).mean(0) + 1e-3 * p.max(1)
    out["mean over views of p(answer)"] = p_answer.mean(0)
    out["smallest over views of p(answer)"] = p_answer.min(0)
    for k in (1, 2):
        out[f"top probability − {k} × spread over views"] = p.max(1) - k * p_answer.std(0)
    return out


def answered_accuracy(score: np.ndarray, right: np.ndarray, coverage: float) -> float:
    keep = np.argsort(-score, kind="stable")[: round(coverage * len(score))]
    return float(right[keep].mean())


OFFSET_GRID = np.linspace(-0.3, 0.3, 61)


def per_class_offsets(confidence: np.ndarray, answer: np.ndarray, right: np.ndarray, coverage: float,
                      classes: int, sweeps: int = 3) -> np.ndarray:
    """One offset per answered class, subtracted from the top probability before ranking, chosen by coordinate
    search to maximise the answered accuracy at `coverage` on these images."""
    offsets = np.zeros(classes)
    best = answered_accuracy(confidence, right, coverage)
    for _ in range(sweeps):
        for c in range(classes):
            for value in OFFSET_GRID:
                trial = offsets.copy()
                trial[c] = value
                acc = answered_accuracy(confidence - trial[answer], right, coverage)
                if acc > best + 1e-12:
                    best, offsets = acc, trial
    return offsets


def halves_rows(p: np.ndarray, right: np.ndarray, coverage: float, seed: int) -> dict[str, float]:
    """Per-class offsets fitted on one random half of the images and judged on the other (both ways, averaged),
    beside the top probability judged on the same halves."""
    order = np.random.default_rng(seed).permutation(len(right))
    halves = (order[: len(order) // 2], order[len(order) // 2:])
    confidence, answer = p.max(1), p.argmax(1)
    plain, offset = [], []
    for fit, judge in (halves, halves[::-1]):
        b = per_class_offsets(confidence[fit], answer[fit], right[fit], coverage, p.shape[1])
        plain.append(answered_accuracy(confidence[judge], right[judge], coverage))
        offset.append(answered_accuracy(confidence[judge] - b[answer[judge]], right[judge], coverage))
    return {"top probability, judged on halves": float(np.mean(plain)),
            "top probability less a per-class offset fitted on the other half": float(np.mean(offset))}


def cell_check_rows(model_file: Path, split: str, confidence: np.ndarray, right: np.ndarray, coverage: float,
                    lambdas: list[float]) -> dict[str, float]:
    """The top probability less λ × the cell check's squared distance over the federation's threshold: an image
    unlike the federation's cells may also be one the model is more often wrong about. Costs no privacy: the
    statistics and the threshold are already in the released file."""
    from hemafed.core.data.bloodmnist import load_splits, locate
    from hemafed.core.learning.classify import load_model_file

    mf = load_model_file(model_file)
    stats, threshold = mf.cell_stats(), mf.calibration.not_a_cell_threshold
    data = load_splits(locate(None, size=mf.input_size))[split]
    distance = stats.scores(data.images) / threshold
    return {f"top probability − {lam:g} × cell-check score / threshold":
            answered_accuracy(confidence - lam * distance, right, coverage) for lam in lambdas}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_file", type=Path, nargs="+", help="released model files (one per run)")
    ap.add_argument("--split", default="val", choices=("val", "test"), help="test only to report a kept choice")
    ap.add_argument("--coverage", type=float, default=0.95)
    ap.add_argument("--halves-seed", type=int, default=None,
                    help="also fit a per-class offset on one random half and judge it on the other (this seed)")
    ap.add_argument("--cell-check", type=float, nargs="*", default=None, metavar="LAMBDA",
                    help="also rank by the top probability less LAMBDA × the cell check's score over its threshold")
    ap.add_argument("--out", type=Path, default=Path("/tmp/referral_screen.json"))
    args = ap.parse_args()
    import torch

    from hemafed.core.learning.confidence import softmax

    torch.set_num_threads(2)
    rows = []
    for path in args.model_file:
        started = time.perf_counter()
        logits, views, labels, temperature = view_logits(path, args.split)
        right = softmax(logits, temperature).argmax(1) == labels
        row = {"model_file": str(path), "split": args.split, "coverage": args.coverage,
               "accuracy": float(right.mean()), "seconds": time.perf_counter() - started,
               "answered": {name: answered_accuracy(s, right, args.coverage)
                            for name, s in scores(logits, views, temperature).items()}}
        if args.cell_check:
            row["answered"].update(cell_check_rows(path, args.split, softmax(logits, temperature).max(1), right,
                                                   args.coverage, args.cell_check))
        if args.halves_seed is not None:
            row["answered"].update(halves_rows(softmax(logits, temperature), right, args.coverage, args.halves_seed))
        rows.append(row)
        print(f"{path} ({args.split}, {len(labels)} images, {100 * row['accuracy']:.2f} % right, "
              f"{row['seconds']:.0f} s): right among the {100 * args.coverage:g} % answered")
        for name, acc in row["answered"].items():
            print(f"  {name:55s} {100 * acc:.2f} %")
    args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
