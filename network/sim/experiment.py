"""`hemafed experiment`: the privacy–utility comparison behind docs/RESULTS.md.

Rows (test split, which no hospital holds; every private row at δ = 1e-5 per hospital record):

* the federation of `hemafed simulate`'s recipe with local DP and with distributed DP inside secure
  aggregation, for each partition and ε, over several seeds, and an ε sweep for the plot. Each run is
  `network.sim.inprocess.simulate_in_process`: the product's own round machines, secure aggregation, site
  trainers and ledgers, with the sockets taken out — seeded like `hemafed simulate`, so a row's run gives
  the very model the real federation of that seed gives;
* centralised DP-SGD and one hospital alone with DP-SGD: one party through the same site trainer (local DP:
  it adds the full noise) and the same server step, without a federation around it;
* non-private references (centralised, one hospital alone, the federation's hospitals without noise): plain
  SGD on the same fixed features — no privacy, so nothing a site would run;
* one real run of the README's main job (`Simulation`, processes and TLS websockets) with its defaults.

The fixed features of every image are computed once into the feature cache (`core.learning.feature_cache`),
which every run then reads, as a site reads its own; the runs are spread over `workers` processes.
"""

from __future__ import annotations

import itertools
import json
import logging
import platform
import re
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from hemafed.core.learning.dp_train import accuracy, evaluate
from hemafed.core.learning.fedsgd import FedSGDServer, center_layout, poisson_batch, server_round
from hemafed.core.learning.models import build_model, get_flat_params, get_spec, set_flat_params, split_features
from hemafed.core.learning.recipe import schedule_text, server_lr_for, with_budget
from hemafed.core.learning.site_trainer import FedSGDTrainer, SiteData, model_inputs
from hemafed.core.rounds.plan import SiteBounds
from hemafed.network.aggregator import initial_weights
from hemafed.network.sim.inprocess import simulate_in_process
from hemafed.network.sim.simulate import Simulation, SimulationOptions, evaluation_inputs, hospitals

log = logging.getLogger(__name__)

DELTA = 1e-5


@dataclass(frozen=True)
class ExperimentOptions:
    data: Path | None = None
    seeds: tuple[int, ...] = (0, 1, 2)
    epsilons: tuple[float, ...] = (3.0, 8.0)  # headline rows, every partition
    sweep: tuple[float, ...] = (1.0, 2.0, 3.0, 5.0, 8.0)  # the plot (main partition only)
    partitions: tuple[str, ...] = ("dirichlet:0.5", "iid")  # the first is the main one
    dp_modes: tuple[str, ...] = ("local", "distributed")  # of the federated and sweep rows
    sites: int = 10
    base: SimulationOptions = field(default_factory=SimulationOptions)  # the main job's recipe
    # non-private rows: tuned separately on validation (docs/accuracy-levers.md): smaller steps, more of them
    np_rounds: int = 1000
    np_batch: int = 256
    np_lr: float = 0.05
    alone_np_sample_rate: float = 0.2
    main_job: bool = True
    workers: int = 2  # processes running rows at once (one torch thread each)
    resume: bool = False  # keep the rows of `out/results.json` measured with the same seeds; run only the others
    subset: int | None = None  # training images (tests: a small experiment)
    test_subset: int | None = None

    def __post_init__(self) -> None:
        if not self.dp_modes or not set(self.dp_modes) <= {"local", "distributed"}:
            raise ValueError(f"the DP modes are local and/or distributed, not {', '.join(self.dp_modes) or 'none'}")


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
    commit: str = ""  # the commit the row was measured at (a resumed run keeps earlier rows)

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


# ---------------------------------------------------------------------------------------------- one run


@dataclass(frozen=True)
class Job:
    """One run of one row: `kind` "federation" (the product in process), "one_party" (DP-SGD through the site
    trainer, one party) or "reference" (non-private plain SGD); `parties` "all", "median" (the median-sized
    hospital) or "sites" (each hospital's training split, pooled)."""

    kind: str
    sim: SimulationOptions  # the federation's options for this seed (partition, ε, DP mode, rounds)
    parties: str = "sites"
    rounds: int = 0  # one_party / reference
    sample_rate: float = 0.0
    lr: float = 0.0


