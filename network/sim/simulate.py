"""`hemafed simulate`: an aggregator and N hospital sites as separate processes on
loopback (real websockets, real TLS), on BloodMNIST split across the hospitals.

The harness plays the role of an outside observer: it partitions the data, starts
the processes, evaluates each checkpoint on the held-out test split (which no
site holds), and writes the results folder.

This module is imported when the command line is built (for its options' defaults), so it imports the
engine inside the functions that use it (start-up time: `hemafed --help` does not load torch)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hemafed.core.rounds.plan import FederationPlan, SiteBounds, default_threshold
from hemafed.network.config import render_toml
from hemafed.network.progress import progress_bar

log = logging.getLogger(__name__)

RUN_ARTIFACTS = ("federation", "sites", "metrics.json", "accuracy.png", "epsilon.png", "report.md",
                 "final_model.npz")


@dataclass
class Drop:
    site: int  # 1-based hospital number
    round: int
    stage: str

    @classmethod
    def parse(cls, text: str) -> Drop:
        from hemafed.network.site import DIE_STAGES

        try:
            site, rest = text.split("@", 1)
            rnd, stage = rest.split(":", 1)
            number = int(site.removeprefix("hospital_"))
            drop = cls(number, int(rnd), stage)
        except ValueError:
            raise ValueError(f"--drop {text!r}: expected SITE@ROUND:STAGE, e.g. 3@2:masked") from None
        if drop.stage not in DIE_STAGES:
            raise ValueError(f"--drop {text!r}: stage must be one of {', '.join(DIE_STAGES)}")
        return drop


@dataclass
class SimulationOptions:
    """Defaults: the recipe chosen on validation data (docs/accuracy-levers.md): DP-FedSGD on fixed
    features (scattering + a CNN pre-trained on procedural images) with distributed DP through secure aggregation."""

    sites: int = 10
    rounds: int | None = None  # None: the recipe's for the budget (`core.learning.recipe.schedule`), 500 at ε = 8
    epsilon: float = 8.0
    delta: float = 1e-5
    partition: str = "dirichlet:0.5"
    dp: bool = True
    secagg: bool = True
    tls: bool = True
    threshold: int | None = None  # default: all sites but one (default_threshold)
    drops: list[Drop] = field(default_factory=list)
    out: Path = Path("results/simulation")
    data: Path | None = None
    seed: int = 0
    subset: int | None = None  # use only this many training images (quick demos and tests)
    test_subset: int | None = None  # evaluate on only this many test images (quick checks; figures use all)
    # "same": every hospital's images as BloodMNIST has them (one lab); "shifted": each hospital's own stain,
    # lamp, focus and magnification drawn from `core.data.appearance.LOOK_RANGE` (the test split stays untouched)
    appearance: str = "same"
    # Each simulated hospital draws its randomness (samples, noise, rounding) from the run's seed, so a run replays
    # exactly, as processes or in process (`network.sim.inprocess`); False: fresh OS randomness, as at a hospital.
    seeded: bool = True
    model: str = FederationPlan.model  # the recipe's (tests/federation/test_plan_and_state.py)
    algorithm: str = "fedsgd"  # "fedsgd": one DP-SGD step per round | "fedavg": local epochs per round
    dp_mode: str = "distributed"  # fedsgd: "distributed" (noise shares inside secure aggregation) | "local"
    sample_rate: float = 0.1713  # fedsgd: Poisson rate per record (≈ 2,048 of BloodMNIST's 11,959 per round)
    local_epochs: int = 1
    batch_size: int = 64  # fedavg only; fedsgd's plan carries the expected batch q·ΣN
    lr: float = 0.1
    momentum: float = 0.9
    clip_norm: float = 1.0
    server_optimizer: str = "fedavg"
    server_lr: float | None = None  # None: private fedsgd takes the recipe's lr for its σ (core.recipe), else 0.5
    stage_timeout_s: float = 120.0
    eval_every: int | None = None  # test-evaluate every k-th checkpoint (default: about 50 points per run)
    val_fraction: float = FederationPlan.val_fraction  # of each hospital's images kept back as its validation split
    quiet: bool = False

    @property
    def planned_rounds(self) -> int:
        """`rounds`, or the recipe's for this budget and model (a private fedsgd plan) or for no budget."""
        if self.rounds is not None:
            return self.rounds
        from hemafed.core.learning.recipe import rounds_for

        private = self.dp and self.algorithm == "fedsgd"
        return rounds_for(self.epsilon if private else None, self.model)

    def plan(self, train_sizes: list[int] | None = None, dim: int | None = None) -> FederationPlan:
        """The federation's plan. For a private fedsgd plan the harness plays the admin: from the sites'
        training-set sizes it sets the expected batch q·ΣN and the plan-wide σ that makes `planned_rounds`
        steps spend the ε budget (`core.recipe.with_budget`)."""
        t = max(self.threshold or default_threshold(self.sites), 2)
        if self.algorithm == "fedsgd":  # σ and the expected batch follow from the sites' sizes, below
            kind = {"algorithm": "fedsgd", "sample_rate": self.sample_rate, "dp_mode": self.dp_mode}
        else:
            kind = {"algorithm": "fedavg", "dp_mode": "local", "noise_multiplier": 0.0}
        from hemafed.core.learning.models import get_spec

        plan = FederationPlan(
            federation_id=f"sim-{self.seed}", model=self.model, input_size=get_spec(self.model).input_size,
            rounds=self.planned_rounds,
            local_epochs=self.local_epochs, batch_size=self.batch_size, lr=self.lr, momentum=self.momentum,
            clip_norm=self.clip_norm,
            delta=self.delta, dp=self.dp, secagg=self.secagg, threshold=t, min_sites=t if self.secagg else 1,
            max_sites=max(self.sites, 2), server_optimizer=self.server_optimizer,
            server_lr=0.5 if self.server_lr is None else self.server_lr, stage_timeout_s=self.stage_timeout_s,
            seed=self.seed, join_timeout_s=300.0, val_fraction=self.val_fraction, **kind)
        if self.algorithm != "fedsgd" or train_sizes is None or dim is None:
            return plan
        from dataclasses import replace

        from hemafed.core.learning.recipe import with_budget

        plan = replace(plan, batch_size=max(1, round(self.sample_rate * sum(train_sizes))))
        return with_budget(plan, self.epsilon, self.dp_mode, dim, recipe_lr=self.server_lr is None) if self.dp else plan


