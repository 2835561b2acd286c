"""Screen: hospitals that look different — does re-fitting the head's 8 biases on a hospital's own labelled images
take the shift's loss away? (research script, issue 18)

A look (stain, lamp, focus, scale) moves every image's features by roughly the same offset, and a linear head turns a
constant offset into a constant shift of each class's score: what a bias absorbs. The federation's head is trained
on its hospitals' looks; a hospital whose images look otherwise could re-fit the 8 biases, locally, on its own
labelled validation images (the split every hospital keeps back), as it fits its abstention threshold today.

The proxy of `bench.accuracy.pca_screen` (central DP-SGD on the hospitals' training splits with the federation's
noise, ten-round centre, the default head's block weights 3, 1, 1, the recipe's rounds and step) trained on
`hemafed simulate`'s hospitals alike or each in its own look (`--appearance shifted`, simulation seed S); the
untouched validation split is halved: the first half are the deploying hospital's labelled images (the first N of
them fit the biases by maximum likelihood, the weights W and the centre untouched), the second half are judged.

    python -m bench.accuracy.bias_refit_screen --eps 8 --sim-seeds 0 1 2 --fit-images 100 250 856
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from bench.accuracy.pca_screen import (
    SHARE,
    _centre_scheme,
    _rescale,
    fit_head,
    head_logits,
    noisy_centre,
    round_noise,
    sites_training,
)
from hemafed.core.data.bloodmnist import load_splits, locate
from hemafed.core.learning.models import build_model, split_features
from hemafed.core.learning.site_trainer import model_inputs
from hemafed.core.rounds.plan import FederationPlan
from hemafed.network.sim.simulate import SimulationOptions, hospitals


def mix_weights(labels: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor | None:
    """Per-image weights that give these images the class mix `target` (None: as they come); a class this hospital
    has no image of gets none."""
    if target is None:
        return None
    counts = torch.bincount(labels, minlength=len(target)).double()
    per_class = torch.where(counts > 0, target / counts.clamp(min=1), torch.zeros_like(target))
    w = per_class[labels]
    return w * len(labels) / w.sum()


def refit_bias(logits: torch.Tensor, labels: torch.Tensor, prior_std: float | None = None,
               target: torch.Tensor | None = None) -> torch.Tensor:
    """Per-class offsets b minimising the cross-entropy of `logits` + b on `labels` (b sums to zero); with
    `prior_std` τ, the posterior mode under a Gaussian prior b ~ N(0, τ²) (shrunk towards the released biases);
    with `target`, the images weighted to that class mix (the offsets then learn the look, not the mix)."""
    b = torch.zeros(logits.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([b], max_iter=200, line_search_fn="strong_wolfe")
    w = mix_weights(labels, target)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        ce = torch.nn.functional.cross_entropy(logits + b, labels, reduction="none")
        loss = (ce if w is None else ce * w).mean()
        if prior_std:
            loss = loss + (b * b).sum() / (2 * prior_std ** 2 * len(labels))
        loss.backward()
        return loss

    opt.step(closure)
    return (b - b.mean()).detach()


def guarded_refit(logits: torch.Tensor, labels: torch.Tensor, prior_std: float | None = None,
                  folds: int = 5, target: torch.Tensor | None = None) -> torch.Tensor:
    """`refit_bias` on all of `labels`, kept only if it predicts held-out images better than the released biases:
    the summed cross-entropy over `folds` folds, each fitted on the others, must fall below that of b = 0."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(11))
    refit_loss = released_loss = 0.0
    for part in order.chunk(folds):
        rest = order[~torch.isin(order, part)]
        b = refit_bias(logits[rest], labels[rest], prior_std, target)
        w = mix_weights(labels[part], target)
        w = torch.ones(len(part), dtype=torch.float64) if w is None else w
        ce = torch.nn.functional.cross_entropy
        refit_loss += float((ce(logits[part] + b, labels[part], reduction="none") * w).sum())
        released_loss += float((ce(logits[part], labels[part], reduction="none") * w).sum())
    if refit_loss < released_loss:
        return refit_bias(logits, labels, prior_std, target)
    return torch.zeros(logits.shape[1], dtype=torch.float64)


