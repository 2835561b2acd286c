"""Per-round wall time and bytes with secure aggregation vs without, over real TLS
websockets: one aggregator and N site processes on loopback, a ~1 M-parameter model,
synthetic updates (so local training does not drown the protocol's cost).

    .venv/bin/python bench/round.py [--sites 10] [--rounds 4]

Writes its section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

BENCH_MODEL = "bench_mlp_1m"


def register_bench_model() -> None:
    from torch import nn

    from hemafed.core.learning import models

    # HEMAFED_BENCH_HIDDEN (inherited by the site processes) shrinks the model, e.g. 7 → 16.6 k parameters,
    # the size of the scatter_linear_28 head, to measure the fixed per-round cost DP-FedSGD pays per step
    hidden = int(os.environ.get("HEMAFED_BENCH_HIDDEN", "420"))
    models.MODELS[BENCH_MODEL] = models.ModelSpec(
        BENCH_MODEL, 28, f"benchmark-only MLP, hidden width {hidden}",
        lambda n: nn.Sequential(nn.Flatten(), nn.Linear(28 * 28 * 3, hidden), nn.ReLU(), nn.Linear(hidden, n)))


def run_site(config: str) -> None:
    from hemafed.core.rounds.site_round import TrainOutcome
    from hemafed.core.secagg.quantize import quantize
    from hemafed.network.config import SiteConfig
    from hemafed.network.site import SiteRunner

    class SyntheticSite(SiteRunner):
        """A site whose 'training' is a random update of the model's size (no images are trained on)."""

        def _contribution(self, rnd, weights, progress) -> TrainOutcome:
            plan, n = self.plan, len(self.data.train_labels)
            rng = np.random.default_rng(rnd * 1000 + self.site_id)
            update = (rng.standard_normal(len(weights)) * 0.01).astype(np.float32)
            confusion = np.zeros((len(plan.classes),) * 2, np.int64)
            if not plan.secagg:
                return TrainOutcome(rnd, confusion, n, update=update)
            ring = quantize(plan.secagg_config(len(weights)), update, n, confusion.reshape(-1), rng)
            return TrainOutcome(rnd, confusion, n, ring=ring)

    asyncio.run(SyntheticSite(SiteConfig.load(config)).run())


def run_aggregator(config: str) -> None:
    from hemafed.network.aggregator import Aggregator
    from hemafed.network.config import AggregatorConfig

    asyncio.run(Aggregator(AggregatorConfig.load(config)).run())


