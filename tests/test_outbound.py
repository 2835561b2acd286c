"""What the outbound log says protected each kind of message, and how it names a secure-aggregation message."""

from __future__ import annotations

import json

import numpy as np

from hemafed.core.privacy.store import SiteStore
from hemafed.core.rounds import round_messages as M
from hemafed.core.rounds.plan import FederationPlan
from hemafed.core.secagg import AdvertiseKeys, MaskedInput, encode, peek_type
from hemafed.network import outbound as O
from hemafed.network.envelope import Envelope


def test_protection_per_kind_and_plan() -> None:
    secure = FederationPlan(federation_id="f", algorithm="fedsgd", dp_mode="distributed", noise_multiplier=1.0)
    fedavg = {"algorithm": "fedavg", "dp_mode": "local", "noise_multiplier": 0.0, "secagg": False}
    plain_dp = FederationPlan(federation_id="f", **fedavg)
    non_private = FederationPlan(federation_id="f", dp=False, **fedavg)
    assert O.protection("auth", None) == O.HANDSHAKE
    assert O.protection("secagg.masked_input", secure) == O.NOISED_MASKED
    assert O.protection("secagg.masked_input", non_private) == O.MASKED
    assert O.protection("secagg.encrypted_shares", secure) == O.ENCRYPTED
    assert O.protection(M.PLAIN_UPDATE, plain_dp) == O.NOISED
    assert O.protection(M.PLAIN_UPDATE, non_private) == O.UNPROTECTED
    assert O.protection(M.PLAN_ACCEPT, secure) == O.PLAIN == O.protection("secagg.unmask_shares", secure)


def test_a_secure_aggregation_message_is_named_by_its_header(tmp_path) -> None:
    masked = encode(MaskedInput(3, 2, np.arange(10, dtype=np.uint32)))
    assert peek_type(masked) == "secagg.masked_input"
    assert peek_type(encode(AdvertiseKeys(1, 2, b"c" * 32, b"s" * 32, b"x" * 64))) == "secagg.advertise_keys"
    assert peek_type(b"HFSA\x02\xff\xff\xff\xff") == peek_type(b"junk") == "secagg.?"
    plan = FederationPlan(federation_id="f", algorithm="fedsgd", dp_mode="distributed", noise_multiplier=1.0)
    log = O.OutboundLog(SiteStore(tmp_path), lambda: ("f", plan), now=lambda: 5.0)
    env = Envelope(M.SECAGG, 3, {}, (masked,))
    record = log(env, env.encode(), {"x": 1})
    (stored,) = SiteStore(tmp_path).outbound("f")
    assert stored == record and (record.kind, record.stage, record.round) == ("secagg.masked_input", "masked", 3)
    assert record.bytes == len(env.encode()) and json.loads(record.detail) == {"x": 1}
    lines = O.format_log([record])
    assert record.sha256 in lines[1] and lines[-1] == f"total: 1 messages, {record.bytes:,} bytes"