@dataclass
class JobResult:
    accuracy: float
    seconds: float
    sigma: float | None


def _run(job: Job) -> JobResult:
    """In a worker process: run `job` and measure its test accuracy."""
    import torch

    torch.set_num_threads(1)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hemafed-exp-") as state:
        if job.kind == "federation":
            result, h = simulate_in_process(job.sim, Path(state), threads=1)
            weights, plan, sigma = result.weights, h.plan, h.plan.noise_multiplier
        else:
            h = hospitals(job.sim)
            data = _pooled(h, job.parties)
            if job.kind == "one_party":
                weights, plan = _one_party(h.plan, data, job, Path(state))
                sigma = plan.noise_multiplier
            else:
                weights, plan = _reference(h.plan, data, job)
                sigma = None
    seconds = time.perf_counter() - started

    trainable, inputs = evaluation_inputs(plan, h.test.images)
    set_flat_params(trainable, weights)
    acc = accuracy(evaluate(trainable, inputs, h.test.labels, len(plan.classes)))
    return JobResult(acc, seconds, sigma)


def _pooled(h, parties: str):
    """The training images of the hospitals a baseline uses, pooled (validation images are left out)."""

    sites = list(h.site_data().values())
    if parties == "median":
        sites = [sorted(sites, key=lambda d: len(d.train_labels))[len(sites) // 2]]
    images = np.concatenate([d.train_images for d in sites])
    labels = np.concatenate([d.train_labels for d in sites])
    return SiteData(images, labels, images[:0], labels[:0])


def _one_party(fed_plan, data, job: Job, state: Path):
    """DP-SGD by one party holding `data`: the site trainer (local DP, the full noise σC added once) and the
    server's step, `job.rounds` steps at rate `job.sample_rate`, σ spending the job's ε."""

    n = len(data.train_labels)
    plan = replace(fed_plan, federation_id="one-party", rounds=job.rounds, sample_rate=job.sample_rate,
                   batch_size=max(1, round(job.sample_rate * n)), threshold=2, min_sites=2, max_sites=2)
    plan = with_budget(plan, job.sim.epsilon, "local")
    plan = replace(plan, server_lr=job.lr or server_lr_for(plan.noise_multiplier, plan.model, job.sim.epsilon,
                                                           plan.rounds))
    trainer = FedSGDTrainer(plan, bounds=SiteBounds(max_rounds=max(plan.rounds, 1000)), seed=job.sim.seed,
                            threads=1)
    trainer.prepare(trainer.open_ledger(state, job.sim.epsilon, n, create=True), data, job.sim.epsilon)
    trainer.featurize()
    weights = initial_weights(plan)
    server = FedSGDServer(plan.server_lr, plan.momentum, plan.ema, plan.center_rounds_used)
    for rnd in range(1, plan.rounds + 1):
        weights, _ = server_round(server, trainer.privacy, weights, trainer.contribution(rnd, weights).ring)
    return weights, plan


def _reference(fed_plan, data, job: Job):
    """Non-private plain SGD of the model's head on the same fixed features (read through a site trainer):
    Poisson batches at `job.sample_rate`, the mean gradient, no clipping, no noise; a centred head gets the
    exact feature mean. A reference, not something a site runs (every plan a site accepts is private)."""
    import torch
    import torch.nn.functional as F

    plan = replace(fed_plan, rounds=job.rounds, sample_rate=job.sample_rate)
    model = build_model(plan.model, len(plan.classes))
    head = split_features(model)[1]
    x = model_inputs(plan, model, data.train_images, "train")
    y = torch.as_tensor(np.asarray(data.train_labels).reshape(-1), dtype=torch.long)
    weights = initial_weights(plan)
    center = center_layout(head)
    if center is not None:
        weights = weights.copy()
        weights[center[0]] = x.double().mean(0).numpy()
    set_flat_params(head, weights)
    server = FedSGDServer(job.lr, plan.momentum)
    expected = job.sample_rate * len(y)
    gen = torch.Generator().manual_seed(job.sim.seed)
    for _ in range(plan.rounds):
        set_flat_params(head, weights)
        idx = poisson_batch(len(y), job.sample_rate, gen)
        grad = np.zeros(len(weights), np.float64)
        if len(idx):
            head.zero_grad()
            F.cross_entropy(head(x[idx]), y[idx], reduction="sum").backward()
            grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                              for p in head.parameters()]).numpy().astype(np.float64)
        weights = server.apply(weights, grad, expected, center, plan.clip_norm)
    set_flat_params(head, weights)
    return get_flat_params(head), plan


