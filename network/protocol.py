"""The round vocabulary carried in envelopes between the aggregator and the sites (the message
types and who sends which: `hemafed.core.rounds.round_messages`), and the aggregator's edge validator.

Secure-aggregation messages ride as one opaque blob each, encoded and decoded by
`hemafed.core.secagg.messages`; weights as raw little-endian float32.
"""

from __future__ import annotations

import numpy as np

from hemafed.core.rounds import agg_round
from hemafed.core.rounds.agg_round import DECLINE, PLAIN_UPDATE, PLAN_ACCEPT, PLAN_REJECT, PREPARING, SECAGG
from hemafed.core.rounds.plan import FederationPlan
from hemafed.network import schema
from hemafed.network.envelope import Envelope
from hemafed.network.errors import MalformedEnvelope, UnexpectedMessage

# The names and helpers live with the machine that speaks them (core/rounds/agg_round.py); drivers use them from here.
PLAN = agg_round.PLAN
ROUND_START = agg_round.ROUND_START
ROUND_END = agg_round.ROUND_END
DONE = agg_round.DONE
weights_blob = agg_round.weights_blob

SITE_TYPES = frozenset({PREPARING, PLAN_ACCEPT, PLAN_REJECT, DECLINE, SECAGG, PLAIN_UPDATE})
ROUND_BOUND = frozenset({DECLINE, SECAGG, PLAIN_UPDATE})


def blob_to_vector(blob: bytes, length: int, dtype: str = "<f4") -> np.ndarray:
    """A received vector, checked for length and finiteness before anyone uses it."""
    try:
        return agg_round.blob_to_vector(blob, length, dtype)
    except ValueError as exc:
        raise MalformedEnvelope(str(exc)) from None


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
