"""`hemafed privacy plan`, `hemafed ledger` and `hemafed train-central`."""

from __future__ import annotations

import argparse
import json
import math
import sys


def register(sub: argparse._SubParsersAction) -> None:
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
    plan.add_argument("--local-steps", type=int, default=None, help="fixed local steps per round (overrides epochs)")
    plan.add_argument("--accountant", choices=("rdp", "prv"), default="rdp")
    plan.add_argument("--json", action="store_true")
    plan.set_defaults(func=_plan)

    p = sub.add_parser("ledger", help="privacy spent per federation at this site")
    p.add_argument("--state", help="site state directory (default: the user's)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_ledger)

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


def _plan(args: argparse.Namespace) -> int:
    from hemafed.core.calibration import BudgetTooSmall, plan_privacy
    from hemafed.gui.cli import UserFacingError

    try:
        plan = plan_privacy(args.epsilon, args.samples, args.batch, args.rounds, args.local_epochs,
                            delta=args.delta, local_steps=args.local_steps, kind=args.accountant)
    except (BudgetTooSmall, ValueError) as exc:
        raise UserFacingError(str(exc)) from exc
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
        return 0
    print(f"budget ε = {plan.epsilon:g} at δ = {plan.delta:.2e} ({plan.accountant.upper()} accounting)")
    print(f"N = {plan.n_samples}, B = {plan.batch_size}: sample rate q = {plan.sample_rate:.5g}, "
          f"{plan.steps_per_round} steps per round, {plan.total_steps} steps in {plan.rounds} rounds")
    print(f"noise multiplier σ = {plan.sigma:.4f} (noise std σ·C per step)")
    print("\nround  ε after round")
    for i, eps in enumerate(plan.epsilon_per_round, 1):
        print(f"{i:5d}  {eps:.4f}")
    return 0


def _ledger(args: argparse.Namespace) -> int:
    from hemafed.core.ledger import list_ledgers

    ledgers = list_ledgers(args.state)
    if args.json:
        print(json.dumps(ledgers, indent=2))
        return 1 if any("error" in entry for entry in ledgers) else 0
    if not ledgers:
        print("no privacy ledgers yet")
        return 0
    print(f"{'federation':<28}{'rounds':>7}{'spent ε':>10}{'budget ε':>10}{'δ':>10}  accountant")
    for entry in ledgers:
        if "error" in entry:
            print(f"DAMAGED {entry['path']}: {entry['error']}", file=sys.stderr)
            continue
        print(f"{entry['federation_id']:<28}{entry['rounds']:>7}{entry['spent_epsilon']:>10.4f}"
              f"{entry['budget_epsilon']:>10.4g}{entry['delta']:>10.1e}  {entry['accountant']}")
    return 1 if any("error" in entry for entry in ledgers) else 0


def _train_central(args: argparse.Namespace) -> int:
    from hemafed.core.bloodmnist import DatasetUnavailable
    from hemafed.core.calibration import BudgetTooSmall
    from hemafed.core.central import train_central
    from hemafed.gui.cli import UserFacingError

    def epoch_done(epoch: int, total: int, loss: float) -> None:
        if not args.json:
            print(f"epoch {epoch}/{total}: mean loss {loss:.4f}", file=sys.stderr, flush=True)

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
