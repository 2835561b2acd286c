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
from hemafed.network import schema
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
    """What the aggregator accepts from a site right now: type, round, stage, then the schema.

    Runs in the transport before a message is queued; anything else closes that
    site's connection with a generic error while the federation carries on. The
    schema (`hemafed.network.schema.site_schemas`) bounds every number by the plan,
    so the driver can do arithmetic on what it receives without further checks.
    """

    def __init__(self, dim: int, n_extras: int, max_secagg_bytes: int, *, max_weight: int = 1 << 20,
                 max_sites: int = 64) -> None:
        self.dim, self.n_extras, self.max_secagg_bytes = dim, n_extras, max_secagg_bytes
        n_classes = max(1, round(n_extras**0.5))
        self.schemas = schema.site_schemas(schema.Bounds(dim=dim, n_classes=n_classes, max_weight=max_weight,
                                                         max_sites=max_sites, max_secagg_bytes=max_secagg_bytes))
        self.round = 0
        self.secagg = True

    def __call__(self, site: str, env: Envelope) -> None:
        if env.type not in SITE_TYPES:
            raise UnexpectedMessage(f"{site} sent unknown type {schema.safe_text(env.type, 64)}")
        # A message for an earlier round is a benign race (that round ended while the site
        # was still training) and the driver drops it; a future round is never legitimate.
        if env.type in ROUND_BOUND and env.round > self.round:
            raise UnexpectedMessage(f"{site} sent {env.type} for round {env.round} during round {self.round}")
        if env.type == SECAGG and not self.secagg:
            raise UnexpectedMessage(f"{site} sent secagg while secure aggregation is off")
        if env.type == PLAIN_UPDATE and self.secagg:
            raise UnexpectedMessage(f"{site} sent a plain update while secure aggregation is on")
        schema.check_body(self.schemas, env.type, env.body, env.blobs)


def plan_validator(plan: FederationPlan, dim: int, n_sites: int) -> SiteMessageValidator:
    """The validator for `plan`: every bound comes from the plan and the model size."""
    n_extras = len(plan.classes) ** 2
    # One masked vector (4 bytes a coordinate), plus per-site key material or shares, plus slack.
    max_secagg = 4 * (dim + n_extras) + 4096 * max(n_sites, 1) + 65536
    validator = SiteMessageValidator(dim, n_extras, max_secagg, max_weight=plan.max_weight,
                                     max_sites=plan.max_sites)
    validator.secagg = plan.secagg
    return validator
