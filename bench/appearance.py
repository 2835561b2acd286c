"""Hospitals whose images look different (core/data/appearance.py): how much the federated model loses, and how much a
remedy gives back.

Pairs of `hemafed simulate` runs (defaults otherwise: 10 hospitals, Dirichlet(0.5), ε = 8, 500 rounds, seed 0):
every hospital as BloodMNIST has it or each with its own look (`--appearance shifted`), with the default model and
with each remedy model (`--model scatter_synth_inv_cc_sn_28`: stain-normalised; `--model scatter_synth_inv_cc_lf_28`:
canonical lamp and focus). Each run's final weights (last checkpoint) are scored on the untouched test split and on a
fixed 500-image subset of it rendered in each hospital's look (what that hospital's new images would look like); the
looks are the ones `--appearance shifted` gives seed 0.

    python -m bench.appearance --same RUN --shifted RUN [--remedy SAME_RUN SHIFTED_RUN ...]

Another model's pair of runs (`hemafed simulate --model M [--appearance shifted]`; the model is read from each run's
metrics.json) into its own doc:

    python -m bench.appearance --same RUN --shifted RUN --doc appearance-64px-ms4p
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from bench._runs import run_model
from hemafed.core.data.appearance import LOOK_RANGE, apply_look, hospital_looks
from hemafed.core.learning.checkpoints import CheckpointStore
from hemafed.core.learning.models import build_model, get_spec, set_flat_params, split_features
from hemafed.core.learning.site_trainer import model_inputs
from hemafed.network.sim.simulate import SimulationOptions, hospitals

DOCS = Path(__file__).resolve().parent.parent / "docs"
PER_LOOK = 500
# how the doc names a remedy model's rows
REMEDIES = {"scatter_synth_inv_cc_sn_28": "stain-normalised", "scatter_synth_inv_cc_lf_28": "canonical lamp and focus"}


def _accuracy(model_name: str, weights: np.ndarray, images: np.ndarray, labels: np.ndarray) -> float:
    opts = SimulationOptions(model=model_name)
    plan = opts.plan()
    model = build_model(model_name, len(plan.classes))
    head = split_features(model)[1]
    set_flat_params(head, weights)
    with torch.no_grad():
        logits = head(model_inputs(plan, model, images, "eval")).numpy()
    return float(np.mean(logits.argmax(1) == np.asarray(labels).reshape(-1)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--same", type=Path, required=True, help="a run with every hospital as BloodMNIST has it")
    p.add_argument("--shifted", type=Path, required=True, help="the same model's run with --appearance shifted")
    p.add_argument("--remedy", type=Path, nargs=2, action="append", default=[], metavar=("SAME", "SHIFTED"),
                   help="a remedy model's pair of runs (its model read from the runs' metrics.json); repeatable")
    p.add_argument("--doc", default="appearance", help="the doc's name in docs/, without .md")
    args = p.parse_args(argv)
    base = run_model(args.same, "scatter_synth_inv_cc_28")
    if run_model(args.shifted, base) != base:
        raise SystemExit("--same and --shifted must be runs of the same model")
    pairs = [("", base, args.same, args.shifted)]
    for same, shifted in args.remedy:
        model = run_model(same, "")
        if not model or run_model(shifted, "") != model or model == base:
            raise SystemExit(f"--remedy {same} {shifted}: two runs of one model other than --same's, "
                             "each with its metrics.json")
        pairs.append((REMEDIES.get(model, model), model, same, shifted))
    runs = {}
    for remedy, model, same, shifted in pairs:
        runs[(remedy, "same")] = ("same look" + (f", {remedy}" if remedy else ""), model, same)
        runs[(remedy, "shifted")] = (("each its own look" if remedy else "each hospital its own look")
                                     + (f", {remedy}" if remedy else ""), model, shifted)
    started = time.perf_counter()
    size = {get_spec(model).input_size for _, model, _ in runs.values()}
    if len(size) > 1:
        raise SystemExit("the runs' models take different image sizes")
    test = hospitals(SimulationOptions(model=base)).test
    labels = np.asarray(test.labels).reshape(-1)
    keep = np.sort(np.random.default_rng(0).permutation(len(labels))[:PER_LOOK])
    looks = hospital_looks(10, 0)
    looked = [apply_look(test.images[keep], look) for look in looks]
    rows, table = {}, []
    for key, (label, model_name, run) in runs.items():
        store = CheckpointStore(run / "federation" / "state" / "checkpoints")
        weights = store.load(max(store.rounds())).weights
        clean = _accuracy(model_name, weights, test.images, labels)
        per_look = [_accuracy(model_name, weights, im, labels[keep]) for im in looked]
        rows[key] = (clean, per_look)
        table.append(f"| {label} | `{model_name}` | {clean:.2%} | {np.mean(per_look):.2%} ± {np.std(per_look):.2%} | "
                     f"{min(per_look):.2%} |")
    losses = [(remedy, rows[(remedy, "same")][0] - rows[(remedy, "shifted")][0]) for remedy, *_ in pairs]
    doc = [
        "# Hospitals whose images look different",
        "",
        "Generated by `python -m bench.appearance"
        + (f" --doc {args.doc}" if args.doc != "appearance" else "")
        + f"` ({time.perf_counter() - started:.0f} s), "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, from {len(rows)} `hemafed simulate` runs (defaults "
        "but for the model in the table: 10 hospitals, Dirichlet(0.5), ε = 8, 500 rounds, seed 0; one seed only). "
        "What a look is and its range "
        "(drawn uniformly per hospital): `core/data/appearance.py` — "
        + ", ".join(f"{k} {lo:g}…{hi:g}" for k, (lo, hi) in LOOK_RANGE.items()) + ".",
        "",
        "| hospitals | model | untouched test split | test subset in each hospital's look (mean ± std over the 10) "
        "| worst hospital |",
        "|---|---|---:|---:|---:|",
        *table,
        "",
        "Loss on the untouched test split from the hospitals' different looks: "
        + "; ".join(f"{loss * 100:+.2f} points" + (f" with {remedy}" if remedy else (" without a remedy" if
                    len(losses) > 1 else "")) for remedy, loss in losses)
        + f" (goal: ≤ 1 point). The per-look column uses {PER_LOOK} test images (the same ones for every look and "
        "run).",
        "",
    ]
    (DOCS / f"{args.doc}.md").write_text("\n".join(doc))
    print("\n".join(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
