"""Screen: a deploying hospital re-fits one scale per feature block (3 numbers) beside its 8 class offsets
(research script, issue 18; docs/appearance-remedies.md, ninth pass).

The head's scores are the sum of three blocks' contributions (`MULTISCALE_BLOCK_WEIGHTS`: the stain-density
scattering, the two procedural maps). A look can change how strongly each block speaks, which an offset cannot
undo. For each run's final model file (the aggregator's, as `hemafed calibrate` reads it): fitted on the first n of
one half of BloodMNIST's validation split (seed 7's order), judged on the other half; the offsets as the product
fits them (`core.learning.class_offsets`), or offsets and log-scales together (priors: std 1 on each offset, 0.5 on
each log-scale), kept only when five folds say they predict held-out images better. Validation only.

    python -m bench.accuracy.block_scale_screen results/appear/same-s0 results/appear/shifted-s0 ...

With `--head TAU…`, instead: every weight of the head re-fitted beside the offsets as `hemafed calibrate` does
(`core.learning.head_refit`), under a Gaussian prior of std TAU·(the released weights' root mean square) centred on
the released weights, guarded by the same five folds; n = 250 and 856.

With `--guards`, instead: the offsets alone, kept when the five folds' mean held-out improvement is above 0 (the
product), one standard error or two; three random draws of n = 100 and 250 labelled images from the fitting half.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import torch


def fit_scaled(parts: torch.Tensor, bias: torch.Tensor, labels: np.ndarray, shift: np.ndarray,
               temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales, offsets) for `parts` (N, blocks, classes), the fixed mix `shift` added as the product does."""
    y, s = torch.as_tensor(labels), torch.as_tensor(shift)
    log_scale = torch.zeros(parts.shape[1], dtype=torch.float64, requires_grad=True)
    offsets = torch.zeros(parts.shape[2], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_scale, offsets], max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = (parts * log_scale.exp()[None, :, None]).sum(1) + bias + offsets
        prior = (offsets ** 2).sum() / 2 + (log_scale ** 2).sum() / (2 * 0.5 ** 2)
        loss = torch.nn.functional.cross_entropy(logits / temperature + s, y) + prior / len(y)
        loss.backward()
        return loss

    opt.step(closure)
    return log_scale.detach().exp(), (offsets - offsets.mean()).detach()


def _head_rows(z: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, logits: np.ndarray, y: np.ndarray,
               fit: np.ndarray, judged: np.ndarray, mix: np.ndarray, t: float, taus: list[float]) -> dict:
    """The product's guarded whole-layer re-fit (`core.learning.head_refit.refit_head`) at each prior scale."""
    from hemafed.core.learning.head_refit import refit_head

    row = {"released": float((logits[judged].argmax(1) == y[judged]).mean())}
    for n, tau in itertools.product((250, 856), taus):
        mine = fit[:n]
        got = refit_head(z[mine].numpy(), w.numpy(), bias.numpy(), y[mine], mix, t, prior_scale=tau)
        answer = z.numpy() @ got.weight.T + got.bias if got.kept else logits
        row[f"head_{n}_tau{tau:g}"] = float((answer[judged].argmax(1) == y[judged]).mean())
    return row


def _scaled(parts: torch.Tensor, bias: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor) -> np.ndarray:
    return ((parts * scales[None, :, None]).sum(1) + bias + offsets).numpy()


def _loss(logits: np.ndarray, labels: np.ndarray, temperature: float, shift: np.ndarray) -> float:
    z = torch.as_tensor(logits) / temperature + torch.as_tensor(shift)
    return float(torch.nn.functional.cross_entropy(z, torch.as_tensor(labels), reduction="sum"))