def _proxy(h, model, eps: float, radius: float):
    """The proxy federation of simulated hospitals `h`: their training features and labels, and per noise seed the
    head (`head(seed)` → (weights, centre)) as the eighth pass trains it."""
    from hemafed.core.learning.recipe import lr_times_sigma, recommended_plan

    images, labels = sites_training(h)
    xt = model_inputs(h.plan, model, images, "train").double()
    yt = torch.as_tensor(labels.reshape(-1)).long()
    fed = recommended_plan(eps, len(yt), 10)
    noise = round_noise(fed)
    error, share, rounds = _centre_scheme("R:10", SHARE, fed.rounds)  # the product's ten-round centre
    k = lr_times_sigma(fed.model, eps, fed.rounds)

    def head(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        centre = noisy_centre(xt.mean(0), error, noise, fed, radius, seed)
        zt, _ = _rescale("block:3,1,1", xt - centre, xt[:1] - centre, xt)
        return fit_head(zt, yt, len(fed.classes), fed.noise_multiplier, noise, fed.sample_rate, rounds, k, seed,
                        share), centre

    return xt, head


def main() -> None:

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--eps", type=float, default=8.0)
    ap.add_argument("--sim-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="noise seeds")
    ap.add_argument("--fit-images", type=int, nargs="+", default=[100, 250, 856])
    ap.add_argument("--prior-std", type=float, nargs="*", default=[],
                    help="also re-fit with a Gaussian prior of this std on each bias offset (besides maximum "
                         "likelihood)")
    ap.add_argument("--guard", action="store_true",
                    help="also each re-fit kept only if 5-fold held-out cross-entropy beats the released biases")
    ap.add_argument("--deploy", choices=("held-out", "sites"), default="held-out",
                    help="held-out: a hospital holding half the untouched validation split re-fits and the other "
                         "half is judged; sites: each simulated hospital re-fits on its own validation split (its "
                         "look, its class mix) and is judged on untouched validation images in its look")
    ap.add_argument("--judged", type=int, default=300, help="--deploy sites: images judged per hospital")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bias_refit_screen.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.deploy == "sites":
        _sites(args)
        return

    plan = FederationPlan()  # the default model; its features are what every hospital and the screen compute
    model = build_model(plan.model)
    val = load_splits(locate(None, size=plan.input_size))["val"]
    xv = model_inputs(plan, model, val.images, "eval").double()
    yv = torch.as_tensor(np.asarray(val.labels).reshape(-1)).long()
    order = torch.randperm(len(yv), generator=torch.Generator().manual_seed(7))
    own, judged = order[: len(yv) // 2], order[len(yv) // 2:]
    radius = split_features(model)[1].radius
    rows = []
    for sim_seed in args.sim_seeds:
        for appearance in ("same", "shifted"):
            h = hospitals(SimulationOptions(quiet=True, seed=sim_seed, appearance=appearance))
            xt, head = _proxy(h, model, args.eps, radius)
            for seed in args.seeds:
                started = time.perf_counter()
                w, centre = head(seed)
                logits = head_logits(w, _rescale("block:3,1,1", xt - centre, xv - centre, xt)[1])
                row = {"sim_seed": sim_seed, "appearance": appearance, "seed": seed, "epsilon": args.eps,
                       "released": float((logits[judged].argmax(1) == yv[judged]).double().mean())}
                for n in args.fit_images:
                    for tau in [None, *args.prior_std]:
                        for guard in (False, True) if args.guard else (False,):
                            b = (guarded_refit if guard else refit_bias)(logits[own[:n]], yv[own[:n]], tau)
                            name = f"refit_{n}" + (f"_prior_{tau:g}" if tau else "") + ("_guarded" if guard else "")
                            row[name] = float(((logits[judged] + b).argmax(1) == yv[judged]).double().mean())
                row["seconds"] = time.perf_counter() - started
                rows.append(row)
                print(json.dumps(row), flush=True)
    args.out.write_text(json.dumps(rows, indent=1))
    _table(rows)


def _sites(args: argparse.Namespace) -> None:
    """Each hospital of the simulation re-fits its biases on its own validation split, in its own look and class mix
    (what the product's hospitals hold), plainly or weighted to the federation's validation class mix (the row sums
    of the validation confusion counts every round already opens), with a prior τ = 1 and the guard. Judged: the
    second half of the untouched validation split, rendered in that hospital's look (`--judged` images)."""
    from hemafed.core.data.appearance import apply_look, hospital_looks
    from hemafed.core.learning.class_offsets import refit_offsets
    from hemafed.core.learning.confidence import fit_temperature

    plan = FederationPlan()
    model = build_model(plan.model)
    val = load_splits(locate(None, size=plan.input_size))["val"]
    order = np.random.default_rng(7).permutation(len(val.labels))
    judged = order[len(order) // 2:][: args.judged]
    yj = torch.as_tensor(np.asarray(val.labels).reshape(-1)[judged]).long()
    radius = split_features(model)[1].radius
    untouched = model_inputs(plan, model, val.images[judged], "eval").double()
    rows = []
    for sim_seed in args.sim_seeds:
        for appearance in ("same", "shifted"):
            h = hospitals(SimulationOptions(quiet=True, seed=sim_seed, appearance=appearance))
            xt, head = _proxy(h, model, args.eps, radius)
            sites = list(h.site_data().values())
            site_val = [(model_inputs(h.plan, model, d.val_images, "eval").double(),
                         torch.as_tensor(np.asarray(d.val_labels).reshape(-1)).long()) for d in sites]
            counts = torch.bincount(torch.cat([y for _, y in site_val]), minlength=len(plan.classes)).double()
            target = counts / counts.sum()
            looks = hospital_looks(len(sites), sim_seed)
            xj = [untouched if appearance == "same" else
                  model_inputs(h.plan, model, apply_look(val.images[judged], look), "eval").double() for look in looks]
            for seed in args.seeds:
                w, centre = head(seed)

                def logits_of(x: torch.Tensor, w=w, centre=centre, xt=xt) -> torch.Tensor:
                    return head_logits(w, _rescale("block:3,1,1", xt - centre, x - centre, xt)[1])

                site_logits = [logits_of(xv) for xv, _ in site_val]
                # the federation's temperature: fitted on every hospital's validation images
                t = fit_temperature(torch.cat(site_logits).numpy(), torch.cat([y for _, y in site_val]).numpy())
                for i, ((_, yv), lv, x) in enumerate(zip(site_val, site_logits, xj, strict=True)):
                    lj = logits_of(x)
                    row = {"sim_seed": sim_seed, "appearance": appearance, "seed": seed, "site": i,
                           "val_images": len(yv), "released": float((lj.argmax(1) == yj).double().mean())}
                    product = refit_offsets(lv.numpy(), yv.numpy(), counts.numpy(), t)
                    for name, b in (("plain", guarded_refit(lv, yv, 1.0)),
                                    ("weighted", guarded_refit(lv, yv, 1.0, target=target)),
                                    ("product", torch.tensor(product.offsets or [0.0] * len(counts)))):
                        row[name] = float(((lj + b).argmax(1) == yj).double().mean())
                        row[name + "_kept"] = bool(b.abs().sum() > 0)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    args.out.write_text(json.dumps(rows, indent=1))
    cols = ["released", "plain", "weighted", "product"]
    print("| simulation seed | hospitals | " + " | ".join(cols) + " |")
    for sim_seed in args.sim_seeds:
        for appearance in ("same", "shifted"):
            sel = [r for r in rows if r["sim_seed"] == sim_seed and r["appearance"] == appearance]
            cells = [f"{100 * statistics.mean(r[c] for r in sel):.2f} (min {100 * min(r[c] for r in sel):.1f}, "
                     f"kept {sum(r.get(c + '_kept', 0) for r in sel)})" for c in cols]
            print(f"| {sim_seed} | {appearance} | " + " | ".join(cells) + " |")


def _table(rows: list[dict]) -> None:
    cols = ["released"] + [c for c in rows[0] if c.startswith("refit_")]
    refits = " | ".join("biases re-fitted on " + c[6:].replace("_prior_", " images, prior std ").replace(
        "_guarded", ", guarded") for c in cols[1:])
    print(f"| simulation seed | hospitals | as released | {refits} |")
    print("|---:|---|" + "---:|" * len(cols))
    for sim_seed in sorted({r["sim_seed"] for r in rows}):
        means = {}
        for appearance in ("same", "shifted"):
            sel = [r for r in rows if r["sim_seed"] == sim_seed and r["appearance"] == appearance]
            means[appearance] = {c: statistics.mean(r[c] for r in sel) for c in cols}
            cells = [f"{100 * means[appearance][c]:.2f} ± {100 * statistics.pstdev([r[c] for r in sel]):.2f} %"
                     for c in cols]
            label = "alike" if appearance == "same" else "each its own look"
            print(f"| {sim_seed} | {label} | " + " | ".join(cells) + " |")
        print(f"| {sim_seed} | loss | " + " | ".join(
            f"{100 * (means['same'][c] - means['shifted'][c]):.2f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