# ---------------------------------------------------------------------------------------------- the table


def precompute_features(opts: ExperimentOptions) -> float:
    """Every training and test image's fixed features into the feature cache (seconds taken; ~0 when warm)."""

    started = time.perf_counter()
    h = hospitals(replace(opts.base, data=opts.data, sites=opts.sites, subset=opts.subset,
                          test_subset=opts.test_subset))

    model = build_model(h.plan.model, len(h.plan.classes))
    for view, images in (("train", h.train.images), ("eval", h.train.images), ("eval", h.test.images)):
        model_inputs(h.plan, model, images, view)
    return time.perf_counter() - started


def _steps_text(base: SimulationOptions) -> str:
    """The rounds and server step of the experiment's private rows, in words."""
    if base.rounds is None and base.server_lr is None:
        return f"the rounds and step of each row's budget: {schedule_text(base.model)}, σ each row's"
    rounds = f"{base.rounds} rounds" if base.rounds is not None else "each budget's rounds (core.learning.recipe)"
    if base.server_lr is not None:
        return f"{rounds} at lr {base.server_lr}"
    return f"{rounds} at lr = min(1, k/σ) for each row's σ (k: core.learning.recipe.lr_times_sigma)"


def _commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _measured_rows(path: Path, n_seeds: int) -> dict[tuple, Row]:
    """The in-process rows of an interrupted run (`--resume`), keyed like the plan; the main job always reruns."""
    if not path.exists():
        return {}
    rows = [Row(**r) for r in json.loads(path.read_text())]
    return {(r.section, r.setting, r.partition, r.epsilon): r for r in rows
            if r.section != "main job" and len(r.accuracies) == n_seeds}


