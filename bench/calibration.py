"""How well the federation's calibration (core/learning/confidence.py) works on the untouched test split.

`hemafed simulate`'s federation (its defaults, seed 0): the temperature is the one the federation picks — the grid
temperature with the lowest NLL summed over every hospital's validation images under the model the last round
started from (`agg_round.federation_temperature`, from the checkpoint of round R-1) — and each hospital then fits
its "uncertain" threshold on its own validation images, as its site does when the federation ends. Beside it, for
comparison: each hospital fitting the temperature alone. Scored once on BloodMNIST's test split (no hospital holds
it): expected calibration error (15 bins), the share of test images answered at each hospital's threshold and the
accuracy of those answered. Writes docs/NAME.md and docs/NAME.png (`--doc NAME`, by default the main job's model's,
`CALIBRATION_DOC`; the run's model comes from its metrics.json).

    python -m bench.calibration [--run results/experiment/main-job] [--doc NAME]

It also writes each hospital's model file as its site saves it, into results/NAME/.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from bench._runs import run_model
from hemafed.core.learning.cell_check import with_site_threshold
from hemafed.core.learning.checkpoints import CheckpointStore
from hemafed.core.learning.confidence import (
    Calibration,
    coverage_curve,
    expected_calibration_error,
    nll,
    nll_sums,
    reliability,
    softmax,
    temperature_from_sums,
)
from hemafed.core.learning.fedsgd import moments_layout
from hemafed.core.learning.models import build_model, set_flat_params, split_features
from hemafed.core.learning.site_trainer import model_inputs
from hemafed.core.rounds.agg_round import federation_cell_threshold
from hemafed.network.sim.experiment import CALIBRATION_DOC
from hemafed.network.sim.simulate import SimulationOptions, hospitals, site_splits
from hemafed.network.site import save_model_file

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _logits(plan, weights: np.ndarray, images: np.ndarray) -> np.ndarray:
    """The model's logits for `weights`, its fixed features read from the feature cache (computed once)."""
    model = build_model(plan.model, len(plan.classes))
    head = split_features(model)[1]
    set_flat_params(head, weights)
    with torch.no_grad():
        return head(model_inputs(plan, model, images, "eval")).double().numpy()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, default=Path("results/experiment/main-job"),
                   help="a `hemafed simulate` results folder (its defaults, seed 0)")
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--seed", type=int, default=0, help="the run's seed (its hospitals' split)")
    p.add_argument("--seeds-from", type=Path, nargs="*", default=[], metavar="JSON",
                   help="figures of other seeds' runs (written by --figures) to add as a mean over seeds")
    p.add_argument("--figures", type=Path, help="write this run's figures here instead of the doc and model files")
    p.add_argument("--doc", default=CALIBRATION_DOC,
                   help="the doc and plot's name in docs/ (without .md; default: the main job's model's, "
                        f"{CALIBRATION_DOC}, which RESULTS.md quotes); the hospitals' model files go to results/NAME/")
    args = p.parse_args(argv)
    started = time.perf_counter()
    model = run_model(args.run, SimulationOptions().model)
    h = hospitals(SimulationOptions(data=args.data, seed=args.seed, model=model))
    sites = site_splits(h.train.images, h.train.labels, h.parts, h.plan)
    store = CheckpointStore(args.run / "federation" / "state" / "checkpoints")
    last = max(store.rounds())
    final, before_last = store.load(last).weights, store.load(last - 1).weights
    total = sum(nll_sums(_logits(h.plan, before_last, d.val_images), d.val_labels) for d in sites.values())
    images = sum(len(d.val_labels) for d in sites.values())
    temperature = temperature_from_sums(total, images)
    test_logits = _logits(h.plan, final, h.test.images)
    test_labels = np.asarray(h.test.labels).reshape(-1)
    raw, calibrated = softmax(test_logits), softmax(test_logits, temperature)
    right = raw.argmax(1) == test_labels
    rows, covered, own = [], [], []
    moments = moments_layout(split_features(build_model(h.plan.model, len(h.plan.classes)))[1])
    # what the aggregator sends with the final model: every hospital's validation images per class
    mix = sum(np.bincount(np.asarray(d.val_labels).reshape(-1), minlength=len(h.plan.classes))
              for d in sites.values())
    for name, data in sites.items():
        logits = _logits(h.plan, final, data.val_images)
        cal = with_site_threshold(Calibration.fit(logits, data.val_labels, temperature=temperature,
                                                  federation_mix=mix),
                                  None if moments is None else final[moments], data.val_images,
                                  federation_threshold=federation_cell_threshold(store.read_log()))
        # the model file as this hospital's site saves it (the app's Classify screenshots use hospital_01's)
        if args.figures is None:
            save_model_file(Path("results") / args.doc / f"{name}-final.npz", final, h.plan, last, cal)
        alone = Calibration.fit(logits, data.val_labels)
        own.append(expected_calibration_error(softmax(test_logits, alone.temperature), test_labels))
        if cal.threshold is None:
            rows.append(f"| {name} | {cal.images} | {alone.temperature:.3f} | {own[-1]:.2%} | – | – | – | – |")
            continue
        mine = cal.probabilities(test_logits)  # with this hospital's class offsets, when it kept them
        answered, mine_right = mine.max(1) >= cal.threshold, mine.argmax(1) == test_labels
        covered.append((answered.mean(), mine_right[answered].mean()))
        rows.append(f"| {name} | {cal.images} | {alone.temperature:.3f} | {own[-1]:.2%} | {cal.threshold:.3f} "
                    f"| {answered.mean():.1%} | {mine_right[answered].mean():.2%} | "
                    f"{'kept' if cal.class_offsets is not None else 'released'} |")
    ece_raw, ece_fed = expected_calibration_error(raw, test_labels), expected_calibration_error(calibrated, test_labels)
    share, acc = np.array(covered).T
    # issue 18's measure: the 5 % least confident test images referred (the curve's second point of 20 is 95 %)
    at95 = coverage_curve(calibrated, test_labels, points=20)[1][1]
    figures = {"seed": args.seed, "ece_raw": ece_raw, "ece_federation": ece_fed, "answered": float(share.mean()),
               "answered_right": float(acc.mean()), "accuracy": float(right.mean()), "temperature": temperature,
               "right_at_95": at95}
    if args.figures is not None:
        args.figures.write_text(json.dumps(figures))
        print(figures)
        return 0
    _plot(raw, calibrated, test_labels, f"federation, T = {temperature:.3g}", DOCS / f"{args.doc}.png")
    seeds = [figures] + [json.loads(path.read_text()) for path in args.seeds_from]
    doc = [
        "# Calibration",
        "",
        "Generated by `python -m bench.calibration"
        + (f" --doc {args.doc}" if args.doc != "calibration" else "")
        + f"` ({time.perf_counter() - started:.0f} s with the feature cache "
        f"warm) from `{args.run}` ("
        + ("the main job: `hemafed simulate` defaults" if model == SimulationOptions().model else
           f"`hemafed simulate --model {model}`")
        + f", seed {args.seed}, ε = 8, {last} rounds), "
        f"{time.strftime('%Y-%m-%d')}. How it works and what it reveals: "
        "[privacy.md](privacy.md#calibration-and-uncertain-answers). Every figure is on the test split "
        f"({len(test_labels):,} images no hospital holds), touched once per figure.",
        "",
        f"- **The federation's temperature** T = {temperature:.3g} (the grid value with the lowest NLL summed over "
        f"the {images:,} validation images of all {len(sites)} hospitals): expected calibration error (15 bins) "
        f"**{ece_raw:.2%} uncalibrated → {ece_fed:.2%}**. The NLL on the test split: "
        f"{nll(test_logits, test_labels):.4f} → {nll(test_logits, test_labels, temperature):.4f}.",
        f"- For comparison, each hospital fitting its temperature alone on its own validation images: "
        f"{np.mean(own):.2%} ± {np.std(own):.2%} (mean ± std over the hospitals; few images make it noisy).",
        f"- At each hospital's \"uncertain\" threshold (95 % of its validation images answered), each hospital's "
        "model file as its site saves it (with its class offsets where the guard kept them, core/learning/"
        "class_offsets.py): "
        f"{share.mean():.1%} ± {share.std():.1%} of test images answered, {acc.mean():.2%} ± {acc.std():.2%} of "
        f"those right (all images: {right.mean():.2%}).",
        f"- With the 5 % least confident test images referred (95 % answered, issue 18's measure; no threshold is "
        f"fitted on the test split, this ranks its images by confidence): {at95:.2%} of the answered right.",
        "",
        "| hospital | validation images | its own T | ECE with its own T | its threshold (federation's T) "
        "| test images answered | answered right | its class offsets |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
        *rows,
        "",
        f"![reliability and coverage]({args.doc}.png) (left: reliability before and after the federation's "
        "temperature; right: accuracy of the answered images as the least confident are referred)",
        "",
        "Coverage against accuracy with the federation's temperature: "
        + ", ".join(f"{c:.0%} → {a:.2%}" for c, a in coverage_curve(calibrated, test_labels, points=8)),
        "",
    ]
    if len(seeds) > 1:
        def over(key: str) -> str:
            values = np.array([f[key] for f in seeds])
            return f"{values.mean():.2%} ± {values.std():.2%}"

        doc += [f"**Over {len(seeds)} seeds** (seeds {', '.join(str(f['seed']) for f in seeds)}: each a full main-job "
                "run, its own hospitals' split and noise; mean ± std over the seeds): expected calibration error "
                f"{over('ece_raw')} uncalibrated → **{over('ece_federation')}** with the federation's temperature; "
                f"at the hospitals' thresholds {over('answered')} of test images answered, {over('answered_right')} "
                f"of those right (all images {over('accuracy')})"
                + (f"; with the 5 % least confident referred, {over('right_at_95')} of the answered right"
                   if all("right_at_95" in f for f in seeds) else "") + ".", ""]
    (DOCS / f"{args.doc}.md").write_text("\n".join(doc))
    print("\n".join(doc))
    return 0


def _plot(raw: np.ndarray, calibrated: np.ndarray, labels: np.ndarray, who: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    left.plot([0, 1], [0, 1], color="#999", lw=1, ls="--", label="perfect")
    for probs, label, colour in ((raw, "uncalibrated", "#b03a2e"), (calibrated, f"calibrated ({who})", "#2e6db0")):
        pts = reliability(probs, labels)
        left.plot([c for c, _, _ in pts], [a for _, a, _ in pts], marker="o", color=colour,
                  label=f"{label}, ECE {expected_calibration_error(probs, labels):.1%}")
    left.set(xlabel="confidence", ylabel="accuracy", title="reliability (test split, 15 bins)", xlim=(0, 1),
             ylim=(0, 1))
    left.legend(loc="upper left", fontsize=8)
    curve = coverage_curve(calibrated, labels, points=40)
    right.plot([c * 100 for c, _ in curve], [a * 100 for _, a in curve], color="#2e6db0")
    right.set(xlabel="test images answered (%)", ylabel="accuracy of the answered (%)",
              title="refer the least confident to a person")
    right.invert_xaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
