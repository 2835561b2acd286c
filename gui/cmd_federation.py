"""`hemafed keys …` and `hemafed certs`: channel security (the runtime commands are in
`cmd_runtime`)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    _register_keys(sub)
    _register_certs(sub)


# -- keys ----------------------------------------------------------------------------


def _register_keys(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keys", help="this site's Ed25519 identity key")
    keys = p.add_subparsers(dest="keys_command", metavar="ACTION")

    k = keys.add_parser("init", help="create the identity key and print what to send to the aggregator's admin")
    k.add_argument("--state", help="state directory (default: HEMAFED_STATE_DIR or the user data directory)")
    k.add_argument("--force", action="store_true", help="replace an existing key (the aggregator must be told)")
    k.add_argument("--comment", default="", help="label appended to the public-key line, e.g. the hospital name")
    k.set_defaults(func=_keys_init)

    k = keys.add_parser("show", help="print the fingerprint and public-key line")
    k.add_argument("--state", help="state directory")
    k.add_argument("--comment", default="", help="label appended to the public-key line")
    k.set_defaults(func=_keys_show)

    p.set_defaults(func=lambda args: p.print_help() or 2)


def _keys_init(args: argparse.Namespace) -> int:
    from hemafed.core.identity import IdentityError, init_identity
    from hemafed.gui.cli import UserFacingError

    try:
        identity = init_identity(args.state, force=args.force)
    except IdentityError as exc:
        raise UserFacingError(str(exc)) from exc
    print(f"created {identity.path} (readable by you only)")
    _print_identity(identity, args.comment)
    return 0


def _keys_show(args: argparse.Namespace) -> int:
    from hemafed.core.identity import IdentityError, load_identity
    from hemafed.gui.cli import UserFacingError

    try:
        identity = load_identity(args.state)
    except IdentityError as exc:
        raise UserFacingError(str(exc)) from exc
    _print_identity(identity, args.comment)
    return 0


def _print_identity(identity: object, comment: str) -> None:
    from hemafed.core.identity import IdentityKey, short_fingerprint

    assert isinstance(identity, IdentityKey)
    print(f"fingerprint: {identity.fingerprint}")
    print(f"short form:  {short_fingerprint(identity.public_key)}")
    print("public key (send this line to the aggregator's admin; confirm the fingerprint by phone):")
    print(identity.public_line(comment))


# -- certs ---------------------------------------------------------------------------


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