def run_experiment(opts: ExperimentOptions, out: Path, doc: Path, command: str) -> list[Row]:
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    commit = _commit()  # the code the runs execute is the checkout's at the start, whatever is committed meanwhile
    features_s = precompute_features(opts)
    log.info("fixed features of every image: %.0f s", features_s)
    base = replace(opts.base, data=opts.data, sites=opts.sites, delta=DELTA, subset=opts.subset,
                   test_subset=opts.test_subset, quiet=True)
    q = base.sample_rate
    n_all = _training_images(base)
    np_q = opts.np_batch / n_all
    main = opts.partitions[0]
    rows: list[Row] = []
    plans: list[tuple[str, str, str, float | None, str, list[Job]]] = []

    def add(section: str, setting: str, partition: str, eps: float | None, note: str, make) -> None:
        plans.append((section, setting, partition, eps, note, [make(seed) for seed in opts.seeds]))

    def sim(seed: int, partition: str = main, eps: float = 8.0, mode: str = "distributed") -> SimulationOptions:
        return replace(base, seed=seed, partition=partition, epsilon=eps, dp_mode=mode)

    add("central", "centralised, non-private (reference)", "–", None, "",
        lambda s: Job("reference", sim(s), "sites", opts.np_rounds, np_q, opts.np_lr))
    rounds = {eps: replace(base, epsilon=eps).planned_rounds for eps in opts.epsilons}  # the recipe's for each ε
    for eps in opts.epsilons:
        add("central", "centralised, DP-SGD", "–", eps, "",
            lambda s, e=eps: Job("one_party", sim(s, eps=e, mode="local"), "sites", rounds[e], q))
    add("alone", "one hospital alone (median size), non-private (reference)", main, None, "",
        lambda s: Job("reference", sim(s), "median", opts.np_rounds, opts.alone_np_sample_rate, opts.np_lr))
    for eps in opts.epsilons:
        add("alone", "one hospital alone (median size), DP-SGD", main, eps, "",
            lambda s, e=eps: Job("one_party", sim(s, eps=e, mode="local"), "median", rounds[e], q))
    for partition in opts.partitions:
        add("federated", "the federation's hospitals without noise (reference)", partition, None, "",
            lambda s, p=partition: Job("reference", sim(s, p), "sites", opts.np_rounds, np_q, opts.np_lr))
        for eps in opts.epsilons:
            for mode in opts.dp_modes:
                add("federated", _federated_setting(mode), partition, eps, "",
                    lambda s, p=partition, e=eps, m=mode: Job("federation", sim(s, p, e, m)))
    for eps in opts.sweep:
        if eps in opts.epsilons:
            continue
        for mode in opts.dp_modes:
            add("sweep", _federated_setting(mode), main, eps, "",
                lambda s, e=eps, m=mode: Job("federation", sim(s, main, e, m)))

    def record(row: Row) -> None:
        row = row if row.commit else replace(row, commit=commit)
        rows.append(row)
        log.info("%s | %s | %s | ε %s: %s", row.section, row.setting, row.partition, row.epsilon, row.cell())
        (out / "results.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
        write_results(doc, rows, opts, base, command, time.time() - started, features_s, partial=True,
                      kept=len(kept))

    kept = _measured_rows(out / "results.json", len(opts.seeds)) if opts.resume else {}
    jobs = [job for section, setting, partition, eps, _, row_jobs in plans
            if (section, setting, partition, eps) not in kept for job in row_jobs]
    with ProcessPoolExecutor(max_workers=max(1, opts.workers), mp_context=get_context("spawn")) as pool:
        results = pool.map(_run, jobs)  # in order, as they finish: each row is written as soon as it is complete
        for section, setting, partition, eps, note, row_jobs in plans:
            if (section, setting, partition, eps) in kept:
                record(kept[section, setting, partition, eps])
                continue
            done = [next(results) for _ in row_jobs]
            record(Row(section, setting, partition, eps, done[0].sigma, [r.accuracy for r in done],
                       [r.seconds for r in done], note))
    if opts.main_job:
        run_opts = replace(base, out=out / "main-job", partition=main, seed=opts.seeds[0], subset=opts.subset,
                           test_subset=opts.test_subset)
        log.info("the main job, a real federation: %s", run_opts)
        metrics = Simulation(run_opts, command="hemafed simulate").run()
        final = metrics["final"]
        record(Row("main job", "`hemafed simulate` (defaults): 10 processes, TLS websockets, secure aggregation, "
                   "distributed DP", main, base.epsilon, metrics.get("plan", {}).get("noise_multiplier"),
                   [final["test_accuracy"]], [final["wall_s"]],
                   note=f"largest ε spent {final['max_epsilon']:.3f}; rounds with every hospital "
                        f"{final['rounds_with_every_site']} of {len(metrics['rounds'])}; the feature cache was "
                        "warm"))
    write_results(doc, rows, opts, base, command, time.time() - started, features_s, partial=False,
                  kept=len(kept))
    return rows


def _training_images(base: SimulationOptions) -> int:
    return sum(len(d.train_labels) for d in hospitals(base).site_data().values())


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


def _data_name(base: SimulationOptions) -> str:
    from hemafed.core.data.bloodmnist import DatasetUnavailable, locate
    from hemafed.core.learning.models import get_spec

    try:
        return locate(base.data, size=get_spec(base.model).input_size, download=False).name
    except DatasetUnavailable:
        return "bloodmnist.npz"


def write_results(doc: Path, rows: list[Row], opts: ExperimentOptions, base: SimulationOptions, command: str,
                  wall_s: float, features_s: float, *, partial: bool, kept: int = 0) -> None:

    plan = base.plan()
    seeds = ", ".join(str(s) for s in opts.seeds)

    head = sum(p.numel() for p in build_model(base.model, 8).parameters())
    measured = sorted({r.commit or "unknown" for r in rows})
    commit = measured[0] if len(measured) == 1 else _commit()  # a re-rendered doc keeps its rows' commit
    earlier = sorted(set(measured) - {commit})

    main_recipe = base.model == SimulationOptions().model
    recipe = "`hemafed simulate`'s defaults" if main_recipe else f"`hemafed simulate --model {base.model}`"
    centring = ", on features centred by their average, which each run's first rounds estimate as clipped, " \
        "noised sums under the same protection as a training round" if get_spec(base.model).centred else ""
    lines = ["# Results: private federated learning on BloodMNIST", ""]
    if partial:
        lines += ["**Incomplete: the experiment is still running or was interrupted.**", ""]
    lines += [
        f"Command: `{command}` at commit {commit}, {time.strftime('%Y-%m-%d')} — {wall_s / 60:.0f} min in all on "
        f"{platform.machine()}, 2 CPU cores, no GPU, {opts.workers} runs at a time (the fixed features of every "
        f"image: {features_s / 60:.1f} min, computed once into the feature cache; 0 when it was warm)."
        + (f" Resumed (`--resume`): {kept} of the {len(rows)} rows were kept from an earlier run of the same "
           f"command at commit {', '.join(earlier) or commit}; the time above is this run's, each row's own time "
           "is in its table." if kept else ""), "",
        f"Data: `{_data_name(base)}` (a rebuild of BloodMNIST from the PBC images with the official per-split "
        "counts). The training split is divided across the hospitals; every accuracy below is on the held-out "
        "test split, which no hospital holds, touched once per reported number. "
        "Hyperparameters were chosen on the validation split (docs/accuracy-levers.md).", "",
        "**Every federated row runs the product**: `network.sim.inprocess` drives the aggregator's and the "
        "sites' round machines, secure aggregation, the site trainers (noise, quantization) and the ledgers "
        "with the sockets taken out, seeded as `hemafed simulate --seed S` seeds its hospitals, so each run "
        "gives bit for bit the model the real federation of that seed gives "
        "(tests/federation/test_inprocess_equals_simulate.py). The DP-SGD baselines run one party through the "
        "same site trainer; the non-private references are plain SGD on the same features.", "",
        f"Recipe ({recipe}): model `{base.model}` (fixed features that no real data went "
        f"into; a linear head of {head:,} parameters is trained"
        f"{centring}), DP-FedSGD: one "
        f"Poisson-sampled step per round, rate q = {base.sample_rate} per record at every hospital, "
        f"clip C = {base.clip_norm}, server SGD with momentum {base.momentum}, "
        + _steps_text(base)
        + "; "
        f"{opts.sites} hospitals; secure aggregation threshold t = {plan.threshold}, "
        f"c = {plan.dp_colluders}. Test-time augmentation (logits averaged over the 8 symmetries of the "
        "square) in every evaluation. ε is per hospital, per training record, at δ = 1e-5, RDP accounting; σ is "
        "calibrated so the plan spends exactly the budget. Non-private rows: T = "
        f"{opts.np_rounds}, expected batch {opts.np_batch}, lr {opts.np_lr} (one hospital alone: q = "
        f"{opts.alone_np_sample_rate}). Mean ± std over seeds {seeds}: the seed sets the partition, the "
        "initialisation, the Poisson batches and the noise (population std).", "",
    ]
    results_doc = doc.name == "RESULTS.md"
    if results_doc and not main_recipe:
        lines += default_elsewhere(doc.parent, base.model)
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
    table("The federation (the product's machines and trainers, in process)",
          [r for r in rows if r.section == "federated"],
          "Distributed DP: each hospital adds a Skellam share inside secure aggregation, sized so that any "
          "t − c shares carry σ; with every hospital surviving, the released sum carries n/(t − c) times the "
          f"accounted variance ({opts.sites}/({plan.threshold} − {plan.dp_colluders}) here), and "
          "this is what these rows include. Local DP: each hospital adds the full N(0, σ²C²) before its update "
          f"leaves; the sum carries {opts.sites} times that variance.")
    table("The README's main job (a real federation)", [r for r in rows if r.section == "main job"],
          "One run of `make simulate` (10 hospital processes and an aggregator over TLS websockets); seconds = "
          "wall time of the whole job. As a new user runs it (fresh clone, empty caches, cold and warm, with the "
          "date and commit): [main-job-fresh.md](main-job-fresh.md).")
    if results_doc:
        lines += preparation(doc.parent)
    if fed_main:
        plot = f"{doc.stem.lower()}-epsilon.png"  # RESULTS.md's is results-epsilon.png
        _plot(doc.parent / plot, rows, opts)
        lines += ["## Accuracy against ε", "", f"![test accuracy against ε]({plot})", "",
                  f"Partition {opts.partitions[0]}; ∞ is the non-private federation. Values:", "",
                  "| ε | " + " | ".join(_MODES.values()) + " |", "|---|" + "---:|" * len(_MODES)]
        for eps in sorted({r.epsilon for r in fed_main if r.epsilon is not None}):
            cells = [next((r.cell() for r in fed_main if r.epsilon == eps and r.setting == _federated_setting(m)),
                          "–") for m in _MODES]
            lines.append(f"| {eps:g} | " + " | ".join(cells) + " |")
        lines.append("")
    if main_recipe or results_doc:
        lines += (_AUDIT + _audit_rows(doc.parent / "audit") + _confidence_sections(doc.parent)
                  + other_recipes(doc.parent) + _PREVIOUS)
    else:  # the audit, calibration and cell-check sections describe the main job's model
        lines += ["The main recipe (`hemafed simulate`'s defaults), its privacy audit, calibration and cell check: "
                  "[RESULTS.md](RESULTS.md).", ""]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(lines))


