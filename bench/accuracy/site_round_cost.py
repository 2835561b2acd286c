"""Time one site's DP-FedSGD round in process (no sockets), through the site trainer: evaluation, budget check,
clipped gradient sum of the scatter_linear_28 head, durable ledger entry, noise share and quantization.

    python -m bench.accuracy.site_round_cost [--rounds 50] [--n 1200] [--mode distributed|local]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace

import numpy as np
import torch

from hemafed.core.learning.recipe import with_budget
from hemafed.core.learning.site_trainer import SiteData, site_trainer
from hemafed.core.privacy.ledger import PrivacyLedger
from hemafed.core.rounds.plan import FederationPlan


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--n", type=int, default=1200)
    ap.add_argument("--mode", default="distributed")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.n, 28, 28, 3), dtype=np.uint8)
    labels = rng.integers(0, 8, args.n)
    plan = with_budget(replace(FederationPlan(federation_id="bench", model="scatter_linear_28"), dp_mode=args.mode),
                       8.0, args.mode)
    trainer = site_trainer(plan, threads=1)
    with tempfile.TemporaryDirectory() as tmp:
        ledger = PrivacyLedger("bench", 8.0, 1e-5, state=tmp)
        trainer.prepare(ledger, SiteData(images, labels, images[:100], labels[:100]), 8.0)
        t = time.perf_counter()
        trainer.featurize()
        t_feat = time.perf_counter() - t
        w = np.zeros(trainer.n_params, np.float32)
        times = []
        for r in range(1, args.rounds + 1):
            t = time.perf_counter()
            trainer.contribution(r, w)
            times.append(time.perf_counter() - t)
    print(f"features for {args.n + 100} images: {t_feat:.1f} s (1 thread, cache of this machine); "
          f"σ={plan.noise_multiplier:.3f}; site round median {np.median(times) * 1e3:.0f} ms, "
          f"max {np.max(times) * 1e3:.0f} ms over {args.rounds} rounds")


if __name__ == "__main__":
    main()
