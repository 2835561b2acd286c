"""`hemafed experiment`: the privacy–utility comparison behind docs/RESULTS.md.

Rows (test split, which no hospital holds; every private row at δ = 1e-5 per hospital record):
centralised (non-private, DP-SGD at each ε), one hospital alone (the median-sized hospital of
each seed's partition; non-private and DP-SGD), and the federation of `hemafed simulate`'s
recipe — DP-FedSGD on the model's fixed features — non-private, with local DP, and with
distributed DP inside secure aggregation, for each partition and ε, over several seeds; an ε
sweep for the plot; and one real run of the README's main job (`Simulation`, processes and
TLS websockets) with its defaults. The private rows run in process (`network.sim.inprocess`:
the same arithmetic, masks left out because they cancel).
"""

from __future__ import annotations

import json
import logging
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from hemafed.network.sim.inprocess import FeatureSet, Recipe, hospitals, load_features, run_fedsgd
from hemafed.network.sim.simulate import Simulation, SimulationOptions

log = logging.getLogger(__name__)

DELTA = 1e-5


@dataclass(frozen=True)
class ExperimentOptions:
    data: Path | None = None
    seeds: tuple[int, ...] = (0, 1, 2)
    epsilons: tuple[float, ...] = (3.0, 8.0)  # headline rows, every partition
    sweep: tuple[float, ...] = (1.0, 2.0, 3.0, 5.0, 8.0)  # the plot (main partition only)
    partitions: tuple[str, ...] = ("dirichlet:0.5", "iid")  # the first is the main one
    sites: int = 10
    base: SimulationOptions = field(default_factory=SimulationOptions)  # the main job's recipe
    # non-private rows: tuned separately on validation (docs/accuracy-levers.md): smaller steps, more of them
    np_rounds: int = 1000
    np_batch: int = 256
    np_lr: float = 0.05
    alone_np_sample_rate: float = 0.2
    main_job: bool = True
    threads: int = 2


@dataclass
class Row:
    section: str  # "central" | "alone" | "federated" | "sweep" | "main job"
    setting: str
    partition: str
    epsilon: float | None  # None: non-private
    sigma: float | None
    accuracies: list[float]
    seconds: list[float]
    note: str = ""

    @property
    def mean(self) -> float:
        return float(np.mean(self.accuracies))

    @property
    def std(self) -> float:
        return float(np.std(self.accuracies)) if len(self.accuracies) > 1 else 0.0

    def cell(self) -> str:
        if len(self.accuracies) == 1:
            return f"{self.mean:.3f}"
        return f"{self.mean:.3f} ± {self.std:.3f}"


class _Sigmas:
    """σ for each (ε, mechanism), from the same code that plans the main job."""

    def __init__(self, base: SimulationOptions, sizes: list[int], dim: int) -> None:
        self.base, self.sizes, self.dim = base, sizes, dim
        self._cache: dict[tuple[float, str], float] = {}

    def __call__(self, epsilon: float, mode: str) -> float:
        key = (epsilon, mode)
        if key not in self._cache:
            opts = replace(self.base, epsilon=epsilon, dp_mode=mode, dp=True, secagg=True, delta=DELTA)
            self._cache[key] = opts.plan(self.sizes, self.dim).noise_multiplier
        return self._cache[key]