_MODES = {"distributed": "distributed DP + secure aggregation", "local": "local DP + secure aggregation"}

_AUDIT = [
    "## Empirical privacy audit", "",
    "Does the code add the noise its accounting claims? `hemafed audit` trains the main job's plan once with planted "
    "canaries and bounds ε from below (ε̂, 95 % confidence): [AUDIT.md](AUDIT.md) has ε̂ next to ε at ε = 1, 3 and 8 "
    "and the faulty controls it must catch, generated from their results; [privacy.md](privacy.md#the-privacy-audit) "
    "says what the numbers mean.", ""]


def preparation(docs: Path) -> list[str]:
    """What each recipe costs a hospital before round 1: docs/benchmarks.md's `prepare` section (`bench/prepare.py`),
    or a line saying it has not been measured."""
    bench = docs / "benchmarks.md"
    found = re.search(r"<!-- prepare:start -->\n(.*?)\n<!-- prepare:end -->", bench.read_text(), re.S) \
        if bench.exists() else None
    if found is None:
        return ["## Preparation at each hospital", "", "Not measured yet (`python -m bench.prepare`).", ""]
    body = found.group(1).splitlines()[1:]  # less the benchmark's own heading
    while body and not body[0].strip():
        body.pop(0)
    return ["## Preparation at each hospital", "", *body, "",
            "From [benchmarks.md](benchmarks.md), where `python -m bench.prepare` writes it.", ""]


