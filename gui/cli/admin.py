"""Commands for a federation's admin: certificates and the headless aggregator."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    _register_certs(sub)

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
    from hemafed.core.certs import create_federation_certs
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
    from hemafed.core.plan import PlanError
    from hemafed.gui.cli import UserFacingError
    from hemafed.network.node import run_aggregator

    try:
        return run_aggregator(args.config, args.insecure)
    except (PlanError, ValueError, OSError) as exc:
        raise UserFacingError(str(exc)) from exc