def site_name(i: int) -> str:
    return f"hospital_{i:02d}"


def site_seed(seed: int, i: int) -> int:
    """The simulation seed of hospital `i` (1-based) in a run seeded `seed`: every site's own."""
    return seed * 1000 + i


def site_splits(images: np.ndarray, labels: np.ndarray, parts: list[np.ndarray], plan: FederationPlan):
    """Each hospital's (training, validation) data as its site splits what it holds (`core.data.partition`)."""
    from hemafed.core.data.partition import stratified_split
    from hemafed.core.learning.site_trainer import SiteData

    out = {}
    for i, idx in enumerate(parts, start=1):
        labels_i = labels[idx].reshape(-1)
        train, val = stratified_split(labels_i, plan.val_fraction, seed=plan.seed)
        out[site_name(i)] = SiteData(images[idx][train], labels_i[train], images[idx][val], labels_i[val])
    return out


def prepare_out(out: Path) -> None:
    """Reuse `out` only if it is empty or holds a previous run (whose files are replaced)."""
    if out.exists():
        extra = [p.name for p in out.iterdir() if p.name not in RUN_ARTIFACTS]
        if extra:
            raise FileExistsError(f"{out} holds files that are not from a simulation run ({', '.join(extra[:3])})")
        for name in RUN_ARTIFACTS:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)