def _audit_rows(folder: Path) -> list[str]:
    """The audit table of AUDIT.md, here too when its results are beside the doc (`docs/audit/*.json`)."""
    from hemafed.network.sim.audit import AuditResult
    from hemafed.network.sim.audit_doc import audit_table

    results = [AuditResult.load(path) for path in sorted(folder.glob("*.json"))]
    return [audit_table(results), ""] if results else []


def _confidence_sections(docs: Path) -> list[str]:
    """Calibration, the cell check and the appearance shift, from the bench docs beside RESULTS.md (each written
    by its own script from a main-job run; absent ones are named, not guessed)."""

    def tables(name: str) -> list[str]:
        path = docs / name
        if not path.exists():
            return [f"(not measured yet: `{name}` is missing)", ""]
        # each table of the doc, under the section title it sits in (when the doc has several), followed by the
        # paragraph right after it (the doc's reading of that table)
        out: list[str] = []
        lines = [*path.read_text().splitlines(), ""]
        heading = None
        for i, line in enumerate(lines):
            if line.startswith("## "):
                heading = line[3:]
            elif line.startswith("|"):
                if heading is not None and not lines[i - 1].startswith("|"):
                    out += [f"**{heading}**", ""]
                    heading = None
                out.append(line)
            elif i and lines[i - 1].startswith("|"):
                after = next((x for x in lines[i:] if x), "")
                out += [""] + ([after, ""] if after and not after.startswith(("|", "#")) else [])
        return out

    def highlights(name: str) -> list[str]:
        path = docs / name
        if not path.exists():
            return []
        return [line + "\n" for line in path.read_text().splitlines()
                if line.startswith(("- **The federation's temperature**", "**Over "))]

    return [
        "## Calibration and \"uncertain\" answers", "",
        "The main job's model with the federation's temperature (picked from the hospitals' summed validation "
        "losses), on the test split; each hospital's \"uncertain\" threshold and the figures behind the plot: "
        f"[{CALIBRATION_DOC}.md]({CALIBRATION_DOC}.md) (`python -m bench.calibration`).", "",
        *highlights(f"{CALIBRATION_DOC}.md"),
        f"![reliability before and after calibration; coverage against accuracy]({CALIBRATION_DOC}.png)", "",
        "## \"Not an image of a single blood cell\"", "",
        "The cell check of each hospital's final model file (the federation's DP statistics; the threshold the "
        "federation set from all hospitals' validation counts): share of each set flagged; sets and method in "
        f"[{OOD_DOC}.md]({OOD_DOC}.md) (`python -m bench.ood_check`).", "",
        *tables(f"{OOD_DOC}.md"),
        "## Hospitals whose images look different", "",
        f"The main job's model: [{APPEARANCE_DOC}]({APPEARANCE_DOC}) (`python -m bench.appearance`):", "",
        *tables(APPEARANCE_DOC),
        f"The default before it (the same features from the encoder before its cell-scene pre-training): "
        f"[{PREVIOUS_APPEARANCE_DOC}]({PREVIOUS_APPEARANCE_DOC}); before that "
        "[appearance-64px-ms4p-lf-looks-hed.md](appearance-64px-ms4p-lf-looks-hed.md) (the head unweighted) and "
        "the 28-px [appearance-looks-hed.md](appearance-looks-hed.md):", "",
        *tables(PREVIOUS_APPEARANCE_DOC),
        "Earlier models and remedies: [appearance-looks.md](appearance-looks.md), "
        "[appearance.md](appearance.md), [appearance-remedies.md](appearance-remedies.md).", "",
        *tables("appearance.md"),
    ]


