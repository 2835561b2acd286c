"""Secure-aggregation benchmark: mask PRG vs raw keystream, a full round's compute, scaling.

    .venv/bin/python bench/secagg.py            # writes its section of docs/benchmarks.md
    .venv/bin/python bench/secagg.py --quick    # smaller grid, prints only

Sites run one after another in this process; in a federation they run in parallel, so the round's critical
path is (slowest site) + aggregator. Nothing here is I/O: the network's share of a round is not counted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine_line, write_section

from hemafed.core.secagg import (
    AggregatorSecAgg,
    MaskedInput,
    SecAggConfig,
    SecAggResult,
    ShareDelivery,
    SiteSecAgg,
    decode,
    encode,
    prg,
)

# CPU time of this thread: the development machine is shared (load 2-10 on 2 cores while this was written), and
# every step measured is single-threaded, so this is what the same code takes on an otherwise idle core.
CLOCK = time.thread_time

FLOWER_ANCHOR_S = 1.2          # SecAgg+ overhead per round, Flower 1.42, 10 clients x 1 M parameters (issue 4)
FLOWER_ANCHOR_RATIO = 4.5      # ... which is 4.5x a plain round
PLAIN_ROUND_S = FLOWER_ANCHOR_S / FLOWER_ANCHOR_RATIO  # ~0.27 s: the plain round the target is measured against


def best_of(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = CLOCK()
        fn()
        times.append(CLOCK() - t0)
    return min(times)


# ---------------------------------------------------------------------------------------- (a)

def bench_prg(words: int, reps: int = 7) -> dict[str, float]:
    key = os.urandom(32)
    nbytes = 4 * words
    zeros = bytes(nbytes)
    buf = np.empty(nbytes, np.uint8)

    def raw_into():
        Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update_into(zeros, buf)

    def raw_update():
        Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(zeros)

    def chacha():
        Cipher(algorithms.ChaCha20(key, bytes(16)), None).encryptor().update_into(zeros, buf)

    acc = np.zeros(words, np.uint32)

    def apply_64k():
        # the earlier chunk size, for comparison in the same run (module globals swapped for the call only)
        saved = prg._CHUNK_BYTES, prg._ZERO
        prg._CHUNK_BYTES, prg._ZERO = 1 << 16, memoryview(bytes(1 << 16))
        try:
            prg.apply_mask(acc, key, 1)
        finally:
            prg._CHUNK_BYTES, prg._ZERO = saved

    out = {
        "raw AES-256-CTR, update_into preallocated": best_of(raw_into, reps),
        "raw AES-256-CTR, update (allocates)": best_of(raw_update, reps),
        "raw ChaCha20, update_into (reference)": best_of(chacha, reps),
        "prg.expand (new uint32 array)": best_of(lambda: prg.expand(key, words), reps),
        "prg.apply_mask (acc += mask, in place)": best_of(lambda: prg.apply_mask(acc, key, 1), reps),
        "prg.apply_mask with 64 KiB chunks (earlier setting)": best_of(apply_64k, reps),
    }
    return {k: nbytes / v / 1e9 for k, v in out.items()}  # GB/s


# ---------------------------------------------------------------------------------------- (b), (c)

def timed_round(n: int, dim: int, *, drop_after_shares: tuple[int, ...] = (), seed: int = 0) -> dict:
    """One round, every call timed; inputs are made on the fly so memory stays ~n quantized vectors."""
    t = n // 2 + 1
    cfg = SecAggConfig(federation_id="bench", threshold=t, dim=dim, n_extras=64, clip=1.0,
                       max_sites=max(64, n), max_weight=2**16, max_extra=2**20)
    rng = np.random.default_rng(seed)
    ids = range(1, n + 1)
    keys = {i: Ed25519PrivateKey.generate() for i in ids}
    pubs = {i: k.public_key() for i, k in keys.items()}
    agg = AggregatorSecAgg(cfg, 0, pubs)
    sites = {i: SiteSecAgg(cfg, 0, i, keys[i], pubs) for i in ids}
    site_s: dict[int, float] = defaultdict(float)
    agg_s = 0.0
    plain_s = 0.0
    plain_acc = np.zeros(dim, np.float32)
    wire_bytes = 0

    def at_agg(fn, *a):
        nonlocal agg_s
        t0 = CLOCK()
        r = fn(*a)
        agg_s += CLOCK() - t0
        return r

    queue = []
    for i in ids:
        upd = (rng.standard_normal(dim, dtype=np.float32) * 0.01)
        w = int(rng.integers(100, 2**16))
        ex = rng.integers(0, 100, 64)
        # baseline: what a plain FedAvg aggregator does with the same vector
        t0 = CLOCK()
        plain_acc += np.float32(w) * upd
        plain_s += CLOCK() - t0
        t0 = CLOCK()
        out = sites[i].start(upd, w, ex)
        site_s[i] += CLOCK() - t0
        queue += at_agg(agg.receive, i, out[0])
    while queue:
        to, msg = queue.pop(0)
        if to in drop_after_shares and isinstance(msg, ShareDelivery):
            queue += at_agg(agg.site_dropped, to)
            continue
        t0 = CLOCK()
        replies = sites[to].receive(msg)
        site_s[to] += CLOCK() - t0
        for r in replies:
            if isinstance(r, MaskedInput) and wire_bytes == 0:
                wire_bytes = len(encode(r))
            queue += at_agg(agg.receive, to, r)
    assert isinstance(agg.outcome, SecAggResult), agg.outcome
    t0 = CLOCK()
    plain_acc / np.float32(1000)
    plain_s += CLOCK() - t0
    sites_total = sum(site_s.values())
    return {"n": n, "dim": dim, "site_max": max(site_s.values()), "site_mean": sites_total / n,
            "sites_total": sites_total, "agg": agg_s, "plain": plain_s, "critical": max(site_s.values()) + agg_s,
            "bytes_ratio": wire_bytes / (4 * dim), "dropouts": len(agg.outcome.dropouts)}


def fmt_ms(s: float) -> str:
    return f"{s * 1e3:,.1f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small grid, print only")
    args = ap.parse_args()
    load0 = os.getloadavg()
    t_start = time.perf_counter()

    words = 1_000_000
    a = bench_prg(words)
    raw = max(a["raw AES-256-CTR, update_into preallocated"], a["raw AES-256-CTR, update (allocates)"])
    lines = ["## Secure aggregation (`bench/secagg.py`)", "",
             f"Machine: {machine_line()}. Load average at start {load0[0]:.2f} (2 cores shared with other work); "
             "times are the CPU time of the measuring thread (`time.thread_time`), steadier than wall-clock "
             "under that load.",
             "", f"### (a) Mask PRG vs the raw keystream ({4 * words / 1e6:.0f} MB per stream, best of 7)", "",
             "| what | GB/s | vs raw AES-CTR |", "|---|---:|---:|"]
    for k, v in a.items():
        lines.append(f"| {k} | {v:.2f} | {v / raw:.0%} |")
    lines += ["", "Target ≥ 50 % of the raw keystream: "
              f"expand {a['prg.expand (new uint32 array)'] / raw:.0%}, "
              f"apply_mask {a['prg.apply_mask (acc += mask, in place)'] / raw:.0%} (the yardstick is the faster raw "
              "row). `expand` is the same cipher call made in 256 KiB pieces that stay in cache, so it can match or "
              "beat the one-shot 4 MB call; `apply_mask` also adds each piece into the accumulator.", ""]

    runs_b = []
    for drop in ((), (3,)):
        rs = [timed_round(10, 1_000_000, drop_after_shares=drop, seed=s) for s in range(1 if args.quick else 3)]
        runs_b.append(rs[0] | {k: statistics.median([r[k] for r in rs])
                               for k in ("site_max", "site_mean", "agg", "plain", "critical", "sites_total")})
    lines += ["### (b) One round, 10 sites × 1 M parameters (median of 3 rounds)", "",
              "| dropouts | site, mean | site, slowest | aggregator | critical path (slowest site + aggregator)"
              " | plain numpy weighted sum | critical / plain sum | critical / plain round (0.27 s) |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs_b:
        lines.append(f"| {r['dropouts']} | {fmt_ms(r['site_mean'])} ms | {fmt_ms(r['site_max'])} ms | "
                     f"{fmt_ms(r['agg'])} ms | {fmt_ms(r['critical'])} ms | {fmt_ms(r['plain'])} ms | "
                     f"{r['critical'] / r['plain']:.0f}× | {r['critical'] / PLAIN_ROUND_S:.2f}× |")
    rb = runs_b[0]
    vec = MaskedInput(round=0, site_id=1, vector=np.zeros(1_000_064 + 1, np.uint32))
    enc_s = best_of(lambda: encode(vec), 7)
    data = encode(vec)
    dec_s = best_of(lambda: decode(data, max_vector_len=len(vec.vector)), 7)
    lines += ["", f"Masked input on the wire: {rb['bytes_ratio']:.4f}× the raw float32 update (uint32 ring + "
              f"header + weight and extras words); encode {fmt_ms(enc_s)} ms, decode {fmt_ms(dec_s)} ms "
              "(zero-copy) per 1 M-parameter message, not included above.", ""]

    ratio = rb["critical"] / PLAIN_ROUND_S
    verdict = "met" if ratio <= 0.2 else "missed in this run"
    a_expand = a["prg.expand (new uint32 array)"] / raw
    a_apply = a["prg.apply_mask (acc += mask, in place)"] / raw
    lines += ["Reading (b): the issue's target is a secure-aggregation overhead ≤ 0.2× a plain round. Against the "
              f"plain round implied by the anchor (Flower 1.42 SecAgg+ adds {FLOWER_ANCHOR_S} s = "
              f"{FLOWER_ANCHOR_RATIO}× a plain round, so ≈ {PLAIN_ROUND_S:.2f} s) the critical path here is "
              f"{ratio:.2f}× — {verdict}; Flower's overhead is {FLOWER_ANCHOR_S / rb['critical']:.0f}× ours. Against "
              f"a bare numpy weighted sum of the vectors (no training, no transport) it is "
              f"{rb['critical'] / rb['plain']:.0f}× — not met, and it cannot be: every site must expand one AES-CTR "
              "stream per peer of the vector's size and the aggregator one per survivor, which at the keystream "
              "speed in (a) is the floor. Tried: AES-256-CTR rather than ChaCha20 (AES-NI/VAES, "
              f"{raw / a['raw ChaCha20, update_into (reference)']:.1f}× faster here); keystream written by "
              f"`update_into` straight into numpy memory (expand at {a_expand:.0%} of raw); 256 KiB rather than "
              f"64 KiB chunks for in-place masking ({a_apply:.0%} of raw against "
              f"{a['prg.apply_mask with 64 KiB chunks (earlier setting)'] / raw:.0%}); "
              "quantization in cache-sized float64 chunks (about half the time of whole-vector passes). Sites run "
              "one after another in this process; in a federation they run in parallel, hence critical path = "
              "slowest site + aggregator. Network time is not counted.", ""]
    grid_sites = (10, 20) if args.quick else (10, 20, 50)
    grid_dims = (100_000, 1_000_000) if args.quick else (100_000, 1_000_000, 10_000_000)
    lines += ["### (c) Scaling (one round each, no dropouts; times in ms)", "",
              "| sites | parameters | site, mean | aggregator | critical path | plain sum | critical / plain sum |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for n in grid_sites:
        for d in grid_dims:
            r = timed_round(n, d)
            lines.append(f"| {n} | {d / 1e6:g} M | {fmt_ms(r['site_mean'])} | {fmt_ms(r['agg'])} | "
                         f"{fmt_ms(r['critical'])} | {fmt_ms(r['plain'])} | {r['critical'] / r['plain']:.1f}× |")
            print(lines[-1], flush=True)
    load1 = os.getloadavg()
    lines += ["", "Reading (c): a site's cost grows with sites × parameters (one pairwise stream per peer plus its "
              "self mask), the aggregator's with survivors × parameters (plus survivors × parameters per dropout); "
              "at 0.1 M parameters the fixed per-peer costs (X25519, Ed25519 checks, Shamir, AES-GCM) dominate.",
              "", f"Whole benchmark {time.perf_counter() - t_start:.0f} s (wall); "
              f"load average at the end {load1[0]:.2f}."]
    text = "\n".join(lines)
    print(text)
    if not args.quick:
        write_section("secagg", text)


if __name__ == "__main__":
    main()
