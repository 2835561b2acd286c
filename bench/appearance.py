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

from bench._runs import run_model, run_seed
from hemafed.core.data.appearance import LOOK_RANGE, apply_look, hospital_looks
from hemafed.core.learning.checkpoints import CheckpointStore
from hemafed.core.learning.models import build_model, get_spec, set_flat_params, split_features
from hemafed.core.learning.site_trainer import model_inputs
from hemafed.network.sim.simulate import SimulationOptions, hospitals

DOCS = Path(__file__).resolve().parent.parent / "docs"
PER_LOOK = 500
# how the doc names a remedy model's rows
REMEDIES = {"scatter_synth_inv_cc_sn_28": "stain-normalised", "scatter_synth_inv_cc_lf_28": "canonical lamp and focus"}


def _logits(model_name: str, weights: np.ndarray, images: np.ndarray) -> np.ndarray:
    plan = SimulationOptions(model=model_name).plan()
    model = build_model(model_name, len(plan.classes))
    head = split_features(model)[1]
    set_flat_params(head, weights)
    with torch.no_grad():
        return head(model_inputs(plan, model, images, "eval")).double().numpy()


def _accuracy(model_name: str, weights: np.ndarray, images: np.ndarray, labels: np.ndarray) -> float:
    logits = _logits(model_name, weights, images)
    return float(np.mean(logits.argmax(1) == np.asarray(labels).reshape(-1)))


def hospital_files(run: Path) -> list[Path]:
    """Each hospital's final model file, as its site saved it (with its calibration), in hospital order."""
    return sorted((run / "sites").glob("hospital_*/state/models/*/final.npz"))


def own_look_scores(model_name: str, run: Path, shifted: bool, images: np.ndarray,
                    labels: np.ndarray) -> list[tuple[float, float, bool]]:
    """Per hospital of `run`: (released model, the hospital's own model file) accuracy on `images` as that
    hospital's look renders them (its run seed's looks; untouched when the hospitals are alike), and whether its
    file re-fitted the class offsets."""
    from hemafed.core.learning.classify import load_model_file

    files = hospital_files(run)
    looks = hospital_looks(len(files), run_seed(run) or 0)
    out, alike = [], None
    for path, look in zip(files, looks, strict=True):
        cal = load_model_file(path).calibration
        weights = np.load(path)["weights"]  # the same in every hospital's file
        if shifted:
            logits = _logits(model_name, weights, apply_look(images, look))
        else:
            alike = logits = alike if alike is not None else _logits(model_name, weights, images)
        own = cal.probabilities(logits) if cal is not None else logits
        out.append((float(np.mean(logits.argmax(1) == labels)), float(np.mean(own.argmax(1) == labels)),
                    bool(cal is not None and cal.class_offsets is not None)))
    return out