# the main job's model's calibration, cell check and appearance shift (`python -m bench.calibration --doc ...`,
# `bench.ood_check --doc ...`, `bench.appearance --doc ...`); earlier defaults' docs stay beside them
CALIBRATION_DOC, OOD_DOC = "calibration-64px-cells", "ood-check-64px-cells"
APPEARANCE_DOC, PREVIOUS_APPEARANCE_DOC = "appearance-64px-cells.md", "appearance-64px-bw.md"

# other recipes' result docs (written by `hemafed experiment --model M --doc docs/<file>`), summarised in RESULTS.md
OTHER_RECIPES = {"results-64px.md": "scatter_synth_inv_cc_ms_64", "results-64px-ms4.md": "scatter_synth_inv_cc_ms4_64",
                 "results-64px-ms4p.md": "scatter_synth_inv_cc_ms4p_64",
                 "results-64px-ms4p-looks.md": "scatter_synth_inv_cc_ms4p_looks_64",
                 "results-looks-hed-full.md": "scatter_synth_inv_cc_lf_looks_hed_28",
                 "results-64px-ms4p-looks-hed.md": "scatter_synth_inv_cc_ms4p_looks_hed_64",
                 "results-64px-ms4p-lf-looks-hed.md": "scatter_synth_inv_cc_ms4p_lf_looks_hed_64",
                 "results-looks-full.md": "scatter_synth_inv_cc_lf_looks_28",
                 "results-64px-s56.md": "scatter_synth_inv_cc_ms4p_lf_looks_hed_s56_bw_64",
                 "results-64px-bw.md": "scatter_synth_inv_cc_ms4p_lf_looks_hed_bw_64"}


