"""Commands for a hospital site's operator: check images, the identity key, the
privacy ledger, and the headless site.
Each command imports what it needs inside its own function, so that `hemafed --help` and the light commands
start without loading torch, Opacus or Qt (start-up time); the whole CLI is one process per command."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("scan", help="check a folder, CSV manifest or .npz of images")
    p.add_argument("path", help="class-folder tree, CSV manifest (path,label) or MedMNIST .npz")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_scan)

    _register_keys(sub)

    p = sub.add_parser("ledger", help="privacy spent per federation at this site; `ledger budget` changes one's budget")
    p.add_argument("--state", help="site state directory (default: the user's)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_ledger)
    lsub = p.add_subparsers(dest="ledger_command", metavar="SUBCOMMAND")
    b = lsub.add_parser("budget", help="change a federation's ε budget (never below what is spent)")
    b.add_argument("federation", help="the federation's id, as `hemafed ledger` lists it")
    b.add_argument("epsilon", type=float, help="the new ε budget for that federation")
    b.add_argument("--reason", default="", help="why (kept in the ledger, e.g. the approval's reference)")
    b.add_argument("--state", help="site state directory (default: the user's)")
    b.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    b.set_defaults(func=_ledger_budget)

    p = sub.add_parser("site", help="run a hospital site headless (the desktop app drives the same code)")
    p.add_argument("--config", help="site.toml (data, state, aggregator URL, CA, ε budget)")
    p.add_argument("--insecure", action="store_true", help="allow plain ws:// (local tests only)")
    p.add_argument("--outbound", action="store_true",
                   help="print every message this site has sent (the outbound log) and exit; with --config or --state")
    p.add_argument("--state", help="with --outbound: the site's state directory (instead of --config)")
    p.add_argument("--federation", help="with --outbound: only this federation's messages")
    p.add_argument("--die-at", metavar="ROUND:STAGE", help=argparse.SUPPRESS)  # simulated crash, for demos
    p.set_defaults(func=_site)

    p = sub.add_parser("report", help="this site's signed privacy report (PDF and/or HTML), or check one's signature")
    p.add_argument("--site", metavar="STATE_DIR", help="the site's state directory (its store and identity key)")
    p.add_argument("--config", help="site.toml: its state directory, and its pinned roster for the report")
    p.add_argument("--federation", help="the federation to report on (default: the plan accepted last)")
    p.add_argument("--out", action="append", default=[], metavar="FILE.pdf|FILE.html",
                   help="where to write the report (repeat for both formats)")
    p.add_argument("--verify", metavar="FILE", help="check the signature of a report instead of writing one")
    p.add_argument("--expect", metavar="FINGERPRINT",
                   help="with --verify: the site's key fingerprint (or public-key line) the report must be signed by")
    p.set_defaults(func=_report)


def _scan(args: argparse.Namespace) -> int:
    from hemafed.core.data.scan import scan_source
    from hemafed.gui.cli import UserFacingError

    def progress(i: int, n: int) -> None:
        if sys.stderr.isatty() and not args.json:
            print(f"\rscanning {i}/{n}", end="" if i < n else "\n", file=sys.stderr)

    try:
        result = scan_source(args.path, progress=progress)
    except (FileNotFoundError, ValueError) as exc:
        raise UserFacingError(str(exc)) from exc
    if args.json:
        print(result.report.to_json())
    else:
        print("\n".join(result.report.summary_lines()))
    return 0


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
    from hemafed.core.trust.identity import IdentityError, init_identity
    from hemafed.gui.cli import UserFacingError

    try:
        identity = init_identity(args.state, force=args.force)
    except IdentityError as exc:
        raise UserFacingError(str(exc)) from exc
    print(f"created {identity.path} (readable by you only)")
    _print_identity(identity, args.comment)
    return 0


def _keys_show(args: argparse.Namespace) -> int:
    from hemafed.core.trust.identity import IdentityError, load_identity
    from hemafed.gui.cli import UserFacingError

    try:
        identity = load_identity(args.state)
    except IdentityError as exc:
        raise UserFacingError(str(exc)) from exc
    _print_identity(identity, args.comment)
    return 0


def _print_identity(identity: object, comment: str) -> None:
    from hemafed.core.trust.identity import IdentityKey, short_fingerprint

    assert isinstance(identity, IdentityKey)
    print(f"fingerprint: {identity.fingerprint}")
    print(f"short form:  {short_fingerprint(identity.public_key)}")
    print("public key (send this line to the aggregator's admin; confirm the fingerprint by phone):")
    print(identity.public_line(comment))


def _ledger(args: argparse.Namespace) -> int:
    from hemafed.core.privacy.ledger import list_ledgers

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


def _ledger_budget(args: argparse.Namespace) -> int:
    from hemafed.core.privacy.ledger import LedgerError, PrivacyLedger
    from hemafed.gui.cli import UserFacingError

    try:
        ledger = PrivacyLedger(args.federation, state=args.state)
    except FileNotFoundError:
        raise UserFacingError(f"this site has no ledger for federation {args.federation!r} (`hemafed ledger` "
                              "lists them); a new federation takes the budget from site.toml") from None
    except LedgerError as exc:
        raise UserFacingError(str(exc)) from exc
    spent = ledger.spent_epsilon()
    print(f"federation {args.federation}: budget ε = {ledger.budget_epsilon:g}, spent ε = {spent:.4g} "
          f"(δ = {ledger.delta:.1e}); new budget ε = {args.epsilon:g}")
    print("The budget is how much privacy this site may spend in this federation in all. Spent privacy never comes "
          "back: a higher budget lets more rounds run; it can be lowered only down to what is spent.")
    if not args.yes and input("change it? [y/N] ").strip().lower() not in ("y", "yes"):
        print("unchanged")
        return 1
    try:
        ledger.change_budget(args.epsilon, args.reason)
    except LedgerError as exc:
        raise UserFacingError(str(exc)) from exc
    print(f"budget of {args.federation} is now ε = {args.epsilon:g} (recorded in the ledger)")
    return 0


def _site(args: argparse.Namespace) -> int:
    """Run the headless site. Failures during the run reach the log as one line with what to
    do (from the driver's events) and a non-zero exit; errors before it (the config, the
    identity key) are printed the same way, never as a traceback."""
    from hemafed.core.errors import HemafedError
    from hemafed.core.rounds.plan import PlanError
    from hemafed.core.trust.identity import IdentityError
    from hemafed.gui.cli import UserFacingError
    from hemafed.network.node import run_site

    if args.outbound:
        return _outbound(args)
    if not args.config:
        raise UserFacingError("hemafed site needs --config site.toml")
    try:
        return run_site(args.config, args.insecure, args.die_at)
    except HemafedError as exc:
        raise UserFacingError(exc.for_people()) from exc
    except (PlanError, IdentityError, ValueError, OSError) as exc:
        raise UserFacingError(str(exc)) from exc


def _state_of(args: argparse.Namespace, state: str | None) -> str:
    from hemafed.core.rounds.plan import PlanError
    from hemafed.gui.cli import UserFacingError
    from hemafed.network.config import SiteConfig

    if state:
        return state
    if args.config:
        try:
            return str(SiteConfig.load(args.config).state_dir)
        except (PlanError, OSError, ValueError) as exc:
            raise UserFacingError(str(exc)) from exc
    raise UserFacingError("name the site: --config site.toml or its state directory")


def _outbound(args: argparse.Namespace) -> int:
    """`hemafed site --outbound`: every message the site sent, then totals per round and per kind."""
    from hemafed.core.privacy.store import SiteStore, StoreCorrupt
    from hemafed.gui.cli import UserFacingError
    from hemafed.network.outbound import describe, format_log

    state = _state_of(args, args.state)
    try:
        records = SiteStore(state).outbound(args.federation)
    except StoreCorrupt as exc:
        raise UserFacingError(str(exc)) from exc
    if not records:
        print("this site has sent nothing yet" + (f" in federation {args.federation}" if args.federation else ""))
        return 0
    print("\n".join(format_log(records)))
    print("\nkinds: " + "; ".join(f"{k}: {describe(k)}" for k in sorted({r.kind for r in records})))
    return 0


def _report(args: argparse.Namespace) -> int:
    from hemafed.core.trust.identity import IdentityError, load_identity
    from hemafed.gui.cli import UserFacingError

    if args.verify:
        from pathlib import Path

        from hemafed.network.report_signature import ReportSignatureError, verify_document

        try:
            signer = verify_document(Path(args.verify).read_bytes(), args.expect)
        except OSError as exc:
            raise UserFacingError(str(exc)) from exc
        except ReportSignatureError as exc:
            print(f"NOT VALID: {args.verify}: {exc}")
            return 1
        print(f"valid: {args.verify} is signed by the site key {signer.fingerprint}"
              + (" (as expected)" if args.expect else "; compare this fingerprint with the site's (--expect)"))
        return 0
    if not args.out:
        raise UserFacingError("say where to write the report: --out report.pdf (and/or --out report.html)")
    from pathlib import Path

    from hemafed.network.site_report import ReportUnavailable, export_report, gather

    state = Path(_state_of(args, args.site))
    roster: list[str] = []
    if args.config:
        from hemafed.network.config import SiteConfig

        pinned = SiteConfig.load(args.config).pinned_roster()
        roster = sorted(pinned.fingerprints) if pinned is not None else []
    try:
        identity = load_identity(state)
        report = gather(state, identity, args.federation, roster)
        pdf = None
        if any(Path(p).suffix.lower() == ".pdf" for p in args.out):
            try:
                from hemafed.gui.app.report_pdf import html_to_pdf as pdf
            except ImportError as exc:
                raise UserFacingError(f"a PDF needs PySide6 ({exc}): pip install 'hemafed[gui]', or write "
                                      "--out report.html") from exc
        written = export_report(report, identity, [Path(p) for p in args.out], pdf)
    except (IdentityError, ReportUnavailable, ValueError, OSError) as exc:
        raise UserFacingError(str(exc)) from exc
    for path in written:
        print(f"wrote {path} (signed by {identity.fingerprint})")
    return 0
