"""Commands for a federation's admin: certificates and the headless aggregator.

Each command imports what it needs inside its own function, so that `hemafed --help` and the light commands
start without loading torch, Opacus or Qt (start-up time); the whole CLI is one process per command."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    _register_certs(sub)
    _register_roster(sub)

    p = sub.add_parser("aggregator", help="run the headless aggregator of a federation")
    p.add_argument("--config", required=True, help="federation.toml (plan, allowed site keys, TLS files)")
    p.add_argument("--insecure", action="store_true", help="allow plain ws:// (local tests only)")
    p.set_defaults(func=_aggregator)


def _register_certs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("certs", help="create a small CA and the aggregator's TLS certificate")
    p.add_argument("--out", required=True, help="folder for ca.pem, server.pem, server.key")
    p.add_argument("--host", action="append", required=True, metavar="NAME",
                   help="host name or IP address sites use to reach the aggregator (repeatable)")
    p.add_argument("--name", default="hemafed federation", help="federation name in the CA's subject")
    p.add_argument("--days", type=int, default=825, help="server certificate validity in days (default 825)")
    p.add_argument("--keep-ca-key", action="store_true",
                   help="also write ca.key to issue later certificates (keep it offline)")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.set_defaults(func=_certs)


def _certs(args: argparse.Namespace) -> int:
    from hemafed.core.trust.certs import create_federation_certs
    from hemafed.gui.cli import UserFacingError

    if args.days <= 0:
        raise UserFacingError("--days must be positive")
    try:
        made = create_federation_certs(
            args.out, args.host, name=args.name, server_days=args.days,
            keep_ca_key=args.keep_ca_key, force=args.force,
        )
    except (FileExistsError, ValueError, OSError) as exc:
        raise UserFacingError(str(exc)) from exc
    print(f"aggregator certificate: {made.cert_file}")
    print(f"aggregator private key: {made.key_file} (readable by you only; stays on the aggregator)")
    if made.ca_key_file is not None:
        print(f"CA private key:         {made.ca_key_file} (move it offline)")
    print(f"give every site:        {made.ca_file}")
    print(f"CA fingerprint (SHA-256, confirm with each site): {made.ca_fingerprint}")
    print(f"valid for: {', '.join(args.host)}")
    return 0


def _aggregator(args: argparse.Namespace) -> int:
    from hemafed.core.rounds.plan import PlanError
    from hemafed.gui.cli import UserFacingError
    from hemafed.network.node import run_aggregator

    try:
        return run_aggregator(args.config, args.insecure)
    except (PlanError, ValueError, OSError) as exc:
        raise UserFacingError(str(exc)) from exc


def _register_roster(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("roster", help="sign the federation's roster of site keys (run off the aggregator host)")
    rsub = p.add_subparsers(dest="roster_command", metavar="ACTION")
    p.set_defaults(func=lambda _args: p.print_help() or 2)
    s = rsub.add_parser("sign", help="sign the [sites] of federation.toml with the federation key")
    s.add_argument("--admin-state", required=True,
                   help="state folder holding the federation key (create it with `hemafed keys init --state DIR`)")
    s.add_argument("--config", required=True, help="federation.toml: its plan's federation_id and [sites]")
    s.add_argument("--out", required=True, help="roster.json to give every site")
    s.set_defaults(func=_roster_sign)


def _roster_sign(args: argparse.Namespace) -> int:
    from hemafed.core.rounds.plan import PlanError, load_toml
    from hemafed.core.trust.identity import IdentityError, load_identity, short_fingerprint
    from hemafed.core.trust.roster import write_roster
    from hemafed.gui.cli import UserFacingError

    try:
        data = load_toml(args.config)
        fed = data.get("plan", {}).get("federation_id", "bloodmnist-demo")
        sites = data.get("sites")
        if not isinstance(sites, dict) or not sites:
            raise PlanError(f"{args.config} has no [sites] table")
        admin = load_identity(args.admin_state)
        path = write_roster(args.out, admin, fed, sites)
    except (PlanError, IdentityError, OSError) as exc:
        raise UserFacingError(str(exc)) from exc
    print(f"roster of federation {fed!r} with {len(sites)} sites written to {path}")
    print("give every site roster.json and this federation key line (roster_key in site.toml);")
    print(f"confirm its fingerprint by phone: {short_fingerprint(admin.public_key)}")
    print(admin.public_line("federation"))
    return 0
