"""`hemafed scan` and `hemafed demo-data`."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("scan", help="check a folder, CSV manifest or .npz of images")
    p.add_argument("path", help="class-folder tree, CSV manifest (path,label) or MedMNIST .npz")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_scan)

    p = sub.add_parser("demo-data", help="write simulated hospital folders from BloodMNIST")
    p.add_argument("--sites", type=int, default=10)
    p.add_argument("--partition", default="dirichlet:0.5", help="iid or dirichlet:ALPHA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder (one sub-folder per hospital)")
    p.add_argument("--format", choices=("png", "jpg", "bmp", "tiff"), default="png")
    p.add_argument("--data", help="BloodMNIST .npz or folder holding it (default: find or download)")
    p.set_defaults(func=_demo_data)


def _scan(args: argparse.Namespace) -> int:
    from hemafed.core.scan import scan_source
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


def _demo_data(args: argparse.Namespace) -> int:
    from hemafed.core.demo_data import write_demo_sites
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
