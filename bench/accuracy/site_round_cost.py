"""Time one site's DP-FedSGD round work in process (no sockets): budget check, clipped gradient sum of the
scatter_linear_28 head, durable ledger entry, ring encoding with the Skellam share.

    python -m bench.accuracy.site_round_cost [--rounds 50] [--n 1200]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
from core.fedsgd import plan_noise_multiplier, prepare_site, site_privacy, site_round
from core.ledger import PrivacyLedger
from core.models import build_model, get_flat_params
from core.plan import FederationPlan

from core.secagg.config import SecAggConfig
from core.secagg.quantize import quantize


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--n", type=int, default=1200)
    ap.add_argument("--mode", default="distributed")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = build_model("scatter_linear_28", seed=0)
    images = torch.randn(args.n, 3, 28, 28)
    t = time.perf_counter()
    trainable, inputs = prepare_site(model, images)
    t_feat = time.perf_counter() - t
    w = get_flat_params(trainable)
    cfg = SecAggConfig("bench", threshold=6, dim=len(w), n_extras=65, max_sites=64)
    q, rounds = 0.1713, 500
    sigma = plan_noise_multiplier(8.0, 1e-5, q, rounds, args.mode, cfg)
    plan = FederationPlan(federation_id="bench", model="scatter_linear_28", algorithm="fedsgd", sample_rate=q,
                          dp_mode=args.mode, noise_multiplier=sigma, rounds=rounds)
    privacy = site_privacy(plan, cfg)
    labels = torch.randint(0, 8, (args.n,))
    with tempfile.TemporaryDirectory() as tmp:
        ledger = PrivacyLedger("bench", 8.0, 1e-5, state=tmp)
        times = []
        for r in range(args.rounds):
            t = time.perf_counter()
            c = site_round(ledger, r, privacy, trainable, inputs, labels, w, cfg)
            quantize(cfg, c.update, c.weight, np.concatenate([c.extras, np.zeros(64, np.int64)]),
                     noise=c.noise_hook)
            times.append(time.perf_counter() - t)
    print(f"features for {args.n} images: {t_feat:.1f} s (1 thread); σ={sigma:.3f}; site round "
          f"median {np.median(times) * 1e3:.0f} ms, max {np.max(times) * 1e3:.0f} ms over {args.rounds} rounds")


if __name__ == "__main__":
    main()
