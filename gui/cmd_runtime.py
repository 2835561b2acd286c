"""`hemafed aggregator`, `hemafed site`, `hemafed simulate`: the federation at run time."""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("aggregator", help="run the headless aggregator of a federation")
    p.add_argument("--config", required=True, help="federation.toml (plan, allowed site keys, TLS files)")
    p.add_argument("--insecure", action="store_true", help="allow plain ws:// (local tests only)")
    p.set_defaults(func=_aggregator)

    p = sub.add_parser("site", help="run a hospital site headless (the desktop app drives the same code)")
    p.add_argument("--config", required=True, help="site.toml (data, state, aggregator URL, CA, ε budget)")
    p.add_argument("--insecure", action="store_true", help="allow plain ws:// (local tests only)")
    p.add_argument("--die-at", metavar="ROUND:STAGE", help=argparse.SUPPRESS)  # simulated crash, for demos
    p.set_defaults(func=_site)

    p = sub.add_parser("simulate", help="run N hospitals and an aggregator as processes on this machine")
    p.add_argument("--sites", type=int, default=10)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--epsilon", type=float, default=8.0, help="privacy budget per hospital (default 8)")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--partition", default="dirichlet:0.5", help="iid or dirichlet:ALPHA")
    p.add_argument("--no-dp", dest="dp", action="store_false", help="non-private baseline (no DP)")
    p.add_argument("--no-secagg", dest="secagg", action="store_false",
                   help="plain aggregation (the aggregator sees each update)")
    p.add_argument("--insecure", dest="tls", action="store_false", help="plain ws:// instead of TLS")
    p.add_argument("--threshold", type=int, help="secure-aggregation threshold t (default: majority)")
    p.add_argument("--drop", action="append", default=[], metavar="SITE@ROUND:STAGE",
                   help="kill hospital SITE's process at STAGE (train, keys, shares, masked, unmask) of ROUND")
    p.add_argument("--out", type=Path, default=Path("results/simulation"))
    p.add_argument("--data", type=Path, help="BloodMNIST .npz or folder holding it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--subset", type=int, help="use only this many training images (quick runs)")
    p.add_argument("--model", default="resnet_gn_28")
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1, help="local learning rate (default 0.1)")
    p.add_argument("--momentum", type=float, default=0.9, help="local SGD momentum (default 0.9)")
    p.add_argument("--clip-norm", type=float, default=1.0)
    p.add_argument("--server-optimizer", choices=("fedavg", "fedadam"), default="fedavg")
    p.add_argument("--server-lr", type=float, default=1.0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_simulate)
    register_experiment(sub)


def _confirm_insecure(cfg, flag: bool):
    """Plain ws:// needs both the config's `insecure = true` and --insecure on the command line."""
    from hemafed.core.plan import PlanError

    if cfg.insecure and not flag:
        raise PlanError("the configuration asks for plain ws:// (insecure = true); pass --insecure to confirm "
                        "this is a local test")
    return cfg


def _aggregator(args: argparse.Namespace) -> int:
    from hemafed.core.plan import PlanError
    from hemafed.gui.cli import UserFacingError
    from hemafed.network.aggregator import Aggregator
    from hemafed.network.config import AggregatorConfig

    try:
        aggregator = Aggregator(_confirm_insecure(AggregatorConfig.load(args.config), args.insecure))
    except (PlanError, ValueError, OSError) as exc:
        raise UserFacingError(str(exc)) from exc
    asyncio.run(aggregator.run())
    return 0


def _site(args: argparse.Namespace) -> int:
    from hemafed.core.identity import IdentityError
    from hemafed.core.plan import PlanError
    from hemafed.gui.cli import UserFacingError
    from hemafed.network.config import SiteConfig
    from hemafed.network.site import SiteRunner

    die_at = None
    if args.die_at:
        rnd, stage = args.die_at.split(":", 1)
        die_at = (int(rnd), stage)
    try:
        cfg = _confirm_insecure(SiteConfig.load(args.config), args.insecure)
        if cfg.torch_threads:
            import torch

            torch.set_num_threads(int(cfg.torch_threads))
        runner = SiteRunner(cfg, die_at=die_at)
    except (PlanError, IdentityError, ValueError, OSError) as exc:
        raise UserFacingError(str(exc)) from exc
    path = asyncio.run(runner.run())
    return 0 if path is not None else 1


def _simulate(args: argparse.Namespace) -> int:
    from hemafed.gui.cli import UserFacingError
    from hemafed.network.simulate import Drop, Simulation, SimulationOptions

    try:
        drops = [Drop.parse(d) for d in args.drop]
        opts = SimulationOptions(
            sites=args.sites, rounds=args.rounds, epsilon=args.epsilon, delta=args.delta, partition=args.partition,
            dp=args.dp, secagg=args.secagg, tls=args.tls, threshold=args.threshold, drops=drops, out=args.out,
            data=args.data, seed=args.seed, subset=args.subset, model=args.model, local_epochs=args.local_epochs,
            batch_size=args.batch_size, lr=args.lr, momentum=args.momentum, clip_norm=args.clip_norm,
            server_optimizer=args.server_optimizer, server_lr=args.server_lr, quiet=args.quiet)
        sim = Simulation(opts, command="hemafed " + shlex.join(sys.argv[1:]))
        metrics = sim.run()
    except (ValueError, FileExistsError, RuntimeError) as exc:
        raise UserFacingError(str(exc)) from exc
    final = metrics["final"]
    print(f"{metrics['title']}: final test accuracy {final['test_accuracy']:.3f}, "
          f"max ε spent {final['max_epsilon']}, {final['wall_s']:.0f} s. Results in {args.out}/ "
          f"(report.md, metrics.json, accuracy.png, epsilon.png, final_model.npz)")
    return 0


def register_experiment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experiment", help="the comparison table: centralised vs FedAvg vs +DP vs +secure aggregation")
    p.add_argument("--epsilons", default="3,8", help="ε per hospital, comma-separated (default 3,8)")
    p.add_argument("--partitions", default="iid,dirichlet:0.5", help="comma-separated (default iid,dirichlet:0.5)")
    p.add_argument("--sites", type=int, default=10)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--central-epochs", type=int, default=12)
    p.add_argument("--model", default="resnet_gn_28")
    p.add_argument("--out", type=Path, default=Path("results/experiment"))
    p.add_argument("--doc", type=Path, default=Path("docs/RESULTS.md"))
    p.add_argument("--data", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_experiment)


def _experiment(args: argparse.Namespace) -> int:
    from hemafed.network.experiment import run_experiment
    from hemafed.network.simulate import SimulationOptions

    base = SimulationOptions(sites=args.sites, rounds=args.rounds, data=args.data, seed=args.seed, model=args.model)
    rows = run_experiment(base, epsilons=[float(e) for e in args.epsilons.split(",")],
                          partitions=args.partitions.split(","), central_epochs=args.central_epochs, out=args.out,
                          doc=args.doc, command="hemafed " + shlex.join(sys.argv[1:]))
    for r in rows:
        print(f"{r.setting:<36} {r.partition:<15} ε={r.epsilon} acc={r.test_accuracy:.3f}")
    print(f"table written to {args.doc}")
    return 0
