"""The desktop app's start with a long privacy ledger, and how fast the Privacy page follows a new budget.

    QT_QPA_PLATFORM=offscreen .venv/bin/python -m bench.app_start [--rounds 1000] [--runs 3]

A state folder gets one federation whose ledger holds `--rounds` rounds of the recipe (distributed DP,
Skellam), written through the ledger itself. Then `hemafed gui` is launched (a fresh process each run):
the time to the main window shown, and to the ledgers read and the plan's projection shown (both off the
GUI thread). Then, in one process, the budget is changed several times on the Privacy page: the time from
the change to the new projection on screen. Targets (issue 17): start ≤ 2 s with a 1,000-round ledger,
a budget change shown within 0.5 s. Results go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


def fill_ledger(state: Path, rounds: int) -> str:
    """A ledger of `rounds` recipe rounds in `state` (through PrivacyLedger: every row chained and durable)."""
    from hemafed.core.learning.site_trainer import FedSGDTrainer
    from hemafed.core.privacy.ledger import PrivacyLedger
    from hemafed.core.rounds.plan import FederationPlan

    plan = FederationPlan(federation_id="long-ledger", rounds=max(rounds, 500))
    privacy = FedSGDTrainer(plan).privacy
    ledger = PrivacyLedger(plan.federation_id, 1e6, 1e-5, state=state)
    for r in range(1, rounds + 1):
        ledger.record_round(r, privacy.sigma, privacy.sample_rate, 1, "0" * 64, protection=privacy.protection())
    return plan.federation_id


def cold_start(state: Path, config: Path) -> tuple[float, float]:
    env = {**os.environ, "HEMAFED_CONFIG_DIR": str(config), "HEMAFED_STATE_DIR": str(state),
           "HEMAFED_STARTUP_PROBE": f"{time.time():.6f}"}
    res = subprocess.run([sys.executable, "-m", "hemafed.gui.cli", "gui"], env=env, capture_output=True, text=True,
                         timeout=300)
    shown = re.search(r"main window shown: ([0-9.]+) s after launch", res.stdout)
    ready = re.search(r"ledgers and projection shown: ([0-9.]+) s after launch", res.stdout)
    if not (shown and ready):
        raise RuntimeError(f"no start-up lines:\n{res.stdout}\n{res.stderr}")
    return float(shown.group(1)), float(ready.group(1))


def budget_latency(state: Path, config: Path, budgets: list[float]) -> list[float]:
    """Seconds from a new budget typed on the Privacy page to its projection on screen."""
    from PySide6.QtWidgets import QApplication

    from hemafed.gui.app.main import create_window
    from hemafed.gui.app.workers import wait_for_jobs

    os.environ["HEMAFED_STATE_DIR"] = str(state)
    app = QApplication.instance() or QApplication([])
    window = create_window(config)
    window.show()
    state_ = window.state

    def settle() -> None:
        while state_.ledgers_loading or state_.projection_pending:
            app.processEvents()
            time.sleep(0.002)

    settle()
    out = []
    for eps in budgets:
        started = time.perf_counter()
        window.privacy_page.set_budget(eps)
        settle()
        app.processEvents()
        assert state_.projection is not None and state_.projection.budget == eps
        out.append(time.perf_counter() - started)
    window.close()
    wait_for_jobs()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    from bench._report import machine_line, write_section

    with tempfile.TemporaryDirectory() as tmp:
        state, config = Path(tmp) / "state", Path(tmp) / "config"
        started = time.perf_counter()
        fill_ledger(state, args.rounds)
        fill_s = time.perf_counter() - started
        starts = [cold_start(state, config) for _ in range(args.runs)]
        latencies = budget_latency(state, config, [6.0, 9.0, 12.0, 8.0, 20.0])
    shown, ready = [s for s, _ in starts], [r for _, r in starts]
    print(f"ledger of {args.rounds} rounds written in {fill_s:.1f} s; window shown {shown}; ready {ready}; "
          f"budget changes {[round(x, 3) for x in latencies]}")
    if not args.no_write:
        write_section("app-start", f"""## Desktop app with a long ledger (`bench/app_start.py`)

{machine_line()}; Qt offscreen. The state folder holds one federation whose ledger has {args.rounds:,} rounds
of the recipe (distributed DP), written through the ledger itself ({fill_s:.1f} s, {1000 * fill_s / args.rounds:.1f} ms
a round, every round a durable transaction).

| | run 1 | run 2 | run 3 | target |
|---|---:|---:|---:|---|
| `hemafed gui` launched → main window shown, s | {' | '.join(f'{s:.2f}' for s in shown[:3])} | ≤ 2 |
| … → ledgers read and the plan's projection shown, s | {' | '.join(f'{r:.2f}' for r in ready[:3])} | ≤ 2 |

A new budget on the Privacy page → its projection on screen (ε after every round of the 500-round recipe,
on top of the {args.rounds:,} rounds in the ledger; in one process, five changes):
{', '.join(f'{1000 * x:.0f}' for x in latencies)} ms (median {1000 * statistics.median(latencies):.0f} ms; target
≤ 500 ms). Both the ledger read and the projection run in workers: the window never waits for them.""")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