def deploy_scores(model_name: str, run: Path, val: tuple[np.ndarray, np.ndarray],
                  test: tuple[np.ndarray, np.ndarray], sizes: list[int]) -> list[float]:
    """The run's final model file (the aggregator's) on the untouched test split: as released; then with the test
    images shown in the look matched on the first n of `val` (a hospital in the untouched look, its images
    unlabelled; `core.learning.look_match`), for each n; then re-calibrated (`hemafed calibrate`: that look, and the
    re-fit on those n images with their labels), for each n."""
    from hemafed.core.learning.classify import load_model_file
    from hemafed.core.learning.local_calibration import matched_look, recalibrate_features
    from hemafed.core.learning.look_match import shown_in

    model = load_model_file(run / "final_model.npz")
    weights = np.load(run / "final_model.npz")["weights"]
    plan = SimulationOptions(model=model_name).plan()
    net = build_model(model_name, len(plan.classes))
    head = split_features(net)[1]
    inputs: dict = {}

    def features_in(look) -> tuple[torch.Tensor, torch.Tensor]:
        key = look  # a frozen dataclass (None: as they come)
        if key not in inputs:
            inputs[key] = (model_inputs(plan, net, shown_in(val[0][:max(sizes)], look), "eval"),
                           model_inputs(plan, net, shown_in(test[0], look), "eval"))
        return inputs[key]

    def accuracy(w: np.ndarray, features: torch.Tensor, cal) -> float:
        set_flat_params(head, w)
        with torch.no_grad():
            logits = head(features).double().numpy()
        return float(np.mean(cal.probabilities(logits).argmax(1) == test[1]))

    out = [accuracy(weights, features_in(None)[1], model.calibration)]
    matches = [matched_look(model, val[0][:n]) for n in sizes]
    looks = [None if m is None else m.look for m in matches]
    out += [accuracy(weights, features_in(look)[1], model.calibration) for look in looks]
    for n, match, look in zip(sizes, matches, looks, strict=True):
        looked = None if look is None else features_in(look)[0][:n].numpy()
        result = recalibrate_features(model, features_in(None)[0][:n].numpy(), val[1][:n], match, looked)
        tested = features_in(result.calibration.image_look())[1]
        out.append(accuracy(weights if result.weights is None else result.weights, tested, result.calibration))
        print(f"  {run.name}: re-calibrated on {n}: "
              f"{'in the look' if result.calibration.look else 'as they come'}", flush=True)
    for n, look in zip(sizes, looks, strict=True):
        print(f"  {run.name}: look matched on {n} images: "
              f"{'as they come' if look is None else _look_named(look)}", flush=True)
    return out


def _look_named(look) -> str:
    return (f"H {look.haematoxylin:g}, E {look.eosin:g}, blur {look.blur:g}"
            + (f", lamp {look.brightness:g}" if look.brightness != 1 else ""))


def _deploy_section(groups: dict, test_images: np.ndarray, test_labels: np.ndarray, sizes: list[int]) -> list[str]:
    from hemafed.core.data.bloodmnist import load_splits, locate

    first = next(iter(groups))
    val = load_splits(locate(None, size=get_spec(first).input_size))["val"]
    order = np.random.default_rng(0).permutation(len(val.labels))[:max(sizes)]
    held = (val.images[order], np.asarray(val.labels).reshape(-1)[order])
    lines = [
        "## A hospital in the untouched look: its images in the federation's look, then re-calibrated "
        "(`hemafed calibrate`)",
        "",
        "The untouched test split stands for a hospital whose look none of the training hospitals has. From n "
        "images of its own, without their labels, it finds the look (haematoxylin and eosin strength, focus and lamp) "
        "in which their "
        "mean cell-check measurements come closest to the federation's DP mean that the model file carries, and "
        "shows every image in that look before the model sees it (core/learning/look_match.py; \"look matched\" "
        "columns: the federation's weights and calibration otherwise as released). With the labels too "
        "(\"re-calibrated\" columns), it takes the "
        "federation's final model file (the aggregator's), matches the look, re-fits its final layer near the "
        "released one on the images in that look and as they come, and keeps the look only where its re-fit predicts "
        "held-out labelled images at least as well (re-fit: the final layer near the released one, or, "
        "where that does not predict held-out images better, its class offsets alone) and its \"uncertain\" "
        "threshold on n labelled images of its own (`hemafed calibrate`; here the first n of a fixed order of "
        "BloodMNIST's validation split, in the same untouched look; core/learning/head_refit.py and "
        "class_offsets.py: guarded by five folds, against the federation's validation class mix the file carries). "
        "Accuracy of its answers on the untouched test split (mean ± std over seeds):",
        "",
        "| hospitals | model | seeds | as released | "
        + " | ".join(f"look matched on {n}, no labels" for n in sizes) + " | "
        + " | ".join(f"re-calibrated on {n}" for n in sizes) + " |",
        "|---|---|---:|---:|" + "---:|" * 2 * len(sizes),
    ]
    for model, pairs in groups.items():
        got = {}
        for kind, label in (("same", "same look"), ("shifted", "each hospital its own look")):
            got[kind] = np.array([deploy_scores(model, pair[kind == "shifted"], held, (test_images, test_labels),
                                                sizes) for pair in pairs])
            lines.append(f"| {label} | `{model}` | {len(pairs)} | "
                         + " | ".join(_mean_std(col) for col in got[kind].T) + " |")
        loss = 100 * (got["same"][:, 0][:, None] - got["shifted"])
        lines.append(f"| loss against the same look as released (points) | `{model}` | {len(pairs)} | "
                     + " | ".join(_mean_std(col, "") for col in loss.T) + " |")
    return [*lines, ""]


