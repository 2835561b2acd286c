"""The site's outbound log: every message it sends, recorded before it is sent.

The site's transport (`network.client.SiteClient`) calls an `OutboundLog` with the exact bytes of each message
just before handing them to the socket — the handshake's answer, every round message, an error report — and
the log appends a row to the site's store (`core.privacy.store.SiteStore.log_outbound`, one durable
transaction): when, the federation, round and stage, the message kind, its size, the SHA-256 of those bytes,
what protected it, and a few details. A failure to record stops the message: nothing leaves unrecorded.

Protection, per kind of message:

* **handshake** — the answer to the aggregator's challenge: this site's public key and its signature; no data;
* **plain** — control messages, readable by the aggregator (inside TLS): the plan's digest on acceptance, the
  reasons for a refusal, preparation progress, a declined round, this round's fresh public keys, the signed
  survivor list, and the shares that unmask the *sum* (of surviving sites' self-masks and dropped sites' pair
  keys: never enough to open one site's vector);
* **encrypted** — Shamir shares of this round's mask keys, each sealed (AES-GCM) for one other site;
* **DP-noised + masked** — the round's update (clipped gradient sum with this site's noise, validation counts),
  masked by secure aggregation: the aggregator can only open the sum over ≥ t sites;
* **masked** — the same without differential privacy (a non-private plan with secure aggregation);
* **DP-noised** / **unprotected** — an update sent without secure aggregation, with or without DP noise. A secure
  plan never sends one (tests/federation/test_outbound_log.py).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from hemafed.core.privacy.store import OutboundRecord, SiteStore
from hemafed.core.rounds import round_messages as M
from hemafed.core.secagg import peek_type
from hemafed.network.envelope import AUTH, ERROR, Envelope

HANDSHAKE, PLAIN, ENCRYPTED = "handshake", "plain", "encrypted"
NOISED_MASKED, MASKED, NOISED, UNPROTECTED = "DP-noised + masked", "masked", "DP-noised", "unprotected"

# kind -> (stage, what the message carries, in words)
KINDS: dict[str, tuple[str, str]] = {
    AUTH: ("handshake", "this site's public key and its signature of the aggregator's challenge"),
    M.PREPARING: ("joining", "preparation progress (images prepared of the total)"),
    M.PLAN_ACCEPT: ("joining", "acceptance of the plan (its digest)"),
    M.PLAN_REJECT: ("joining", "refusal of the plan, with the reasons"),
    M.DECLINE: ("training", "declines the round (privacy budget exhausted)"),
    "secagg.advertise_keys": ("keys", "two fresh public keys for this round, signed"),
    "secagg.encrypted_shares": ("shares", "shares of this round's mask keys, each encrypted for one other site"),
    "secagg.masked_input": ("masked", "this round's update (clipped gradient sum, noise share, validation "
                                      "counts), masked"),
    "secagg.survivor_signature": ("consistency", "signature over the list of sites still in the round"),
    "secagg.unmask_shares": ("unmask", "shares that remove the masks of the sum (never of one site's vector)"),
    M.PLAIN_UPDATE: ("training", "this round's update, not masked (secure aggregation is off)"),
    ERROR: ("error", "an error report to the aggregator"),
}
UPDATE_KINDS = frozenset({"secagg.masked_input", M.PLAIN_UPDATE})  # the only messages carrying an update


def message_kind(env: Envelope) -> str:
    """The envelope's type, or for a secure-aggregation message the type inside it."""
    if env.type == M.SECAGG and len(env.blobs) == 1:
        return peek_type(env.blobs[0])
    return env.type


def protection(kind: str, plan) -> str:
    """What protected a message of `kind` under `plan` (a `FederationPlan`, or None before one arrived)."""
    dp = plan is not None and plan.dp
    if kind == AUTH:
        return HANDSHAKE
    if kind == "secagg.encrypted_shares":
        return ENCRYPTED
    if kind == "secagg.masked_input":
        return NOISED_MASKED if dp else MASKED
    if kind == M.PLAIN_UPDATE:
        return NOISED if dp else UNPROTECTED
    return PLAIN


class OutboundLog:
    """Records each message a site sends in its store. `context()` gives (federation, plan) at the moment of
    sending; `now` is the clock (time.time)."""

    def __init__(self, store: SiteStore, context: Callable[[], tuple[str, object]],
                 now: Callable[[], float] = time.time) -> None:
        self.store = store
        self.context = context
        self.now = now

    def __call__(self, env: Envelope, data: bytes, detail: dict | None = None) -> OutboundRecord:
        federation, plan = self.context()
        kind = message_kind(env)
        stage = KINDS.get(kind, ("other", ""))[0]
        record = OutboundRecord(time=self.now(), federation_id=federation or "", round=int(env.round), stage=stage,
                                kind=kind, bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
                                protection=protection(kind, plan),
                                detail=json.dumps(detail or {}, sort_keys=True))
        self.store.log_outbound(record)
        return record


@dataclass(frozen=True)
class Totals:
    messages: int
    bytes: int


def totals(records: Iterable[OutboundRecord], key: Callable[[OutboundRecord], object]) -> dict[object, Totals]:
    """Messages and bytes grouped by `key` (e.g. lambda r: r.round, or r.kind), in first-seen order."""
    out: dict[object, Totals] = {}
    for r in records:
        k = key(r)
        t = out.get(k, Totals(0, 0))
        out[k] = Totals(t.messages + 1, t.bytes + r.bytes)
    return out


def describe(kind: str) -> str:
    """What a message of `kind` carries, in words."""
    return KINDS.get(kind, ("other", "a message of a kind this version does not describe"))[1]


def format_log(records: list[OutboundRecord]) -> list[str]:
    """The log as lines of text (`hemafed site --outbound`): one per message, then totals per round and per kind."""
    out = [f"{'time':<20}{'federation':<18}{'round':>6}  {'stage':<12}{'kind':<27}{'bytes':>10}  "
           f"{'protection':<20}sha256"]
    for r in records:
        out.append(f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(r.time)):<20}{r.federation_id[:17]:<18}"
                   f"{r.round:>6}  {r.stage:<12}{r.kind:<27}{r.bytes:>10}  {r.protection:<20}{r.sha256}")
    out.append("")
    out.append("per round:")
    for rnd, t in totals(records, lambda r: (r.federation_id, r.round)).items():
        out.append(f"  {rnd[0]} round {rnd[1]:>4}: {t.messages:>4} messages {t.bytes:>12,} bytes")
    out.append("per kind:")
    for (kind, prot), t in totals(records, lambda r: (r.kind, r.protection)).items():
        out.append(f"  {kind:<27}{prot:<20}{t.messages:>6} messages {t.bytes:>12,} bytes")
    out.append(f"total: {len(records)} messages, {sum(r.bytes for r in records):,} bytes")
    return out