def run_experiment(opts: ExperimentOptions, out: Path, doc: Path, command: str,
                   features: FeatureSet | None = None) -> list[Row]:
    import torch

    torch.set_num_threads(opts.threads)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    feats = features if features is not None else load_features(opts.data, opts.base.model, out / "features")
    labels = feats.train_y.numpy()
    base = replace(opts.base, sites=opts.sites, delta=DELTA)
    from hemafed.core.learning.models import build_model, split_features
    from hemafed.core.learning.recipe import server_lr_for

    dim = sum(p.numel() for p in split_features(build_model(base.model, 8))[1].parameters())  # center included
    first = hospitals(labels, opts.sites, opts.partitions[0], opts.seeds[0])
    sigma = _Sigmas(base, [len(p) for p in first], dim)
    q, T = base.sample_rate, base.rounds

    def lr(s: float) -> float:  # the main job's rule for every private row (core.recipe)
        return server_lr_for(s) if base.server_lr is None else base.server_lr
    rows: list[Row] = []

    def record(row: Row) -> None:
        rows.append(row)
        log.info("%s | %s | %s | ε %s: %s", row.section, row.setting, row.partition, row.epsilon, row.cell())
        (out / "results.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
        write_results(doc, rows, opts, feats, command, time.time() - started, partial=True)

    def seeds_run(section: str, setting: str, partition: str, eps: float | None, s: float | None,
                  make: Callable[[int], tuple[list[np.ndarray], Recipe]], note: str = "") -> None:
        accs, secs = [], []
        for seed in opts.seeds:
            parties, recipe = make(seed)
            res = run_fedsgd(feats, parties, recipe, seed)
            accs.append(res.accuracy)
            secs.append(res.seconds)
        record(Row(section, setting, partition, eps, s, accs, secs, note))

    def parts(partition: str) -> Callable[[int], list[np.ndarray]]:
        return lambda seed: hospitals(labels, opts.sites, partition, seed)

    main = opts.partitions[0]
    everyone = lambda seed: [np.concatenate(parts(main)(seed))]  # noqa: E731 (centralised: one party)

    def median_hospital(seed: int) -> list[np.ndarray]:
        ps = sorted(parts(main)(seed), key=len)
        return [ps[len(ps) // 2]]

    n_all = sum(len(p) for p in first)
    np_q = opts.np_batch / n_all
    np_recipe = Recipe(opts.np_rounds, np_q, opts.np_lr, privacy="none")

    seeds_run("central", "centralised, non-private", "–", None, None, lambda s: (everyone(s), np_recipe))
    for eps in opts.epsilons:
        sg = sigma(eps, "local")
        seeds_run("central", "centralised, DP-SGD", "–", eps, sg,
                  lambda s, sg=sg: (everyone(s), Recipe(T, q, lr(sg), privacy="central", sigma=sg)))
    seeds_run("alone", "one hospital alone (median size), non-private", main, None, None,
              lambda s: (median_hospital(s), replace(np_recipe, sample_rate=opts.alone_np_sample_rate)))
    for eps in opts.epsilons:
        sg = sigma(eps, "local")
        seeds_run("alone", "one hospital alone (median size), DP-SGD", main, eps, sg,
                  lambda s, sg=sg: (median_hospital(s), Recipe(T, q, lr(sg), privacy="central", sigma=sg)))
    shares = base.plan()
    t, c = shares.threshold, shares.dp_colluders
    for partition in opts.partitions:
        split = parts(partition)
        seeds_run("federated", "DP-FedSGD, non-private", partition, None, None, lambda s, f=split: (f(s), np_recipe))
        for eps in opts.epsilons:
            for mode in ("local", "distributed"):
                sg = sigma(eps, mode)
                recipe = Recipe(T, q, lr(sg), privacy=mode, sigma=sg, threshold=t, colluders=c)
                seeds_run("federated", _federated_setting(mode), partition, eps, sg,
                          lambda s, f=split, r=recipe: (f(s), r))
    for eps in opts.sweep:
        if eps in opts.epsilons:
            continue
        for mode in ("local", "distributed"):
            sg = sigma(eps, mode)
            recipe = Recipe(T, q, lr(sg), privacy=mode, sigma=sg, threshold=t, colluders=c)
            seeds_run("sweep", _federated_setting(mode), main, eps, sg, lambda s, r=recipe: (parts(main)(s), r))
    if opts.main_job:
        run_opts = replace(base, data=opts.data, out=out / "main-job", quiet=True, partition=main,
                           seed=opts.seeds[0])
        log.info("the main job, a real federation: %s", run_opts)
        metrics = Simulation(run_opts, command="hemafed simulate").run()
        final = metrics["final"]
        record(Row("main job", "`hemafed simulate` (defaults): 10 processes, TLS websockets, secure aggregation, "
                   "distributed DP", main, base.epsilon, metrics.get("plan", {}).get("noise_multiplier"),
                   [final["test_accuracy"]], [final["wall_s"]],
                   note=f"largest ε spent {final['max_epsilon']:.3f}"))
    write_results(doc, rows, opts, feats, command, time.time() - started, partial=False)
    return rows


def _federated_setting(mode: str) -> str:
    return ("DP-FedSGD + distributed DP (Skellam shares inside secure aggregation)" if mode == "distributed"
            else "DP-FedSGD + local DP (each hospital adds σC) + secure aggregation")


# ---------------------------------------------------------------------------------------------- the document


def _find(rows: list[Row], section: str, epsilon: float | None, partition: str | None = None,
          mode: str | None = None) -> Row | None:
    for r in rows:
        if r.section == section and r.epsilon == epsilon and (partition is None or r.partition == partition) \
                and (mode is None or r.setting == _federated_setting(mode)):
            return r
    return None


def _summary(rows: list[Row], opts: ExperimentOptions) -> list[str]:
    """The headline in words, computed from the rows (so it cannot drift from the tables)."""
    main = opts.partitions[0]
    out = []
    alone_np = _find(rows, "alone", None)
    central_np = _find(rows, "central", None)
    for eps in opts.epsilons:
        fed = _find(rows, "federated", eps, main, "distributed")
        if fed is None:
            continue
        parts = [f"at ε = {eps:g}: **{fed.mean:.1%}** ± {fed.std:.1%} (distributed DP, {main})"]
        local = _find(rows, "federated", eps, main, "local")
        alone = _find(rows, "alone", eps)
        if local:
            parts.append(f"local DP {local.mean:.1%}")
        if alone:
            parts.append(f"the median hospital alone at the same ε {alone.mean:.1%}")
        if alone_np:
            parts.append(f"and without any privacy {alone_np.mean:.1%}")
        out.append("- " + ", ".join(parts) + ".")
    if central_np:
        out.append(f"- Centralised, non-private, same model: {central_np.mean:.1%} (the ceiling of these features).")
    return ["## Summary", "", *out, ""] if out else []


def _eps(e: float | None) -> str:
    return "∞ (non-private)" if e is None else f"{e:g}"


def _sigma(s: float | None) -> str:
    return "–" if s is None else f"{s:.3f}"


def write_results(doc: Path, rows: list[Row], opts: ExperimentOptions, feats: FeatureSet, command: str,
                  wall_s: float, *, partial: bool) -> None:
    base = replace(opts.base, sites=opts.sites)
    plan = base.plan()
    seeds = ", ".join(str(s) for s in opts.seeds)
    from hemafed.core.learning.models import get_spec

    centring = ", on features centred by their average, which each run's first round estimates as a clipped, " \
        "noised sum under the same protection as a training round" if get_spec(base.model).centred else ""
    lines = ["# Results: private federated learning on BloodMNIST", ""]
    if partial:
        lines += ["**Incomplete: the experiment is still running or was interrupted.**", ""]
    lines += [
        f"Command: `{command}` — {wall_s / 60:.0f} min in all on {platform.machine()}, 2 CPU cores, no GPU "
        f"(fixed features {feats.seconds / 60:.1f} min, once).", "",
        "Data: `bloodmnist_28.npz` (a rebuild of BloodMNIST from the PBC images with the official per-split "
        "counts). The training split is divided across the hospitals; every accuracy below is on the held-out "
        f"test split ({len(feats.test_y):,} images), which no hospital holds, touched once per reported number. "
        "Hyperparameters were chosen on the validation split (docs/accuracy-levers.md).", "",
        f"Recipe (`hemafed simulate`'s defaults): model `{base.model}` (fixed features that no real data went "
        f"into; a linear head of {feats.train_x[0].numel() * 8 + 8:,} parameters is trained"
        f"{centring}), DP-FedSGD: one "
        f"Poisson-sampled step per round, rate q = {base.sample_rate} per record at every hospital, "
        f"{base.rounds} rounds, "
        f"clip C = {base.clip_norm}, server SGD with momentum {base.momentum} at "
        + (f"lr {base.server_lr}" if base.server_lr is not None else "lr = min(1, 2.6/σ) for each row's σ")
        + "; "
        f"{opts.sites} hospitals; secure aggregation threshold t = {plan.threshold}, "
        f"c = {plan.dp_colluders}. Test-time augmentation (logits averaged over the 8 symmetries of the "
        "square) in every evaluation. ε is per hospital, per training record, at δ = 1e-5, RDP accounting; σ is "
        "calibrated so the plan spends exactly the budget. Non-private rows: T = "
        f"{opts.np_rounds}, expected batch {opts.np_batch}, lr {opts.np_lr} (one hospital alone: q = "
        f"{opts.alone_np_sample_rate}). Mean ± std over seeds {seeds}: the seed sets the partition, the "
        "initialisation, the Poisson batches and the noise (population std).", "",
    ]
    lines += _summary(rows, opts)
    fed_main = [r for r in rows if r.section in ("federated", "sweep") and r.partition == opts.partitions[0]]

    def table(title: str, selected: list[Row], intro: str = "") -> None:
        if not selected:
            return
        nonlocal lines
        lines += [f"## {title}", ""] + ([intro, ""] if intro else [])
        lines += ["| setting | partition | ε per hospital | σ | test accuracy | seconds per run |",
                  "|---|---|---|---:|---:|---:|"]
        for r in selected:
            note = f" ({r.note})" if r.note else ""
            lines.append(f"| {r.setting}{note} | {r.partition} | {_eps(r.epsilon)} | {_sigma(r.sigma)} | "
                         f"{r.cell()} | {statistics.mean(r.seconds):.0f} |")
        lines.append("")

    table("Baselines: centralised, and one hospital alone", [r for r in rows if r.section in ("central", "alone")],
          "Centralised = all training records in one place (what no hospital is allowed to do). "
          "One hospital alone = the median-sized hospital of the main partition, its own records only, the "
          "federation's q, T and lr for DP (not separately tuned).")
    table("The federation (in process, same arithmetic as the sites and the aggregator)",
          [r for r in rows if r.section == "federated"],
          "Distributed DP: each hospital adds a Skellam share inside secure aggregation, sized so that any "
          "t − c shares carry σ; with every hospital surviving, the released sum carries n/(t − c) times the "
          f"accounted variance ({opts.sites}/({plan.threshold} − {plan.dp_colluders}) here), and "
          "this is what these rows include. Local DP: each hospital adds the full N(0, σ²C²) before its update "
          f"leaves; the sum carries {opts.sites} times that variance.")
    table("The README's main job (a real federation)", [r for r in rows if r.section == "main job"],
          "One run of `make simulate` (10 hospital processes and an aggregator over TLS websockets); seconds = "
          "wall time of the whole job.")
    if fed_main:
        _plot(doc.parent / "results-epsilon.png", rows, opts)
        lines += ["## Accuracy against ε", "", "![test accuracy against ε](results-epsilon.png)", "",
                  f"Partition {opts.partitions[0]}; ∞ is the non-private federation. Values:", "",
                  "| ε | " + " | ".join(_MODES.values()) + " |", "|---|" + "---:|" * len(_MODES)]
        for eps in sorted({r.epsilon for r in fed_main if r.epsilon is not None}):
            cells = [next((r.cell() for r in fed_main if r.epsilon == eps and r.setting == _federated_setting(m)),
                          "–") for m in _MODES]
            lines.append(f"| {eps:g} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += _PREVIOUS
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(lines))


_MODES = {"distributed": "distributed DP + secure aggregation", "local": "local DP + secure aggregation"}

_PREVIOUS = [
    "## Before this recipe", "",
    "The previous table (commit 252deb0: FedAvg with local epochs, `cnn4_28`, 10 rounds, every hospital "
    "adding its full noise) reached 0.926 centralised non-private but only 0.633 (IID) / 0.441 (Dirichlet) "
    "for non-private FedAvg and 0.56–0.63 for every private row; the README's main job then ended at 0.338. "
    "FedAvg remains available (`hemafed simulate --algorithm fedavg`).", ""]


def _plot(path: Path, rows: list[Row], opts: ExperimentOptions) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = opts.partitions[0]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    fed = [r for r in rows if r.section in ("federated", "sweep") and r.partition == main]
    nonpriv = next((r for r in fed if r.epsilon is None), None)
    eps_all = sorted({r.epsilon for r in fed if r.epsilon is not None})
    x_inf = (eps_all[-1] if eps_all else 8.0) * 2.2
    for mode, label in _MODES.items():
        pts = sorted((r.epsilon, r.mean, r.std) for r in fed
                     if r.setting == _federated_setting(mode) and r.epsilon is not None)
        if nonpriv is not None:
            pts.append((x_inf, nonpriv.mean, nonpriv.std))
        if pts:
            xs, ys, es = zip(*pts, strict=True)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=f"{opts.sites} hospitals, {label}")
    for r in rows:
        if r.section == "alone" and r.epsilon is None:
            ax.axhline(r.mean, color="grey", linestyle="--", label="median hospital alone, non-private")
        if r.section == "central" and r.epsilon is None:
            ax.axhline(r.mean, color="black", linestyle=":", label="centralised, non-private")
    alone = sorted((r.epsilon, r.mean) for r in rows if r.section == "alone" and r.epsilon is not None)
    if alone:
        ax.plot(*zip(*alone, strict=True), marker="s", color="grey", label="median hospital alone, DP-SGD")
    central = sorted((r.epsilon, r.mean) for r in rows if r.section == "central" and r.epsilon is not None)
    if central:
        ax.plot(*zip(*central, strict=True), marker="^", color="black", linestyle="none",
                label="centralised, DP-SGD")
    ax.set_xscale("log")
    ticks = [*eps_all, x_inf]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{e:g}" for e in eps_all] + ["∞"])
    ax.minorticks_off()
    ax.set_xlabel("ε per hospital (δ = 1e-5)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0.3 if alone else 0.6, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"BloodMNIST, {opts.sites} hospitals, {main}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