@dataclass
class Hospitals:
    """A simulation's hospitals: the plan, the training images each one holds (`parts` index `train`), the test
    split no hospital holds."""

    plan: FederationPlan
    train: Any  # core.data.bloodmnist.Split
    parts: list[np.ndarray]
    test: Any

    def site_data(self) -> dict:
        """Each hospital's training and validation data, as its site splits what it holds."""
        return site_splits(self.train.images, self.train.labels, self.parts, self.plan)


def hospitals(opts: SimulationOptions) -> Hospitals:
    """BloodMNIST divided among `opts.sites` hospitals (`opts.partition`, `opts.seed`), and the plan an admin
    would write for them (for private DP-FedSGD: the expected batch and σ from the sites' sizes)."""
    from hemafed.core.data.bloodmnist import load_splits, locate
    from hemafed.core.data.partition import partition, stratified_split
    from hemafed.core.learning.models import build_model

    plan = opts.plan()
    splits = load_splits(locate(opts.data, size=plan.input_size))
    train, test = splits["train"], splits["test"]
    if opts.subset is not None:
        keep = np.sort(np.random.default_rng(opts.seed).permutation(len(train.labels))[:opts.subset])
        train = type(train)(train.images[keep], train.labels[keep])
    if opts.test_subset is not None:
        keep = np.sort(np.random.default_rng(opts.seed).permutation(len(test.labels))[:opts.test_subset])
        test = type(test)(test.images[keep], test.labels[keep])
    if opts.appearance not in ("same", "shifted"):
        raise ValueError(f"appearance must be 'same' or 'shifted', not {opts.appearance!r}")
    # Every hospital needs a few batches of its own (Dirichlet draws are redrawn until it has them).
    per_site = 2 * opts.batch_size if opts.algorithm == "fedavg" else 64
    parts = partition(train.labels, opts.sites, opts.partition, seed=opts.seed,
                      min_per_site=min(per_site, len(train.labels) // (2 * opts.sites)))
    if opts.appearance == "shifted":
        from hemafed.core.data.appearance import apply_look, hospital_looks

        images = train.images.copy()
        for idx, look in zip(parts, hospital_looks(len(parts), opts.seed), strict=True):
            images[idx] = apply_look(train.images[idx], look)
        train = type(train)(images, train.labels)
    if opts.algorithm == "fedsgd":
        # each site holds out its validation split the same way (core.data.partition.stratified_split)
        sizes = [len(stratified_split(train.labels[idx], plan.val_fraction, seed=plan.seed)[0]) for idx in parts]
        dim = sum(p.numel() for p in build_model(plan.model, len(plan.classes)).parameters())
        plan = opts.plan(sizes, dim)
    return Hospitals(plan, train, parts, test)


class Simulation:
    def __init__(self, opts: SimulationOptions, command: str = "hemafed simulate") -> None:
        self.opts = opts
        self.command = command
        self.plan = opts.plan()
        self.out = opts.out
        self.procs: dict[str, subprocess.Popen] = {}
        self.test_x = self.test_y = None
        self._test_inputs = self._trainable = None

    # -- setting up ----------------------------------------------------------------------------

    def setup(self) -> None:
        from hemafed.core.data.partition import class_counts
        from hemafed.core.trust.certs import create_federation_certs
        from hemafed.core.trust.identity import init_identity

        opts = self.opts
        prepare_out(self.out)
        h = hospitals(opts)
        train, parts, self.plan = h.train, h.parts, h.plan
        self.test_x, self.test_y = h.test.images, h.test.labels
        self.counts = class_counts(train.labels, parts, len(self.plan.classes))
        fed = self.out / "federation"
        fed.mkdir(parents=True)
        if opts.tls:
            create_federation_certs(fed / "tls", ["127.0.0.1", "localhost"])
        keys = {}
        for i, idx in enumerate(parts, start=1):
            name = site_name(i)
            sdir = self.out / "sites" / name
            (sdir / "state").mkdir(parents=True)
            np.savez(sdir / "data.npz", train_images=train.images[idx], train_labels=train.labels[idx])
            keys[name] = init_identity(sdir / "state").public_line(name)
            site_section = {"data": "data.npz", "state_dir": "state", "aggregator": "AGGREGATOR_URL",
                            "epsilon": opts.epsilon, "federation": self.plan.federation_id,
                            "ca_file": "../../federation/tls/ca.pem" if opts.tls else None,
                            "insecure": not opts.tls, "torch_threads": 1,
                            "simulation_seed": site_seed(opts.seed, i) if opts.seeded else None,
                            "operator": f"simulated operator of {name}"}
            bounds = {"require_dp": opts.dp, "require_secagg": opts.secagg,
                      "max_rounds": max(self.plan.rounds, SiteBounds().max_rounds)}
            (sdir / "site.toml").write_text(render_toml({"site": site_section, "bounds": bounds}))
        federation = {"state_dir": "state", "host": "127.0.0.1", "port": 0, "port_file": "port",
                      "insecure": not opts.tls, "linger_s": 0}
        if opts.tls:
            federation |= {"cert": "tls/server.pem", "key": "tls/server.key"}
        (fed / "federation.toml").write_text(render_toml({
            "federation": federation, "plan": self.plan.to_dict(), "sites": keys}))

    # -- running ---------------------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str], cwd: Path, log_file: Path) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        fh = open(log_file, "ab")  # noqa: SIM115 - kept open for the child's lifetime
        self.procs[name] = subprocess.Popen([sys.executable, "-m", "hemafed.network.node", *args], cwd=cwd,
                                            stdout=fh, stderr=subprocess.STDOUT, env=env)

    def run(self) -> dict[str, Any]:
        started = time.time()
        self.setup()
        fed = self.out / "federation"
        insecure = [] if self.opts.tls else ["--insecure"]
        self._spawn("aggregator", ["aggregator", "--config", "federation.toml", *insecure], fed,
                    fed / "aggregator.log")
        port_file = fed / "port"
        deadline = time.monotonic() + 120
        while not port_file.exists():
            if self.procs["aggregator"].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the aggregator did not start; see {fed / 'aggregator.log'}")
            time.sleep(0.1)
        scheme = "wss" if self.opts.tls else "ws"
        url = f"{scheme}://127.0.0.1:{port_file.read_text().strip()}"
        drops = {d.site: d for d in self.opts.drops}
        for i in range(1, self.opts.sites + 1):
            sdir = self.out / "sites" / site_name(i)
            toml = sdir / "site.toml"
            toml.write_text(toml.read_text().replace("AGGREGATOR_URL", url))
            args = ["site", "--config", "site.toml", *insecure]
            if i in drops:
                args += ["--die-at", f"{drops[i].round}:{drops[i].stage}"]
            self._spawn(site_name(i), args, sdir, sdir / "site.log")
        try:
            evaluated = self._monitor()
        finally:
            self._stop_all()
        return self._collect(evaluated, time.time() - started)

    def _monitor(self) -> dict[int, float]:
        from hemafed.core.learning.checkpoints import CheckpointStore

        store = CheckpointStore(self.out / "federation" / "state" / "checkpoints")
        evaluated: dict[int, float] = {}
        agg = self.procs["aggregator"]
        last_line = ""
        every = self.opts.eval_every or max(1, self.plan.rounds // 50)
        sites = [p for name, p in self.procs.items() if name != "aggregator"]
        while True:
            finished = agg.poll() is not None
            if not finished and all(p.poll() is not None for p in sites):
                raise RuntimeError(f"every hospital stopped before the federation finished; see their logs, "
                                   f"{self.out / 'sites'}/*/site.log")
            rounds = store.rounds()
            for rnd in rounds:
                # every k-th checkpoint while running, and the last one at the end
                due = rnd % every == 0 or (finished and rnd == max(rounds))
                if rnd not in evaluated and due:
                    evaluated[rnd] = self.test_accuracy(store.load(rnd).weights)
            status = self._status()
            line = self._progress_line(status, evaluated)
            if line != last_line and not self.opts.quiet:
                if sys.stderr.isatty():
                    print("\r" + line.ljust(100), end="", file=sys.stderr, flush=True)
                else:
                    print(line, file=sys.stderr, flush=True)
                last_line = line
            if finished:
                if sys.stderr.isatty() and not self.opts.quiet:
                    print(file=sys.stderr)
                if agg.returncode != 0:
                    raise RuntimeError(f"the aggregator exited with {agg.returncode}; see "
                                       f"{self.out / 'federation' / 'aggregator.log'}")
                return evaluated
            time.sleep(0.5)

    def _status(self) -> dict[str, Any]:
        try:
            return json.loads((self.out / "federation" / "state" / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def _progress_line(self, status: dict[str, Any], evaluated: dict[int, float]) -> str:
        rounds = self.plan.rounds
        done = max((r for r in evaluated if r > 0), default=0)
        acc = f"  test acc {evaluated[done]:.3f}" if evaluated else ""
        preparing = status.get("preparing") or {}
        if preparing and done == 0:
            total = sum(p["total"] for p in preparing.values()) or 1
            share = sum(p["done"] for p in preparing.values()) / total
            left = max((p.get("eta_s") or 0 for p in preparing.values()), default=0)
            prep = f", {len(preparing)} preparing their images ({share:.0%}, about {left / 60:.0f} min left)"
        else:
            prep = ""
        return progress_bar(done, rounds, f"round {min(status.get('round', 1), rounds)}/{rounds} "
                            f"{status.get('stage', 'starting')}, {len(status.get('ready', []))} sites ready{prep}"
                            f"{acc}")

    def _stop_all(self) -> None:
        deadline = time.monotonic() + 30
        for _name, proc in self.procs.items():
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()

    # -- results -------------------------------------------------------------------------------

    def test_accuracy(self, weights: np.ndarray) -> float:
        """Accuracy on the held-out test split, as `hemafed classify` sees the model (with its test-time
        augmentation); a model's fixed features of the test images come from the feature cache."""
        from hemafed.core.learning.dp_train import accuracy, evaluate
        from hemafed.core.learning.models import set_flat_params

        if self._test_inputs is None:
            self._trainable, self._test_inputs = evaluation_inputs(self.plan, self.test_x)
        set_flat_params(self._trainable, weights)
        return accuracy(evaluate(self._trainable, self._test_inputs, self.test_y, len(self.plan.classes)))

    def _collect(self, evaluated: dict[int, float], wall_s: float) -> dict[str, Any]:
        from hemafed.core.learning.checkpoints import CheckpointStore
        from hemafed.network.sim.report import write_metrics, write_plots, write_report

        store = CheckpointStore(self.out / "federation" / "state" / "checkpoints")
        site_logs = {site_name(i): _round_log(self.out / "sites" / site_name(i) / "state")
                     for i in range(1, self.opts.sites + 1)}
        rounds = []
        last_eps: dict[str, float] = {}
        prev_bytes: dict[str, tuple[int, int]] = {}
        by_round: dict[str, dict[int, list[dict[str, Any]]]] = {}
        for name, log_entries in site_logs.items():
            for e in log_entries:
                by_round.setdefault(name, {}).setdefault(e.get("round"), []).append(e)
        for entry in store.read_log():
            rnd = entry["round"]
            eps, traffic = {}, {}
            for name in site_logs:
                for e in by_round.get(name, {}).get(rnd, []):
                    if e["round"] == rnd and e["status"] == "trained" and e.get("epsilon") is not None:
                        last_eps[name] = e["epsilon"]
                    if e["round"] == rnd and e["status"] == "round_end":
                        sent, recv = prev_bytes.get(name, (0, 0))
                        traffic[name] = {"sent": e["bytes_sent"] - sent, "received": e["bytes_received"] - recv}
                        prev_bytes[name] = (e["bytes_sent"], e["bytes_received"])
                if name in last_eps:
                    eps[name] = round(last_eps[name], 4)
            rounds.append({
                "round": rnd, "status": entry["status"], "test_accuracy": evaluated.get(rnd),
                "fed_val_accuracy": entry.get("fed_val_accuracy"), "participants": entry["participants"],
                "survivors": entry["survivors"], "dropouts": entry["dropouts"], "declined": entry["declined"],
                "reason": entry.get("reason", ""), "wall_s": entry["wall_s"], "epsilon": eps, "bytes": traffic,
            })
        final_round = max(evaluated)
        latest = store.load(final_round)
        from hemafed.core.learning.confidence import Calibration
        from hemafed.core.rounds.agg_round import (
            CELL_FALSE_ALARMS,
            federation_cell_threshold,
            federation_class_mix,
            federation_temperature,
        )
        from hemafed.network.site import save_model_file

        log = store.read_log()
        temperature = federation_temperature(log)
        save_model_file(self.out / "final_model.npz", latest.weights, self.plan, final_round,
                        None if temperature is None else Calibration.federation_only(
                            temperature, cell_threshold=federation_cell_threshold(log),
                            cell_false_alarms=CELL_FALSE_ALARMS, federation_classes=federation_class_mix(log)))
        plan = self.plan.to_dict()
        plan["epsilon_budget"] = self.opts.epsilon if self.opts.dp else None
        plan["partition"] = self.opts.partition
        plan["sites"] = self.opts.sites
        max_eps = max((e for r in rounds for e in r["epsilon"].values()), default=None)
        names = [site_name(i) for i in range(1, self.opts.sites + 1)]
        missed = {name: [r["round"] for r in rounds if name not in r["participants"]] for name in names}
        title = (f"{self.opts.sites} hospitals, {self.opts.partition}, "
                 f"{'DP ε=' + format(self.opts.epsilon, 'g') if self.opts.dp else 'non-private'}, "
                 f"{'secure aggregation' if self.opts.secagg else 'plain aggregation'}")
        metrics = {
            "title": title, "command": self.command, "options": _jsonable(asdict(self.opts)), "plan": plan,
            "site_class_counts": {site_name(i + 1): row.tolist() for i, row in enumerate(self.counts)},
            "initial_test_accuracy": evaluated.get(0), "rounds": rounds,
            "final": {"test_accuracy": evaluated[final_round], "test_images": len(self.test_y),
                      "max_epsilon": None if max_eps is None else round(max_eps, 3), "wall_s": round(wall_s, 1),
                      "rounds_with_every_site": sum(1 for r in rounds if set(names) <= set(r["participants"]))},
            "missed_rounds": {name: rnds for name, rnds in missed.items() if rnds},
        }
        write_metrics(self.out, metrics)
        write_plots(self.out, metrics)
        write_report(self.out, metrics)
        return metrics


def evaluation_inputs(plan: FederationPlan, images: np.ndarray):
    """(the model's trainable part, the evaluation inputs of `images`): the fixed features of its evaluation
    view, read from (or added to) the feature cache, as a site's trainer prepares its validation images."""
    from hemafed.core.learning.models import build_model, split_features
    from hemafed.core.learning.site_trainer import model_inputs

    model = build_model(plan.model, len(plan.classes))
    return split_features(model)[1], model_inputs(plan, model, images, "eval")


def _round_log(state: Path) -> list[dict[str, Any]]:
    """A site's round log (its store), or [] when the site never got that far."""
    from hemafed.core.privacy.store import FILE_NAME, SiteStore

    if not (state / FILE_NAME).exists():
        return []
    return SiteStore(state).round_log()


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
