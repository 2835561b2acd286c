"""The `hemafed` command line: one entry point for the site app, the headless
aggregator and the tools around them.

Each audience's subcommands live in their own module exposing
`register(subparsers)`; heavy imports (torch, Qt) happen inside the handlers so
`hemafed --help` stays fast and headless commands never load Qt.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from hemafed.core.errors import HemafedError

# One module per audience: the hospital operator, the federation's admin, researchers.
COMMAND_MODULES = (
    "hemafed.gui.cli.operator",
    "hemafed.gui.cli.admin",
    "hemafed.gui.cli.research",
    "hemafed.gui.cli.desktop",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hemafed",
        description="Federated blood-cell classification with differential privacy "
        "and secure aggregation.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if not argv and _on_a_desktop():
        # Double-clicked or started from a menu: open the app rather than print usage.
        argv = ["gui"]
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except UserFacingError as exc:
        print(f"hemafed: error: {exc}", file=sys.stderr)
        return 1


def _on_a_desktop() -> bool:
    """A display to open a window on, and the Qt extra installed (a headless aggregator
    install has no PySide6: there `hemafed` alone prints the usage)."""
    import importlib.util
    import os

    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return False
    return importlib.util.find_spec("PySide6") is not None


class UserFacingError(HemafedError):
    """An error whose message is meant for the operator, printed without a traceback."""
