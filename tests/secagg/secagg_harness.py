"""A loopback driver for secure-aggregation rounds: the network layer's job, done in memory for tests."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hemafed.core.secagg import AggregatorSecAgg, SecAggConfig, SiteSecAgg, decode, encode

STAGES = ("before_keys", "after_keys", "after_shares", "after_masked", "after_signature")


def make_round(cfg: SecAggConfig, n: int, round: int = 0, seed: int = 0):
    """(aggregator, {id: site}, {id: identity private key})."""
    keys = {i: Ed25519PrivateKey.generate() for i in range(1, n + 1)}
    pubs = {i: k.public_key() for i, k in keys.items()}
    sites = {i: SiteSecAgg(cfg, round, i, keys[i], pubs, rng=np.random.default_rng(seed * 1000 + i))
             for i in range(1, n + 1)}
    return AggregatorSecAgg(cfg, round, pubs), sites, keys


def wire(msg, cfg: SecAggConfig):
    """Every message crosses the wire format, as it would over the network."""
    return decode(encode(msg), max_vector_len=cfg.vector_len)


def run_round(cfg: SecAggConfig, agg: AggregatorSecAgg, sites: dict[int, SiteSecAgg], inputs: dict,
              drop: dict[int, str] | None = None, tap: Callable | None = None, via_wire: bool = True):
    """Drive one round. ``drop[site] = stage`` makes the site vanish at that point (see STAGES).

    A dropped site is reported with ``site_dropped`` when the next message to it cannot be delivered; sites
    that are never written to again are flushed by ``deadline_passed`` once all messages are delivered.
    ``tap(event, obj)`` sees the aggregator after every call.
    """
    drop = drop or {}
    stage_of = {"before_keys": 0, "after_keys": 1, "after_shares": 2, "after_masked": 3, "after_signature": 4}
    sent_count: dict[int, int] = dict.fromkeys(sites, 0)
    tx = (lambda m: wire(m, cfg)) if via_wire else (lambda m: m)

    def alive(i: int) -> bool:
        return i not in drop or sent_count[i] < stage_of[drop[i]]

    queue: list = []
    for i, s in sites.items():
        if not alive(i):
            queue.extend(agg.site_dropped(i))
            continue
        for m in s.start(*inputs[i]):
            sent_count[i] += 1
            queue.extend(agg.receive(i, tx(m)))
            if tap:
                tap("agg", agg)
    while True:
        while queue:
            to, msg = queue.pop(0)
            if not alive(to):
                # the network layer finds the connection dead when it tries to send
                queue.extend(agg.site_dropped(to))
                continue
            for reply in sites[to].receive(tx(msg)):
                if not alive(to):
                    break
                sent_count[to] += 1
                queue.extend(agg.receive(to, tx(reply)))
                if tap:
                    tap("agg", agg)
        if agg.finished:
            return agg.outcome
        out = agg.deadline_passed()
        if not out and agg.finished:
            return agg.outcome
        queue.extend(out)


def random_inputs(cfg: SecAggConfig, ids: Iterable[int], rng: np.random.Generator, scale: float = 1.0):
    out = {}
    for i in ids:
        upd = (rng.standard_normal(cfg.dim) * scale).astype(np.float32)
        w = int(rng.integers(0, cfg.max_weight + 1))
        ex = rng.integers(0, cfg.max_extra + 1, cfg.n_extras).astype(np.int64)
        out[i] = (upd, w, ex)
    return out