def federation(root: Path, sites: int, rounds: int, secure: bool) -> dict:
    from hemafed.core.rounds.plan import FederationPlan
    from hemafed.core.trust.certs import create_federation_certs
    from hemafed.core.trust.identity import init_identity
    from hemafed.network.config import render_toml

    create_federation_certs(root / "tls", ["127.0.0.1"])
    t = sites // 2 + 1
    plan = FederationPlan(federation_id="bench", model=BENCH_MODEL, algorithm="fedavg", dp_mode="local",
                          noise_multiplier=0.0, rounds=rounds, dp=False, secagg=secure,
                          threshold=t, min_sites=sites, max_sites=sites, batch_size=8, max_weight=1024,
                          update_clip=0.1, join_timeout_s=120.0)
    keys = {}
    rng = np.random.default_rng(0)
    for i in range(1, sites + 1):
        sdir = root / f"site{i}"
        keys[f"site{i}"] = init_identity(sdir).public_line()
        labels = np.arange(40) % 8
        np.savez(sdir / "data.npz", train_images=rng.integers(0, 255, (40, 28, 28, 3), dtype=np.uint8),
                 train_labels=labels)
    (root / "federation.toml").write_text(render_toml({
        "federation": {"state_dir": "agg", "port": 0, "port_file": "port", "linger_s": 0, "cert": "tls/server.pem",
                       "key": "tls/server.key"}, "plan": plan.to_dict(), "sites": keys}))
    me = [sys.executable, __file__]
    agg = subprocess.Popen([*me, "--role", "aggregator", "--config", str(root / "federation.toml")],
                           stdout=subprocess.DEVNULL, stderr=open(root / "agg.log", "wb"))  # noqa: SIM115
    while not (root / "port").exists():
        time.sleep(0.05)
    url = f"wss://127.0.0.1:{(root / 'port').read_text()}"
    procs = []
    for i in range(1, sites + 1):
        sdir = root / f"site{i}"
        (sdir / "site.toml").write_text(render_toml({
            "site": {"data": "data.npz", "state_dir": ".", "aggregator": url, "epsilon": 1.0,
                     "ca_file": "../tls/ca.pem", "torch_threads": 1},
            "bounds": {"require_dp": False, "require_secagg": False}}))
        procs.append(subprocess.Popen([*me, "--role", "site", "--config", str(sdir / "site.toml")],
                                      stdout=subprocess.DEVNULL, stderr=open(sdir / "site.log", "wb")))  # noqa: SIM115
    agg.wait(timeout=1800)
    for p in procs:
        p.wait(timeout=120)
    log = [json.loads(line) for line in (root / "agg" / "checkpoints" / "rounds.jsonl").read_text().splitlines()]
    sent = []
    for i in range(1, sites + 1):
        from hemafed.core.privacy.store import SiteStore

        ends = SiteStore(root / f"site{i}").round_log()
        totals = [e["bytes_sent"] for e in ends if e["status"] == "round_end"]
        sent.append(np.diff([0, *totals]))
    return {"wall": [e["wall_s"] for e in log], "status": [e["status"] for e in log],
            "sent_per_round": np.mean(sent, axis=0).tolist()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--role", choices=("aggregator", "site"))
    parser.add_argument("--config")
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    register_bench_model()
    if args.role == "site":
        return run_site(args.config)
    if args.role == "aggregator":
        return run_aggregator(args.config)

    from _report import machine_line, write_section

    from hemafed.core.learning.models import build_model, num_parameters

    dim = num_parameters(build_model(BENCH_MODEL))
    results = {}
    for secure in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            results[secure] = federation(Path(tmp), args.sites, args.rounds, secure)
            assert all(s == "completed" for s in results[secure]["status"]), results[secure]
    # round 1 includes the sites' start-up (imports, TLS, plan); later rounds are steady state
    plain = float(np.mean(results[False]["wall"][1:]))
    secure = float(np.mean(results[True]["wall"][1:]))
    raw = 4 * dim
    sent_plain = float(np.mean(results[False]["sent_per_round"][1:]))
    sent_secure = float(np.mean(results[True]["sent_per_round"][1:]))
    md = f"""## Round: secure aggregation vs plain, over TLS websockets (`bench/round.py`)

{args.sites} site processes and one aggregator process on loopback (real TLS), a {dim / 1e6:.2f} M-parameter
model, synthetic updates (no local training), mean of rounds 2–{args.rounds}; machine: {machine_line()}.
All processes share this machine's 2 cores, so the sites' work is serialised here where a real deployment
runs it in parallel on separate machines.

| | plain aggregation | secure aggregation | ratio |
|---|---|---|---|
| wall time per round | {plain:.2f} s | {secure:.2f} s | {secure / plain:.2f}× (target ≤ 1.2×) |
| bytes sent per site per round | {sent_plain / 1e6:.3f} MB | {sent_secure / 1e6:.3f} MB | \
{sent_secure / raw:.3f}× the raw float32 update ({raw / 1e6:.3f} MB; target ≤ 1.1×) |

Per-round wall times (s): plain {', '.join(f'{w:.2f}' for w in results[False]['wall'])};
secure {', '.join(f'{w:.2f}' for w in results[True]['wall'])}.
"""
    print(md)
    write_section("round", md)


if __name__ == "__main__":
    main()