def _mean_std(values, unit: str = "%") -> str:
    values = np.asarray(values, float) * (100 if unit else 1)
    if len(values) == 1:
        return f"{values[0]:+.2f}" if not unit else f"{values[0]:.2f}{unit}"
    sign = "+" if not unit else ""
    return f"{values.mean():{sign}.2f} ± {values.std():.2f}{unit}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--same", type=Path, action="append", required=True,
                   help="a run with every hospital as BloodMNIST has it; repeat for more seeds")
    p.add_argument("--shifted", type=Path, action="append", required=True,
                   help="the same model's run with --appearance shifted, one per --same (the same seeds)")
    p.add_argument("--remedy", type=Path, nargs=2, action="append", default=[], metavar=("SAME", "SHIFTED"),
                   help="a remedy model's pair of runs (its model read from the runs' metrics.json); repeatable, and "
                        "pairs of one model are its seeds")
    p.add_argument("--doc", default="appearance", help="the doc's name in docs/, without .md")
    p.add_argument("--deploy-images", type=int, nargs="*", default=[100, 250, 856],
                   help="a hospital in the untouched look re-calibrates each run's final model file on this many "
                        "labelled images of BloodMNIST's validation split (`hemafed calibrate`), then is scored "
                        "on the untouched test split")
    args = p.parse_args(argv)
    if len(args.same) != len(args.shifted):
        raise SystemExit("give one --shifted run per --same run")
    base = run_model(args.same[0], "scatter_synth_inv_cc_28")
    groups: dict[str, list[tuple[Path, Path]]] = {base: list(zip(args.same, args.shifted, strict=True))}
    for same, shifted in args.remedy:
        groups.setdefault(run_model(same, ""), []).append((same, shifted))
    for model, pairs in groups.items():
        for same, shifted in pairs:
            if not model or {run_model(same, base), run_model(shifted, base)} != {model}:
                raise SystemExit(f"{same} and {shifted}: two runs of {model or 'one model'}, each with its "
                                 "metrics.json")
            if run_seed(same) != run_seed(shifted):
                raise SystemExit(f"{same} and {shifted}: runs of different seeds")
    seeds = sorted({run_seed(same) for pairs in groups.values() for same, _ in pairs}, key=str)
    started = time.perf_counter()
    if len({get_spec(model).input_size for model in groups}) > 1:
        raise SystemExit("the runs' models take different image sizes")
    test = hospitals(SimulationOptions(model=base)).test
    labels = np.asarray(test.labels).reshape(-1)
    keep = np.sort(np.random.default_rng(0).permutation(len(labels))[:PER_LOOK])
    looks = hospital_looks(10, 0)
    looked = [apply_look(test.images[keep], look) for look in looks]

    def scores(model_name: str, run: Path) -> tuple[float, list[float]]:
        store = CheckpointStore(run / "federation" / "state" / "checkpoints")
        weights = store.load(max(store.rounds())).weights
        return (_accuracy(model_name, weights, test.images, labels),
                [_accuracy(model_name, weights, im, labels[keep]) for im in looked])

    table, losses, hospital_rows = [], [], []
    for model, pairs in groups.items():
        remedy = REMEDIES.get(model, model) if model != base else ""
        clean = {}
        for kind, label in (("same", "same look"),
                            ("shifted", "each its own look" if remedy else "each hospital its own look")):
            got = [scores(model, pair[kind == "shifted"]) for pair in pairs]
            clean[kind] = np.array([c for c, _ in got])
            per_look = [a for _, looked_acc in got for a in looked_acc]
            table.append(f"| {label}{', ' + remedy if remedy else ''} | `{model}` | {len(pairs)} | "
                         f"{_mean_std(clean[kind])} | {_mean_std(per_look)} | {min(per_look):.2%} |")
            if all(hospital_files(pair[kind == "shifted"]) for pair in pairs):
                own = [own_look_scores(model, pair[kind == "shifted"], kind == "shifted", test.images[keep],
                                       labels[keep]) for pair in pairs]
                hospital_rows.append((label, model, len(pairs), own))
        losses.append((remedy, 100 * (clean["same"] - clean["shifted"])))
    doc = [
        "# Hospitals whose images look different",
        "",
        "Generated by `python -m bench.appearance"
        + (f" --doc {args.doc}" if args.doc != "appearance" else "")
        + "` ({elapsed}), "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, from {2 * sum(map(len, groups.values()))} "
        "`hemafed simulate` runs (defaults but for the model in the table: 10 hospitals, Dirichlet(0.5), ε = 8, 500 "
        f"rounds; seeds {', '.join(map(str, seeds))}: a seed draws the partition and the hospitals' looks). "
        "What a look is and its range "
        "(drawn uniformly per hospital): `core/data/appearance.py` — "
        + ", ".join(f"{k} {lo:g}…{hi:g}" for k, (lo, hi) in LOOK_RANGE.items()) + ".",
        "",
        "| hospitals | model | seeds | untouched test split (mean ± std over seeds) | test subset in each of seed 0's "
        "ten hospital looks (mean ± std over looks and seeds) | worst look |",
        "|---|---|---:|---:|---:|---:|",
        *table,
        "",
        "Loss on the untouched test split from the hospitals' different looks: "
        + "; ".join(f"{_mean_std(loss, '')} points" + (f" with {remedy}" if remedy else (" without a remedy" if
                    len(losses) > 1 else "")) + (f" (by seed: {', '.join(f'{v:+.2f}' for v in loss)})"
                                                 if len(loss) > 1 else "") for remedy, loss in losses)
        + f" (goal: ≤ 1 point). The per-look column uses {PER_LOOK} test images (the same ones for every look and "
        "run).",
        "",
    ]
    if args.deploy_images:
        doc += _deploy_section(groups, test.images, labels, args.deploy_images)
    if hospital_rows:
        doc += [
            "## Each hospital's own model file, on its own look",
            "",
            "Each hospital's site saves the final model with its calibration, fitted on its own validation images; "
            "that includes its class offsets when the guard keeps them (core/learning/class_offsets.py; "
            "privacy.md, \"Calibration\"). Each file is scored on the same test images rendered in that hospital's "
            "own look (its run's seed draws the looks; untouched when the hospitals look alike): once with the "
            "weights as released, once as its model file answers.",
            "",
            "| hospitals | model | seeds | as released (mean ± std over hospitals and seeds) | the hospital's own "
            "model file | worst hospital, released → own file | files that re-fitted the offsets |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for label, model, n, own in hospital_rows:
            flat = [r for run in own for r in run]
            released, mine = [r[0] for r in flat], [r[1] for r in flat]
            worst = int(np.argmin(released))
            doc.append(f"| {label} | `{model}` | {n} | {_mean_std(released)} | {_mean_std(mine)} | "
                       f"{released[worst]:.2%} → {mine[worst]:.2%} | {sum(r[2] for r in flat)} of {len(flat)} |")
        doc += ["", f"The same {PER_LOOK} test images throughout; the test split is touched once per run.", ""]
    doc[2] = doc[2].replace("{elapsed}", f"{(time.perf_counter() - started) / 60:.0f} min")  # every section's time
    (DOCS / f"{args.doc}.md").write_text("\n".join(doc))
    print("\n".join(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