def _guards(logits: np.ndarray, y: np.ndarray, fit: np.ndarray, judged: np.ndarray, mix: np.ndarray,
            t: float) -> dict[str, float]:
    from hemafed.core.learning.class_offsets import fit_offsets, mix_shift

    row = {"released": float((logits[judged].argmax(1) == y[judged]).mean())}
    for n in (100, 250, 856):
        for draw in range(3 if n < len(fit) else 1):
            mine = np.random.default_rng(100 + draw).permutation(fit)[:n] if n < len(fit) else fit
            lg, lb = logits[mine], y[mine]
            shift = mix_shift(lb, mix)
            gain = np.zeros(n)  # held-out loss of the released scores minus the re-fitted, per image
            for part in np.array_split(np.random.default_rng(11).permutation(n), 5):
                rest = np.setdiff1d(np.arange(n), part)
                b = fit_offsets(lg[rest], lb[rest], shift, t)
                for sign, z in ((1, lg[part]), (-1, lg[part] + b)):
                    gain[part] += sign * torch.nn.functional.cross_entropy(
                        torch.as_tensor(z / t + shift), torch.as_tensor(lb[part]), reduction="none").numpy()
            b = fit_offsets(lg, lb, shift, t)
            se = gain.std(ddof=1) / np.sqrt(n)
            for name, margin in (("above_0", 0.0), ("above_1se", se), ("above_2se", 2 * se)):
                answer = logits + (b if gain.mean() > margin else 0.0)
                key = f"{name}_{n}"
                row[key] = row.get(key, 0.0) + float((answer[judged].argmax(1) == y[judged]).mean()) / (
                    3 if n < len(fit) else 1)
    return row


def main() -> None:
    from hemafed.core.data.bloodmnist import load_splits, locate
    from hemafed.core.learning.class_offsets import mix_shift, refit_offsets
    from hemafed.core.learning.classify import load_model_file
    from hemafed.core.learning.models import MULTISCALE_BLOCK_WEIGHTS, build_model, set_flat_params, split_features
    from hemafed.core.learning.site_trainer import model_inputs
    from hemafed.network.sim.simulate import SimulationOptions

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="`hemafed simulate` results folders")
    ap.add_argument("--guards", action="store_true", help="screen stricter guards for the offsets instead")
    ap.add_argument("--head", type=float, nargs="*", default=None,
                    help="re-fit the whole head instead, under priors of these stds (times the weights' rms)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    plan = SimulationOptions().plan()
    model = build_model(plan.model, len(plan.classes))
    head = split_features(model)[1]
    val = load_splits(locate(None, size=plan.input_size))["val"]
    order = np.random.default_rng(7).permutation(len(val.labels))
    fit, judged = order[:856], order[856:]
    y = np.asarray(val.labels).reshape(-1)
    with torch.no_grad():
        x = model_inputs(plan, model, val.images, "eval")
    edges = np.cumsum([0] + [n for n, _ in MULTISCALE_BLOCK_WEIGHTS])
    for run in args.runs:
        path = run / "final_model.npz"
        cal = load_model_file(path).calibration
        set_flat_params(head, np.load(path)["weights"])
        with torch.no_grad():
            z, w = head.centred_inputs(x).double(), head.linear.weight.double()
            bias = head.linear.bias.double()
        parts = torch.stack([z[:, a:b] @ w[:, a:b].T for a, b in itertools.pairwise(edges)], 1)
        t, mix = cal.temperature, np.asarray(cal.federation_classes)
        logits = (parts.sum(1) + bias).numpy()
        if args.head:
            print(json.dumps({"run": str(run), **_head_rows(z, w, bias, logits, y, fit, judged, mix, t, args.head)}),
                  flush=True)
            continue
        if args.guards:
            print(json.dumps({"run": str(run), **_guards(logits, y, fit, judged, mix, t)}), flush=True)
            continue
        row = {"run": str(run), "released": float((logits[judged].argmax(1) == y[judged]).mean())}
        for n in (250, 856):
            mine = fit[:n]
            got = refit_offsets(logits[mine], y[mine], mix, t)
            adjusted = logits + (np.asarray(got.offsets) if got.kept else 0.0)
            row[f"offsets_{n}"] = float((adjusted[judged].argmax(1) == y[judged]).mean())
            shift = mix_shift(y[mine], mix)
            folds = np.array_split(np.random.default_rng(11).permutation(n), 5)
            released = refitted = 0.0
            for part in folds:
                rest = np.setdiff1d(np.arange(n), part)
                scales, offsets = fit_scaled(parts[mine][rest], bias, y[mine][rest], shift, t)
                refitted += _loss(_scaled(parts[mine][part], bias, scales, offsets), y[mine][part], t, shift)
                released += _loss(logits[mine][part], y[mine][part], t, shift)
            scales, offsets = fit_scaled(parts[mine], bias, y[mine], shift, t)
            answer = _scaled(parts, bias, scales, offsets) if refitted < released else logits
            row[f"scaled_{n}"] = float((answer[judged].argmax(1) == y[judged]).mean())
            row[f"scales_{n}"] = [round(float(v), 3) for v in scales]
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
