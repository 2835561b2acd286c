"""Commands for researchers: demo data, privacy planning, the centralised baseline,
the simulation and the comparison experiment.
Each command imports what it needs inside its own function, so that `hemafed --help` and the light commands
start without loading torch, Opacus or Qt (start-up time); the whole CLI is one process per command."""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

# `hemafed audit --control`: the faults of network.sim.audit_trainer.FAULTS (named here, not imported: start-up time;
# tests/test_audit.py checks the two agree)
AUDIT_CONTROLS = ("noise/4",)

ROUNDS_HELP = ("rounds (default: the recipe's for the budget: 500 above ε = 2.5, 250 down to ε = 1.5, 125 "
               "below; core.learning.recipe.schedule)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo-data", help="write simulated hospital folders from BloodMNIST")
    p.add_argument("--sites", type=int, default=10)
    p.add_argument("--partition", default="dirichlet:0.5", help="iid or dirichlet:ALPHA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder (one sub-folder per hospital)")
    p.add_argument("--format", choices=("png", "jpg", "bmp", "tiff"), default="png")
    p.add_argument("--data", help="BloodMNIST .npz or folder holding it (default: find or download)")
    p.set_defaults(func=_demo_data)

    p = sub.add_parser("privacy", help="differential-privacy planning")
    psub = p.add_subparsers(dest="privacy_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda _args: p.print_help() or 2)
    plan = psub.add_parser("plan", help="noise multiplier σ that makes a federation plan fit an (ε, δ) budget")
    plan.add_argument("--epsilon", type=float, required=True, help="ε budget for the whole federation")
    plan.add_argument("--delta", type=float, default=None, help="δ (default: min(1e-5, 1/N))")
    plan.add_argument("--samples", type=int, required=True, help="N, training images at the site")
    plan.add_argument("--batch", type=int, required=True, help="expected batch size B (q = B/N)")
    plan.add_argument("--rounds", type=int, required=True)
    plan.add_argument("--local-epochs", type=int, default=1)
    plan.add_argument("--accountant", choices=("rdp", "prv"), default="rdp")
    plan.add_argument("--json", action="store_true")
    plan.set_defaults(func=_plan)
    fs = psub.add_parser("fedsgd-plan", help="the [plan] of a DP-FedSGD federation: σ shared by all sites for an "
                                             "(ε, δ) per site, and the expected batch")
    fs.add_argument("--epsilon", type=float, default=8.0, help="ε each site spends over the whole plan (default 8)")
    fs.add_argument("--delta", type=float, default=1e-5)
    fs.add_argument("--rounds", type=int, default=None, help=ROUNDS_HELP)
    fs.add_argument("--sample-rate", type=float, default=0.1713, help="Poisson rate q per image per round")
    fs.add_argument("--images", type=int, required=True,
                    help="training images over all sites (each site's count, as the sites declare it)")
    fs.add_argument("--sites", type=int, required=True, help="sites allowed in the federation")
    fs.add_argument("--threshold", type=int, help="secure-aggregation threshold t (default: all sites but one)")
    fs.add_argument("--dp-mode", choices=("distributed", "local"), default="distributed")
    fs.add_argument("--model", help="a model of the registry (default: the recipe's)")
    fs.add_argument("--federation-id", default="bloodmnist-demo")
    fs.set_defaults(func=_fedsgd_plan)

    p = sub.add_parser("train-central", help="centralised baseline on BloodMNIST (non-private or DP)")
    p.add_argument("--data", help="BloodMNIST .npz or folder holding it (default: find or download)")
    p.add_argument("--model", default="resnet_gn_28")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--epsilon", type=float, default=None, help="train with DP-SGD at this ε (default: non-private)")
    p.add_argument("--delta", type=float, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--clip", type=float, default=1.0, help="per-sample clipping norm C")
    p.add_argument("--subset", type=int, default=None, help="train on this many images only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_train_central)

    from hemafed.network.sim.simulate import SimulationOptions

    d = SimulationOptions()
    p = sub.add_parser("simulate", help="run N hospitals and an aggregator as processes on this machine")
    p.add_argument("--sites", type=int, default=d.sites)
    p.add_argument("--rounds", type=int, default=d.rounds, help=ROUNDS_HELP)
    p.add_argument("--epsilon", type=float, default=d.epsilon,
                   help=f"privacy budget per hospital (default {d.epsilon:g})")
    p.add_argument("--delta", type=float, default=d.delta)
    p.add_argument("--partition", default=d.partition, help="iid or dirichlet:ALPHA")
    p.add_argument("--no-dp", dest="dp", action="store_false", help="non-private baseline (no DP)")
    p.add_argument("--no-secagg", dest="secagg", action="store_false",
                   help="plain aggregation (the aggregator sees each update)")
    p.add_argument("--insecure", dest="tls", action="store_false", help="plain ws:// instead of TLS")
    p.add_argument("--threshold", type=int, help="secure-aggregation threshold t (default: all sites but one)")
    p.add_argument("--drop", action="append", default=[], metavar="SITE@ROUND:STAGE",
                   help="kill hospital SITE's process at STAGE (train, keys, shares, masked, unmask) of ROUND")
    p.add_argument("--out", type=Path, default=d.out)
    p.add_argument("--data", type=Path, help="BloodMNIST .npz or folder holding it")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--subset", type=int, help="use only this many training images (quick runs)")
    p.add_argument("--test-subset", type=int, help="evaluate on only this many test images (quick runs)")
    p.add_argument("--unseeded", dest="seeded", action="store_false",
                   help="hospitals draw fresh OS randomness, as real sites do (default: from --seed, so a run "
                        "replays exactly)")
    p.add_argument("--model", default=d.model, help=f"model from the registry (default {d.model})")
    p.add_argument("--appearance", choices=("same", "shifted"), default=d.appearance,
                   help="shifted: each hospital's images get their own stain, lamp, focus and magnification "
                        "(core.data.appearance; the test split stays as it is)")
    p.add_argument("--algorithm", choices=("fedsgd", "fedavg"), default=d.algorithm,
                   help="fedsgd: one DP-SGD step per round (default); fedavg: local epochs per round")
    p.add_argument("--dp-mode", choices=("distributed", "local"), default=d.dp_mode,
                   help="fedsgd: noise shares inside secure aggregation (default) or full noise at each site")
    p.add_argument("--sample-rate", type=float, default=d.sample_rate,
                   help=f"fedsgd: Poisson rate per image per round (default {d.sample_rate})")
    p.add_argument("--local-epochs", type=int, default=d.local_epochs, help="fedavg only")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="fedavg only")
    p.add_argument("--lr", type=float, default=d.lr, help=f"fedavg: local learning rate (default {d.lr})")
    p.add_argument("--momentum", type=float, default=d.momentum, help=f"SGD momentum (default {d.momentum})")
    p.add_argument("--clip-norm", type=float, default=d.clip_norm)
    p.add_argument("--server-optimizer", choices=("fedavg", "fedadam"), default=d.server_optimizer,
                   help="fedavg only")
    p.add_argument("--server-lr", type=float, default=d.server_lr,
                   help="server step size (default: for private fedsgd the recipe's 2.6/σ, at most 1; else 0.5)")
    p.add_argument("--eval-every", type=int, help="test-evaluate every k-th round (default: about 50 points)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_simulate)

    p = sub.add_parser("audit", help="one-run empirical privacy audit of the training path (canaries; ε̂, a lower "
                                     "bound on ε at 95 %% confidence)")
    p.add_argument("--epsilon", type=float, default=d.epsilon, help=f"ε per hospital of the recipe's plan (default "
                                                                    f"{d.epsilon:g})")
    p.add_argument("--site", type=Path, metavar="STATE_DIR",
                   help="audit the plan this site accepted last (from its store) and record the result there, "
                        "for its privacy report")
    p.add_argument("--canaries", type=int, default=5000,
                   help="gradient canaries (white-box; at most half the model's coordinates; default 5000)")
    p.add_argument("--input-canaries", type=int, default=1000, help="input canaries (black-box; default 1000)")
    p.add_argument("--control", choices=AUDIT_CONTROLS, default=None,
                   help="a deliberate fault the audit should catch (a control run; never recorded for a site)")
    p.add_argument("--sites", type=int, default=d.sites)
    p.add_argument("--rounds", type=int, default=d.rounds, help=ROUNDS_HELP)
    p.add_argument("--subset", type=int, help="use only this many training images (quick runs)")
    p.add_argument("--seed", type=int, default=0, help="seeds the run and the canaries' draws")
    p.add_argument("--data", type=Path, help="BloodMNIST .npz or folder holding it")
    p.add_argument("--threads", type=int, help="torch threads")
    p.add_argument("--out", type=Path, help="result JSON (default results/audit/eps<ε>[-<control>].json)")
    p.add_argument("--doc", type=Path, help="then rewrite this Markdown table (e.g. docs/AUDIT.md) from every "
                                            "result in --out's folder")
    p.set_defaults(func=_audit)

    p = sub.add_parser("experiment", help="the privacy-utility table of docs/RESULTS.md: centralised, one hospital "
                                          "alone, the federation (non-private, local DP, distributed DP), ε sweep")
    p.add_argument("--epsilons", default="3,8", help="ε per hospital of the headline rows (default 3,8)")
    p.add_argument("--sweep", default="1,2,3,5,8", help="ε of the accuracy-against-ε plot (default 1,2,3,5,8)")
    p.add_argument("--partitions", default="dirichlet:0.5,iid", help="comma-separated; the first is the main one")
    p.add_argument("--seeds", default="0,1,2", help="seeds of every in-process row (default 0,1,2)")
    p.add_argument("--sites", type=int, default=10)
    p.add_argument("--rounds", type=int, default=None, help="rounds of the private recipe (default: simulate's)")
    p.add_argument("--threshold", type=int, default=None,
                   help="secure-aggregation threshold t of every federated row (default: simulate's)")
    p.add_argument("--no-main-job", action="store_true", help="skip the one real run of the main job")
    p.add_argument("--model", default=d.model, help=f"model of every row (default: the recipe's, {d.model})")
    p.add_argument("--dp-modes", default="local,distributed",
                   help="the federation's DP modes in the federated and sweep rows (default local,distributed)")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows an interrupted run already wrote to OUT/results.json (same seeds)")
    p.add_argument("--workers", type=int, default=2, help="runs at a time, one process each (default 2)")
    p.add_argument("--out", type=Path, default=Path("results/experiment"))
    p.add_argument("--doc", type=Path, default=Path("docs/RESULTS.md"))
    p.add_argument("--data", type=Path)
    p.set_defaults(func=_experiment)


def _demo_data(args: argparse.Namespace) -> int:
    from hemafed.core.data.demo_data import write_demo_sites
    from hemafed.gui.cli import UserFacingError

    try:
        summary = write_demo_sites(
            out=args.out, n_sites=args.sites, scheme=args.partition, seed=args.seed,
            fmt=args.format, data=args.data,
        )
    except (ValueError, FileExistsError) as exc:
        raise UserFacingError(str(exc)) from exc
    print(summary.table())
    return 0


def _plan(args: argparse.Namespace) -> int:
    """σ and ε per round of a FedAvg plan at one site, as that site's trainer will compute them when it joins."""
    from hemafed.core.learning.site_trainer import FedAvgTrainer
    from hemafed.core.rounds.plan import FederationPlan, PlanError, SiteBounds
    from hemafed.gui.cli import UserFacingError

    try:
        plan = FederationPlan(federation_id="plan", algorithm="fedavg", dp_mode="local", noise_multiplier=0.0,
                              rounds=args.rounds, local_epochs=args.local_epochs, batch_size=args.batch,
                              delta=args.delta if args.delta is not None else 1e-5)
        if args.epsilon <= 0 or args.samples <= 0:
            raise ValueError("ε and the number of samples must be positive")
        bounds = SiteBounds(max_rounds=max(args.rounds, 1), max_local_epochs=max(args.local_epochs, 1), max_delta=1.0)
        proj = FedAvgTrainer(plan, bounds=bounds).project(args.epsilon, args.samples, accountant=args.accountant)
    except (PlanError, ValueError) as exc:
        raise UserFacingError(str(exc)) from exc
    if proj.refusal:
        raise UserFacingError(proj.refusal)
    total_steps = proj.steps_per_round * plan.rounds
    if args.json:
        print(json.dumps({"epsilon": args.epsilon, "delta": proj.delta, "n_samples": args.samples,
                          "batch_size": args.batch, "rounds": plan.rounds, "local_epochs": plan.local_epochs,
                          "sigma": proj.sigma, "sample_rate": proj.sample_rate,
                          "steps_per_round": proj.steps_per_round, "total_steps": total_steps,
                          "accountant": args.accountant, "epsilon_per_round": list(proj.epsilon_per_round)},
                         indent=2))
        return 0
    print(f"budget ε = {args.epsilon:g} at δ = {proj.delta:.2e} ({args.accountant.upper()} accounting)")
    print(f"N = {args.samples}, B = {args.batch}: sample rate q = {proj.sample_rate:.5g}, "
          f"{proj.steps_per_round} steps per round, {total_steps} steps in {plan.rounds} rounds")
    print(f"noise multiplier σ = {proj.sigma:.4f} (noise std σ·C per step)")
    print("\nround  ε after round")
    for i, eps in enumerate(proj.epsilon_per_round, 1):
        print(f"{i:5d}  {eps:.4f}")
    return 0


def _fedsgd_plan(args: argparse.Namespace) -> int:
    from hemafed.core.learning.recipe import recommended_plan
    from hemafed.core.rounds.plan import PlanError
    from hemafed.gui.cli import UserFacingError
    from hemafed.network.config import render_toml

    try:
        plan = recommended_plan(args.epsilon, args.images, args.sites, args.dp_mode,
                                federation_id=args.federation_id, rounds=args.rounds,
                                sample_rate=args.sample_rate, delta=args.delta, threshold=args.threshold,
                                **({"model": args.model} if args.model else {}))
    except (PlanError, KeyError, ValueError) as exc:
        raise UserFacingError(str(exc)) from exc
    sigma = plan.noise_multiplier
    print(f"# DP-FedSGD: ε = {args.epsilon:g} per site at δ = {args.delta:g} after {plan.rounds} rounds; "
          f"σ = {sigma:.4f} ({args.dp_mode} DP), q = {args.sample_rate}, expected batch {plan.batch_size}")
    # every field, not only those that differ from today's defaults: a plan must not change its meaning when a
    # later version's defaults do
    print(render_toml({"plan": plan.to_dict()}))
    return 0


def _train_central(args: argparse.Namespace) -> int:
    from hemafed.core.data.bloodmnist import DatasetUnavailable
    from hemafed.core.learning.central import train_central
    from hemafed.core.privacy.calibration import BudgetTooSmall
    from hemafed.gui.cli import UserFacingError

    def epoch_done(epoch: int, total: int) -> None:
        if not args.json:
            print(f"epoch {epoch}/{total}", file=sys.stderr, flush=True)

    try:
        result = train_central(args.data, model_name=args.model, epochs=args.epochs, epsilon=args.epsilon,
                               delta=args.delta, batch_size=args.batch, lr=args.lr, clip_norm=args.clip,
                               train_subset=args.subset, seed=args.seed, epoch_done=epoch_done)
    except (DatasetUnavailable, BudgetTooSmall, KeyError, ValueError) as exc:
        raise UserFacingError(str(exc)) from exc
    if args.json:
        data = result.to_dict()
        if data["epsilon"] is not None and not math.isfinite(data["epsilon"]):
            data["epsilon"] = None
        print(json.dumps(data, indent=2))
        return 0
    print(f"{result.privacy_label}: {result.model}, {result.epochs} epochs on {result.n_train} images, "
          f"test accuracy {result.test_accuracy:.4f} on {result.n_test} images ({result.seconds:.0f} s)")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from hemafed.gui.cli import UserFacingError
    from hemafed.network.sim.simulate import Drop, Simulation, SimulationOptions

    try:
        drops = [Drop.parse(d) for d in args.drop]
        opts = SimulationOptions(
            sites=args.sites, rounds=args.rounds, epsilon=args.epsilon, delta=args.delta, partition=args.partition,
            dp=args.dp, secagg=args.secagg, tls=args.tls, threshold=args.threshold, drops=drops, out=args.out,
            data=args.data, seed=args.seed, subset=args.subset, test_subset=args.test_subset, seeded=args.seeded,
            model=args.model, local_epochs=args.local_epochs,
            batch_size=args.batch_size, lr=args.lr, momentum=args.momentum, clip_norm=args.clip_norm,
            server_optimizer=args.server_optimizer, server_lr=args.server_lr, quiet=args.quiet,
            algorithm=args.algorithm, dp_mode=args.dp_mode, sample_rate=args.sample_rate,
            eval_every=args.eval_every, appearance=args.appearance)
        sim = Simulation(opts, command="hemafed " + shlex.join(sys.argv[1:]))
        metrics = sim.run()
    except (ValueError, FileExistsError, RuntimeError) as exc:
        raise UserFacingError(str(exc)) from exc
    final = metrics["final"]
    print(f"{metrics['title']}: final test accuracy {final['test_accuracy']:.3f}, "
          f"max ε spent {final['max_epsilon']}, {final['wall_s']:.0f} s. Results in {args.out}/ "
          f"(report.md, metrics.json, accuracy.png, epsilon.png, final_model.npz)")
    return 0


def _audit(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from hemafed.core.errors import HemafedError
    from hemafed.gui.cli import UserFacingError
    from hemafed.network.sim.audit import AuditOptions, run_audit
    from hemafed.network.sim.audit_doc import write_audit_doc
    from hemafed.network.sim.simulate import SimulationOptions

    sim = SimulationOptions(epsilon=args.epsilon, sites=args.sites, rounds=args.rounds, subset=args.subset,
                            seed=args.seed, data=args.data, quiet=True)
    plan = None
    if args.site is not None:
        if args.control:
            raise UserFacingError("a control run (--control) is never recorded for a site")
        from hemafed.core.privacy.store import SiteStore

        accepted = SiteStore(args.site).accepted_plans()
        if not accepted:
            raise UserFacingError(f"{args.site}: this site has not accepted a plan yet")
        from hemafed.core.rounds.plan import FederationPlan

        plan = FederationPlan.from_dict(accepted[-1]["plan"])
        sim = replace(sim, sites=plan.max_sites, rounds=plan.rounds, delta=plan.delta)
    opts = AuditOptions(sim=sim, plan=plan, canaries=args.canaries, input_canaries=args.input_canaries,
                        fault=args.control, seed=args.seed, threads=args.threads)
    name = f"eps{args.epsilon:g}" + (f"-{args.control.replace('/', '-')}" if args.control else "")
    out = args.out or Path("results/audit") / f"{name}.json"
    try:
        result = run_audit(opts, command="hemafed " + shlex.join(sys.argv[1:]))
    except (ValueError, HemafedError) as exc:
        raise UserFacingError(str(exc)) from exc
    result.save(out)
    if args.site is not None:
        from hemafed.core.privacy.store import SiteStore

        SiteStore(args.site).record_audit(result.plan["digest"], result.to_dict())
    g, i = result.gradient, result.input or {}
    print(f"ε = {result.claimed_epsilon:.3f} (ledger), δ = {result.delta:g}"
          + (f", control: {result.fault}" if result.fault else ""))
    print(f"ε̂ (95 %) gradient canaries: {g['epsilon_lower_bound']:.3f} ({g['correct']} of {g['guesses']} guesses "
          f"right, {g['canaries']} canaries)")
    if i:
        print(f"ε̂ (95 %) input canaries:    {i['epsilon_lower_bound']:.3f} ({i['correct']} of {i['guesses']} "
              f"guesses right, {i['canaries']} canaries)")
    print(f"noise measured / promised: {result.noise_ratio:.3f}; "
          + ("CAUGHT: ε̂ > ε" if result.caught else "not caught: ε̂ ≤ ε") + f"; {result.seconds:.0f} s; {out}")
    if args.doc is not None:
        write_audit_doc(out.parent, args.doc)
        print(f"table written to {args.doc}")
    return 0


def _experiment(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from hemafed.core.learning.models import get_spec
    from hemafed.gui.cli import UserFacingError
    from hemafed.network.sim.experiment import ExperimentOptions, run_experiment

    try:
        get_spec(args.model)
    except KeyError as exc:  # its message names the known models
        raise UserFacingError(exc.args[0]) from None
    floats = lambda text: tuple(float(e) for e in text.split(","))  # noqa: E731
    try:
        opts = ExperimentOptions(data=args.data, seeds=tuple(int(s) for s in args.seeds.split(",")),
                                 epsilons=floats(args.epsilons), sweep=floats(args.sweep),
                                 partitions=tuple(args.partitions.split(",")), sites=args.sites,
                                 dp_modes=tuple(args.dp_modes.split(",")), main_job=not args.no_main_job,
                                 workers=args.workers, resume=args.resume)
    except ValueError as exc:  # the options' own check (and a malformed number list)
        raise UserFacingError(f"--dp-modes/--seeds/--epsilons/--sweep: {exc}") from exc
    opts = replace(opts, base=replace(opts.base, model=args.model))
    if args.rounds is not None:
        opts = replace(opts, base=replace(opts.base, rounds=args.rounds))
    if args.threshold is not None:
        opts = replace(opts, base=replace(opts.base, threshold=args.threshold))
    rows = run_experiment(opts, out=args.out, doc=args.doc, command="hemafed " + shlex.join(sys.argv[1:]))
    for r in rows:
        print(f"{r.setting[:60]:<60} {r.partition:<14} ε={r.epsilon} acc={r.cell()}")
    print(f"table written to {args.doc}")
    return 0
