"""The round vocabulary carried in envelopes between the aggregator and the sites.

aggregator → site                       site → aggregator
  plan        (after connecting)          plan_accept / plan_reject
  round_start (round r, global weights)   decline (budget exhausted, …)
  secagg      (one encoded core message)  secagg  (one encoded core message)
                                          plain_update (only when secure aggregation is off)
  round_end   (status, federated metrics)
  done        (final weights)

Secure-aggregation messages ride as one opaque blob each, encoded and decoded by
`hemafed.core.secagg.messages`; weights as raw little-endian float32.
"""

from __future__ import annotations

import numpy as np

from hemafed.core import secagg
from hemafed.core.plan import FederationPlan
from hemafed.network.envelope import Envelope
from hemafed.network.errors import MalformedMessage, UnexpectedMessage

PLAN = "plan"
PLAN_ACCEPT = "plan_accept"
PLAN_REJECT = "plan_reject"
ROUND_START = "round_start"
DECLINE = "decline"
SECAGG = "secagg"
PLAIN_UPDATE = "plain_update"
ROUND_END = "round_end"
DONE = "done"

SITE_TYPES = frozenset({PLAN_ACCEPT, PLAN_REJECT, DECLINE, SECAGG, PLAIN_UPDATE})
ROUND_BOUND = frozenset({DECLINE, SECAGG, PLAIN_UPDATE})


def secagg_config(plan: FederationPlan, dim: int) -> secagg.SecAggConfig:
    """The secure-aggregation parameters both sides derive from the plan (they must agree exactly)."""
    k = len(plan.classes)
    return secagg.SecAggConfig(federation_id=plan.federation_id, threshold=plan.threshold, dim=dim,
                               n_extras=k * k, clip=plan.update_clip, max_sites=plan.max_sites,
                               max_weight=plan.max_weight)


def weights_blob(weights: np.ndarray) -> bytes:
    return np.ascontiguousarray(weights, dtype="<f4").tobytes()


def blob_to_vector(blob: bytes, length: int, dtype: str = "<f4") -> np.ndarray:
    """A received vector, checked for length and finiteness before anyone uses it."""
    itemsize = np.dtype(dtype).itemsize
    if len(blob) != length * itemsize:
        raise MalformedMessage(f"vector of {len(blob)} bytes, expected {length} × {itemsize}")
    vec = np.frombuffer(blob, dtype=dtype).astype(dtype[1:] if dtype[0] in "<>" else dtype)
    if vec.dtype.kind == "f" and not np.isfinite(vec).all():
        raise MalformedMessage("vector holds NaN or infinite values")
    return vec


class SiteMessageValidator:
    """What the aggregator accepts from a site right now (type, round, blob shape).

    Runs in the transport before a message is queued; anything else closes that
    site's connection with a generic error while the federation carries on.
    """

    def __init__(self, dim: int, n_extras: int, max_secagg_bytes: int) -> None:
        self.dim, self.n_extras, self.max_secagg_bytes = dim, n_extras, max_secagg_bytes
        self.round = 0
        self.secagg = True

    def __call__(self, site: str, env: Envelope) -> None:
        if env.type not in SITE_TYPES:
            raise UnexpectedMessage(f"{site} sent unknown type {env.type!r}")
        # A message for an earlier round is a benign race (that round ended while the site
        # was still training) and the driver drops it; a future round is never legitimate.
        if env.type in ROUND_BOUND and env.round > self.round:
            raise UnexpectedMessage(f"{site} sent {env.type} for round {env.round} during round {self.round}")
        if env.type == SECAGG:
            if not self.secagg:
                raise UnexpectedMessage(f"{site} sent secagg while secure aggregation is off")
            if len(env.blobs) != 1 or len(env.blobs[0]) > self.max_secagg_bytes:
                raise UnexpectedMessage(f"{site} sent a secagg message of the wrong shape")
        elif env.type == PLAIN_UPDATE:
            if self.secagg:
                raise UnexpectedMessage(f"{site} sent a plain update while secure aggregation is on")
            sizes = [len(b) for b in env.blobs]
            if sizes != [4 * self.dim, 8 * self.n_extras] or not isinstance(env.body.get("weight"), int):
                raise UnexpectedMessage(f"{site} sent a plain update of the wrong shape")
        elif env.blobs:
            raise UnexpectedMessage(f"{site} attached data to {env.type}")
