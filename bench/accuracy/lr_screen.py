"""The server's step under a plan's realised noise, screened on validation (research script, issue 16).

The recipe's lr = min(1, k/σ) (`core.learning.recipe`) was chosen when every full round carried twice the
accounted noise (threshold t = 6 of 10). With t = 9 a full round carries 1.25 times; this screen asks whether k
should follow. The same runs screen the schedule at a fixed ε (`--rounds`, `--q`: more or fewer, larger or smaller
steps, σ re-calibrated to spend the same budget) and an exponential moving average of the released weights
(`--ema`: decays evaluated on one run's trajectory, post-processing that costs no privacy).
Each run is `hemafed simulate`'s federation in process (`network.sim.inprocess`: the product's round machines,
site trainers, Skellam shares inside secure aggregation, ledgers) at one setting and one seed, evaluated with
the product's 8-view test-time augmentation on BloodMNIST's **validation** split, which no hospital holds
and no reported test number is chosen on.

    python -m bench.accuracy.lr_screen --model scatter_synth_inv_cc_ms4p_looks_hed_64 --eps 8 3 --k 1.3 1.8 2.6
    python -m bench.accuracy.lr_screen --model M --eps 1 --k 1.3 --rounds 250 500 1000 --q 0.1713 0.34 --ema 0.99
    python -m bench.accuracy.lr_screen --model M --eps 8 --k 1.3 --encoder results/cellscenes/enc_cells_looks.npz
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from hemafed.network.sim.simulate import SimulationOptions


@dataclass(frozen=True)
class Run:
    opts: SimulationOptions
    k: float
    emas: tuple[float, ...] = ()
    encoder: str | None = None


_REGISTERED: dict = {}  # the registry entries as shipped, in this worker


def _with_encoder(model: str, encoder: str) -> None:
    """In this worker only: the registry entry `model` builds its model with the procedural encoder `encoder` (a
    weights file) in place of the shipped one, so that a candidate encoder runs through the product's federation
    before it is shipped. The feature cache keys on the encoder's digest, so no features are mixed up."""
    from dataclasses import replace as replace_spec

    from hemafed.core.learning import models

    spec = _REGISTERED.setdefault(model, models.MODELS[model])  # a worker's later runs wrap the original, once

    def factory(num_classes: int):
        net = spec.factory(num_classes)
        net.encoder = encoder
        return net

    models.MODELS[model] = replace_spec(spec, factory=factory)


def _one(run: Run) -> list[dict]:
    """In a worker: σ from the plan, lr = min(1, k/σ), the federation, validation accuracy of its final model
    (ema 0) and of each moving average of its weights over the rounds."""
    import torch

    from hemafed.core.data.bloodmnist import load_splits, locate
    from hemafed.core.learning.dp_train import accuracy, evaluate
    from hemafed.core.learning.models import set_flat_params
    from hemafed.network.sim.inprocess import simulate_in_process
    from hemafed.network.sim.simulate import evaluation_inputs, hospitals

    torch.set_num_threads(1)
    if run.encoder:
        _with_encoder(run.opts.model, run.encoder)
    sigma = hospitals(run.opts).plan.noise_multiplier
    opts = replace(run.opts, server_lr=round(min(1.0, run.k / sigma), 3))
    averages: dict[float, np.ndarray] = {}

    def average(_outcome, weights: np.ndarray) -> None:
        w = np.asarray(weights, np.float64)
        for d in run.emas:
            averages[d] = w if d not in averages else d * averages[d] + (1 - d) * w

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hemafed-lr-") as state:
        result, h = simulate_in_process(opts, Path(state), threads=1, on_round=average)
    seconds = time.perf_counter() - started
    val = load_splits(locate(opts.data, size=h.plan.input_size))["val"]
    trainable, inputs = evaluation_inputs(h.plan, val.images)
    out = []
    for d, weights in [(0.0, result.weights), *averages.items()]:
        set_flat_params(trainable, np.asarray(weights, np.float32))
        out.append({"appearance": opts.appearance, "epsilon": opts.epsilon, "k": run.k,
                    "rounds": opts.planned_rounds, "q": opts.sample_rate,
                    "val_fraction": opts.val_fraction,
                    "ema": d, "seed": opts.seed, "sigma": sigma, "server_lr": opts.server_lr,
                    "threshold": h.plan.threshold,
                    "val_accuracy": accuracy(evaluate(trainable, inputs, val.labels, len(h.plan.classes))),
                    "seconds": seconds})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--eps", type=float, nargs="+", default=[8.0, 3.0])
    ap.add_argument("--k", type=float, nargs="+", required=True, help="lr·σ values to screen")
    ap.add_argument("--rounds", type=int, nargs="+", default=[None], help="default: the recipe's for each budget")
    ap.add_argument("--q", type=float, nargs="+", default=[SimulationOptions.sample_rate], help="Poisson rates")
    ap.add_argument("--ema", type=float, nargs="*", default=[], help="EMA decays to evaluate besides the last weights")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--val-fraction", type=float, nargs="+", default=[SimulationOptions.val_fraction],
                    help="of each hospital's images kept back as its validation split")
    ap.add_argument("--appearance", nargs="+", default=["same"], choices=("same", "shifted"),
                    help="the hospitals' looks (simulate --appearance); validation stays as it is")
    ap.add_argument("--threshold", type=int, default=None, help="default: simulate's (all sites but one)")
    ap.add_argument("--encoder", type=Path, default=None,
                    help="the model with this procedural encoder (.npz) in place of the shipped one (research)")
    ap.add_argument("--data", type=Path)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("/tmp/lr_screen.json"))
    args = ap.parse_args()

    base = SimulationOptions(model=args.model, threshold=args.threshold, data=args.data, quiet=True)
    emas = tuple(d for d in args.ema if d)
    runs = [Run(replace(base, epsilon=e, seed=s, rounds=t, sample_rate=q, val_fraction=v, appearance=a), k, emas,
                str(args.encoder) if args.encoder else None)
            for a in args.appearance for v in args.val_fraction for e in args.eps for t in args.rounds
            for q in args.q for k in args.k for s in args.seeds]
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=get_context("spawn")) as pool:
        results = [row for rows in pool.map(_one, runs) for row in rows]
    args.out.write_text(json.dumps(results, indent=1))
    print(f"{args.model}{f' with {args.encoder}' if args.encoder else ''}, t = {results[0]['threshold']}, "
          f"validation, seeds {args.seeds}")
    print("| hospitals | hospitals' validation share | ε | T | q | σ | lr·σ | server lr | EMA | validation accuracy "
          "| s/run |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    fields = ("appearance", "val_fraction", "epsilon", "rounds", "q", "k", "ema")
    for key in dict.fromkeys(tuple(r[f] for f in fields) for r in results):
        rs = [r for r in results if tuple(r[f] for f in fields) == key]
        accs = [100 * r["val_accuracy"] for r in rs]
        a, v, e, t, q, k, d = key
        print(f"| {a} | {v:g} | {e:g} | {t} | {q:g} | {rs[0]['sigma']:.2f} | {k:g} | {rs[0]['server_lr']:.3f} | "
              f"{d:g} | {statistics.mean(accs):.2f} ± {statistics.pstdev(accs):.2f} % | "
              f"{statistics.mean(r['seconds'] for r in rs):.0f} |")


if __name__ == "__main__":
    main()