def _summary_lines(lines: list[str]) -> list[str]:
    """The bullet lines under a result doc's "## Summary", up to its next section (a recipe's doc has the other
    recipes' summaries further down, which are not its own)."""
    start = lines.index("## Summary") + 2 if "## Summary" in lines else len(lines)
    section = itertools.takewhile(lambda line: not line.startswith("## "), lines[start:])
    return [line for line in section if line.startswith("- ")]


def default_elsewhere(docs: Path, rows_model: str) -> list[str]:
    """RESULTS.md's note when its rows are of an earlier default: which model is the default now, and its own
    experiment's summary (its doc in `OTHER_RECIPES`) or that it has none yet."""
    default = SimulationOptions().model
    name = next((n for n, m in OTHER_RECIPES.items() if m == default and (docs / n).exists()), None)
    if name is None:
        return [f"**The rows below are of `{rows_model}`, an earlier default. The default model is now `{default}`, "
                "whose experiment has not been run yet.**", ""]
    return [f"**The rows below are of `{rows_model}`, an earlier default. The default model is now `{default}`**; "
            f"its own experiment, measured the same way, is in [{name}]({name}) (its command, commit and every "
            "row); the calibration, cell-check and appearance sections below are the default's:", "",
            *_summary_lines((docs / name).read_text().splitlines()), ""]


def other_recipes(docs: Path) -> list[str]:
    """RESULTS.md's section on each recipe in `OTHER_RECIPES` whose doc exists: its summary lines and a link, and
    the loss under the appearance shift when `appearance-<same suffix, less "-full">.md` (bench.appearance) exists
    beside it."""
    out: list[str] = []
    fresh = docs / "main-job-fresh.md"
    timed = fresh.read_text().replace("--model ", "") if fresh.exists() else ""
    for name, model in OTHER_RECIPES.items():
        path = docs / name
        if not path.exists() or model == SimulationOptions().model:  # the default's summary heads RESULTS.md
            continue
        lines = path.read_text().splitlines()
        summary = _summary_lines(lines)
        header = "| ε | " + " | ".join(_MODES.values()) + " |"
        table = list(itertools.takewhile(lambda line: line.startswith("|"), lines[lines.index(header):])) \
            if header in lines else []
        sweep = ["Test accuracy against ε (mean ± std over its seeds):", "", *table, ""] if table else []
        shift = docs / name.replace("results-", "appearance-", 1).replace("-full.md", ".md")
        loss = [line for line in shift.read_text().splitlines() if line.startswith("Loss on the untouched")] \
            if shift.exists() else []
        sweep += [f"Hospitals whose images look different ([{shift.name}]({shift.name})): {loss[0]}", ""] \
            if loss else []
        size = get_spec(model).input_size
        cold = ("the main job with it, cold and as a new user runs it: [main-job-fresh.md](main-job-fresh.md)"
                if f"`{model}`" in timed else "its main job has not been timed cold")
        out += [f"## At {size} pixels (`hemafed simulate --model {model}`)", "",
                f"The same federation with `{model}` ({get_spec(model).description.split(';')[0]}), measured "
                f"the same way: [{name}]({name}) (its command, commit, every row and its time per run); {cold}.", "",
                *summary, "", *sweep]
    return out


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
        if nonpriv is not None and pts:  # a mode without rows (--dp-modes) gets no line, not a lone ∞ point
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
