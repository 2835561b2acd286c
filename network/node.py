"""The two headless roles as plain functions, and a small process entry point.

`python -m hemafed.network.node aggregator|site --config FILE` is how the simulation
starts its processes (so nothing in `network/` goes through the user-facing CLI);
`hemafed aggregator` and `hemafed site` call the same functions.

Each role imports its driver inside its function (start-up time: a site never loads the aggregator's code
and the reverse, and `--help` loads neither)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

# `hemafed site` exit status by how the run ended (`Finished.outcome`).
EXIT_CODES = {"done": 0, "failed": 1, "stopped": 130}


def confirm_insecure(cfg, flag: bool):
    """Plain ws:// needs both the config's `insecure = true` and --insecure on the command line."""
    from hemafed.core.rounds.plan import PlanError

    if cfg.insecure and not flag:
        raise PlanError("the configuration asks for plain ws:// (insecure = true); pass --insecure to confirm "
                        "this is a local test")
    return cfg


def run_aggregator(config: str | Path, insecure: bool = False) -> int:
    """Load federation.toml and run the aggregator to the end of the plan."""
    from hemafed.network.aggregator import Aggregator
    from hemafed.network.config import AggregatorConfig

    aggregator = Aggregator(confirm_insecure(AggregatorConfig.load(config), insecure))
    asyncio.run(aggregator.run())
    return 0


def run_site(config: str | Path, insecure: bool = False, die_at: str | None = None) -> int:
    """Load site.toml and run the site until the federation is done; the exit status is
    0 when a final model was saved, 1 after a fatal error, 130 after SIGINT/SIGTERM (the
    site leaves cleanly). Every failure reaches the log as one line with what to do (from
    the driver's events), never as a traceback."""
    from hemafed.network.config import SiteConfig
    from hemafed.network.site import DIE_STAGES, SiteRunner
    from hemafed.network.site_events import Finished, log_event

    crash = None
    if die_at:
        rnd, _, stage = die_at.partition(":")
        if not rnd.isdigit() or stage not in DIE_STAGES:
            raise ValueError(f"--die-at {die_at!r}: expected ROUND:STAGE with STAGE one of {', '.join(DIE_STAGES)}")
        crash = (int(rnd), stage)
    cfg = confirm_insecure(SiteConfig.load(config), insecure)
    if cfg.torch_threads:
        import torch

        torch.set_num_threads(int(cfg.torch_threads))
    outcome = {"value": "failed"}

    def on_event(event: object) -> None:
        log_event(event)  # type: ignore[arg-type]
        if isinstance(event, Finished):
            outcome["value"] = event.outcome

    runner = SiteRunner(cfg, die_at=crash, on_event=on_event)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):  # leave cleanly: the round in progress becomes a dropout
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, runner.stop)
        await runner.run()

    asyncio.run(main())
    return EXIT_CODES[outcome["value"]]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hemafed.network.node")
    parser.add_argument("role", choices=("aggregator", "site"))
    parser.add_argument("--config", required=True)
    parser.add_argument("--insecure", action="store_true")
    parser.add_argument("--die-at", metavar="ROUND:STAGE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.role == "aggregator":
        return run_aggregator(args.config, args.insecure)
    return run_site(args.config, args.insecure, args.die_at)


if __name__ == "__main__":
    sys.exit(main())
