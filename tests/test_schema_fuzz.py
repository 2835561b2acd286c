"""Property-based fuzzing of every decoder on the aggregator's edge and of its message handling.

Each test feeds lists of generated messages (random bytes, hostile JSON literals such as
5,000-digit integers, 1e400 and NaN, wrong types, out-of-range numbers, unknown fields,
out-of-order secure-aggregation messages) and asserts that

* only the documented error types escape (`ProtocolError` from the transport's decoders and
  validator, `SecAggError` from the secure-aggregation decoder and state machine), and
* a refused message leaves the state it was refused by unchanged.

Together the tests push well over 10,000 messages through per run (see `TOTAL`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hemafed.core import secagg
from hemafed.core.rounds import agg_round
from hemafed.core.rounds.agg_round import Inbound
from hemafed.core.rounds.plan import FederationPlan
from hemafed.core.secagg import messages as M
from hemafed.core.trust import strict_json
from hemafed.network import protocol as P
from hemafed.network.aggregator import Aggregator
from hemafed.network.config import AggregatorConfig
from hemafed.network.envelope import Envelope, Limits
from hemafed.network.errors import ProtocolError

FUZZ = settings(max_examples=100, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example])
PER_EXAMPLE = 30
TOTAL = {"messages": 0}
LIMITS = Limits(max_message=1 << 20, max_header=64 << 10, max_blobs=8)

HOSTILE_LITERALS = ["1" + "0" * 5000, "-" + "9" * 400, "1e400", "-1e999", "NaN", "Infinity", "-Infinity",
                    "1" + "0" * 400, "1.5", "-1", "0", "4097", "2147483648", "true", "null", '""',
                    '"' + "\\n" * 50 + '"', '"\\u001b[2K"', "[" * 40 + "]" * 40, "{}", "[]"]

SITE_TYPES = [*sorted(P.SITE_TYPES), "plan", "round_start", "hello", "auth", "x" * 70, "Plan", ""]
FIELDS = ["reasons", "reason", "digest", "weight", "extra", "v", "type", "round", "body", "blobs"]

json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False,
                                                                                    allow_infinity=False) \
    | st.text(max_size=30)
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4)
                           | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), c, max_size=4),
                           max_leaves=8)


@st.composite
def body_text(draw: st.DrawFn) -> str:
    """A JSON object as text: generated values with hostile literals spliced in where JSON cannot say them."""
    keys = draw(st.lists(st.sampled_from(FIELDS), max_size=3, unique=True))
    parts = []
    for key in keys:
        if draw(st.booleans()):
            value = draw(st.sampled_from(HOSTILE_LITERALS))
            if draw(st.booleans()):
                value = f"[{value}]"
        else:
            value = json.dumps(draw(json_values))
        parts.append(f'"{key}":{value}')
    return "{" + ",".join(parts) + "}"


@st.composite
def envelopes(draw: st.DrawFn) -> bytes:
    """Wire bytes of one envelope: mostly well framed, with a generated header; sometimes raw garbage."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=200))
    kind = draw(st.sampled_from(SITE_TYPES))
    rnd = draw(st.sampled_from(["0", "1", "2", "-1", "1" + "0" * 5000, '"1"', "1.0", "2147483648"]))
    blobs = draw(st.lists(st.binary(max_size=64), max_size=3))
    if draw(st.booleans()) and kind == "plain_update":
        blobs = [bytes(4 * 10), np.zeros(4, "<i8").tobytes()]
    lengths = json.dumps([len(b) for b in blobs]) if draw(st.integers(0, 9)) else draw(
        st.sampled_from(["[-1]", "[1e400]", '["a"]', "{}", "[" + "1" + "0" * 30 + "]"]))
    header = f'{{"v":1,"type":{json.dumps(kind)},"round":{rnd},"body":{draw(body_text())},"blobs":{lengths}}}'
    raw = header.encode()
    if draw(st.integers(0, 19)) == 0:
        raw = raw[: draw(st.integers(0, len(raw)))]
    return struct.pack(">I", len(raw)) + raw + b"".join(blobs)


@FUZZ
@given(st.lists(envelopes(), min_size=PER_EXAMPLE, max_size=PER_EXAMPLE))
def test_envelope_decoder_raises_only_protocol_errors(batch: list[bytes]) -> None:
    for data in batch:
        try:
            env = Envelope.decode(data, LIMITS)
        except ProtocolError:
            continue
        assert isinstance(env, Envelope)
    TOTAL["messages"] += len(batch)


@st.composite
def secagg_bytes(draw: st.DrawFn) -> bytes:
    """A secure-aggregation wire message: right magic and version, a generated header, maybe a payload."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=120))
    kind = draw(st.sampled_from([*sorted(M.MESSAGE_TYPES), "secagg.nope", ""]))
    cls = M.MESSAGE_TYPES.get(kind)
    names = [f.name for f in dataclasses.fields(cls)] if cls else ["round"]
    names = ["vector_len" if n == "vector" else n for n in names]
    if draw(st.booleans()):
        names = draw(st.lists(st.sampled_from([*names, "extra"]), max_size=len(names) + 1, unique=True))
    parts = [f'"type":{json.dumps(kind)}']
    for name in names:
        if draw(st.booleans()):
            parts.append(f'"{name}":{draw(st.sampled_from(HOSTILE_LITERALS))}')
        else:
            parts.append(f'"{name}":{json.dumps(draw(json_values))}')
    head = ("{" + ",".join(parts) + "}").encode()
    payload = draw(st.binary(max_size=40))
    version = draw(st.sampled_from([1, 1, 1, 2]))
    return b"HFSA" + struct.pack("<BI", version, len(head)) + head + payload


@FUZZ
@given(st.lists(secagg_bytes(), min_size=PER_EXAMPLE, max_size=PER_EXAMPLE))
def test_secagg_decoder_raises_only_secagg_errors(batch: list[bytes]) -> None:
    """The decoder sites and the aggregator both run on each other's bytes."""
    for data in batch:
        try:
            msg = secagg.decode(data, max_vector_len=1000)
        except secagg.SecAggError:
            continue
        assert type(msg) in M.MESSAGE_TYPES.values()
    TOTAL["messages"] += len(batch)


@FUZZ
@given(st.lists(st.text(max_size=200) | st.binary(max_size=200), min_size=PER_EXAMPLE, max_size=PER_EXAMPLE))
def test_strict_json_raises_only_its_error(batch: list[str | bytes]) -> None:
    for data in batch:
        with contextlib.suppress(strict_json.StrictJSONError):
            strict_json.loads(data)
    TOTAL["messages"] += len(batch)


# ---------------------------------------------------------------- the aggregator's handling, end to end minus sockets

PLAN = FederationPlan(federation_id="fuzz", model="cnn4_28",
                algorithm="fedavg", dp_mode="local", noise_multiplier=0.0, rounds=2, threshold=3, min_sites=3,
                max_sites=5,
                      max_weight=4096, dp=False, join_timeout_s=10.0, stage_timeout_s=10.0, train_timeout_s=100.0)
DIM = 66_472  # cnn4_28's parameters with 8 classes (checked below)
SITES = [f"site{i}" for i in range(1, 6)]


def _aggregator(root: Path) -> Aggregator:
    """A real aggregator, resumed from its (empty) state directory, with no socket: the driver's
    `prepare` builds the federation machine and the edge's validator exactly as `run` does."""
    cfg = AggregatorConfig(plan=PLAN, sites={name: _key_line() for name in SITES}, state_dir=root, insecure=True,
                           linger_s=0)
    agg = Aggregator(cfg)
    agg.prepare()
    return agg


@pytest.fixture(scope="module")
def state_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(tmp_path_factory.mktemp("agg"))


def _key_line() -> str:
    from hemafed.core.trust.identity import public_line

    return public_line(Ed25519PrivateKey.generate().public_key())


@st.composite
def site_envelopes(draw: st.DrawFn) -> tuple[str, Envelope]:
    """Decodable envelopes with generated bodies and blobs: what reaches the validator."""
    site = draw(st.sampled_from(SITES))
    kind = draw(st.sampled_from([*sorted(P.SITE_TYPES), "plan", "round_end", "zzz"]))
    rnd = draw(st.integers(0, 3))
    if draw(st.booleans()):
        body = {"digest": PLAN.digest()} if kind == P.PLAN_ACCEPT else {
            "reasons": draw(st.lists(st.text(max_size=40), max_size=3))} if kind == P.PLAN_REJECT else {
            "reason": draw(st.text(max_size=40))} if kind == P.DECLINE else {
            "weight": draw(st.integers(-10, 5000))} if kind == P.PLAIN_UPDATE else {}
    else:
        body = draw(st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=3))
    blobs = tuple(draw(st.lists(st.binary(max_size=16), max_size=2)))
    if kind == P.SECAGG and draw(st.booleans()):
        blobs = (draw(secagg_bytes()),)
    if kind == P.PLAIN_UPDATE and draw(st.booleans()):
        blobs = (np.zeros(DIM, "<f4").tobytes(), np.zeros(len(PLAN.classes) ** 2, "<i8").tobytes())
    return site, Envelope(kind, rnd, body, blobs)


events = (site_envelopes() | st.tuples(st.sampled_from(["connect", "disconnect", "join", "join"]),
                                       st.sampled_from(SITES))
          | st.tuples(st.just("tick"), st.sampled_from([0.5, 5.0, 200.0, 4000.0])))


def _machine_view(agg: Aggregator) -> tuple:
    m = agg.machine
    return (frozenset(m.accepted), tuple(sorted((k, tuple(v)) for k, v in m.rejected.items())), m.stage, m.round,
            frozenset(m.connected_sites), len(m.outcomes), m.deadline, agg.validator.round, m.weights.tobytes())


@FUZZ
@given(st.lists(events, min_size=PER_EXAMPLE, max_size=PER_EXAMPLE))
def test_aggregator_edge_and_federation_machine(state_root: Path, batch: list) -> None:
    """Joins, leaves, clock ticks and generated messages, in any order, through the aggregator's edge
    (validator) into its federation machine (core/rounds/agg_round.py), without sockets: a message the edge
    refuses changes nothing; whatever passes is handled without any exception and without any
    `internal` refusal (which would mean a bug on the aggregator's side)."""
    import tempfile

    with tempfile.TemporaryDirectory(dir=state_root) as tmp:
        agg = _aggregator(Path(tmp))
        assert agg.dim == DIM
        m, now = agg.machine, 0.0
        m.start(now)
        for item in batch:
            if isinstance(item[1], Envelope):
                site, env = item
                before = _machine_view(agg)
                try:
                    agg.validator(site, env)
                except ProtocolError:
                    assert _machine_view(agg) == before
                    continue
                actions = m.receive(Inbound(site, env.type, env.round, env.body, env.blobs), now)
            elif item[0] == "tick":
                now += item[1]
                actions = m.tick(now)
            elif item[0] == "connect":
                actions = m.connected(item[1], now)
            elif item[0] == "join":  # what a well-behaved site does: connect, accept the plan
                actions = m.connected(item[1], now)
                actions += m.receive(Inbound(item[1], P.PLAN_ACCEPT, 0, {"digest": PLAN.digest()}), now)
            else:
                actions = m.disconnected(item[1], now)
            assert not [a for a in actions if isinstance(a, agg_round.Reject) and a.code == "internal"], actions
            for action in actions:
                if isinstance(action, agg_round.RoundFinished):
                    actions += m.recorded(action.outcome.round, now)
            agg.validator.round = m.round_in_progress
            # whatever a site wrote, what the aggregator keeps (and logs) is one printable line
            assert all(r.isprintable() for reasons in m.rejected.values() for r in reasons)
            assert m.accepted <= set(SITES)
            TOTAL["round steps"] = TOTAL.get("round steps", 0) + (m.stage is agg_round.Stage.ROUND)
        TOTAL["rounds ended"] = TOTAL.get("rounds ended", 0) + len(m.outcomes)
    TOTAL["messages"] += len(batch)


# ---------------------------------------------------------------- the secure-aggregation machine, out of order

CFG = secagg.SecAggConfig(federation_id="fuzz", threshold=3, dim=8, n_extras=4, clip=1.0, max_sites=8,
                          max_weight=100)


@st.composite
def secagg_messages(draw: st.DrawFn) -> tuple[int, object]:
    """Well-typed messages for the wrong stage, round, sender or content."""
    sid = draw(st.integers(1, 6))
    rnd = draw(st.sampled_from([1, 1, 1, 0, 2]))
    claimed = draw(st.sampled_from([sid, sid, draw(st.integers(1, 8))]))
    kind = draw(st.integers(0, 3))
    key = st.binary(min_size=32, max_size=32)
    if kind == 0:
        return sid, M.AdvertiseKeys(rnd, claimed, draw(key), draw(key), draw(st.binary(min_size=64, max_size=64)))
    if kind == 1:
        peers = draw(st.lists(st.integers(1, 8), max_size=4, unique=True))
        return sid, M.EncryptedShares(rnd, claimed, tuple((p, draw(st.binary(min_size=M.CIPHERTEXT_LEN,
                                                                              max_size=M.CIPHERTEXT_LEN)))
                                                          for p in peers))
    if kind == 2:
        n = draw(st.sampled_from([CFG.vector_len, CFG.vector_len, 3]))
        return sid, M.MaskedInput(rnd, claimed, np.zeros(n, dtype=np.uint32))
    peers = draw(st.lists(st.integers(1, 8), max_size=3, unique=True))
    share = st.binary(min_size=secagg.shamir.SHARE_LEN, max_size=secagg.shamir.SHARE_LEN)
    return sid, M.UnmaskShares(rnd, claimed, tuple((p, draw(share)) for p in peers), ())


def _machine_state(m: secagg.AggregatorSecAgg) -> tuple:
    return (m.stage, m.outcome, frozenset(m._gone), frozenset(m._pending), tuple(sorted(m._answered)),
            tuple(sorted(m._adverts)), m._u1, m._u2, m._u3, None if m._sum is None else m._sum.tobytes())


_KEYS = {i: Ed25519PrivateKey.generate() for i in range(1, 6)}
_PUBS = {i: k.public_key() for i, k in _KEYS.items()}


@FUZZ
@given(st.lists(secagg_messages() | st.integers(1, 5), min_size=PER_EXAMPLE, max_size=PER_EXAMPLE))
def test_secagg_aggregator_refuses_out_of_order_messages_without_changing_state(batch) -> None:
    """Hostile messages interleaved with real, signed advertisements (an int i: site i's), so the
    machine also moves on to later stages and is attacked there."""
    machine = secagg.AggregatorSecAgg(CFG, 1, _PUBS)
    sites = {i: secagg.SiteSecAgg(CFG, 1, i, _KEYS[i], _PUBS, rng=np.random.default_rng(i)) for i in _KEYS}
    adverts = {i: s.start(np.zeros(CFG.dim, np.float32), 10, np.zeros(CFG.n_extras, np.int64))[0]
               for i, s in sites.items()}
    for item in batch:
        sid, msg = (item, adverts[item]) if isinstance(item, int) else item
        before = _machine_state(machine)
        try:
            machine.receive(sid, msg)
        except secagg.SecAggError:
            assert _machine_state(machine) == before
    TOTAL["messages"] += len(batch)


def test_fuzzing_covers_at_least_ten_thousand_messages() -> None:
    """Five fuzz tests of 100 examples × 30 messages; when they ran before this one (pytest keeps file
    order), count what they really fed."""
    assert 5 * FUZZ.max_examples * PER_EXAMPLE >= 10_000
    if TOTAL["messages"]:
        assert TOTAL["messages"] >= 10_000, TOTAL
        # the machine was driven into rounds (and through round ends), not only refused at the door
        assert TOTAL["round steps"] > 0 and TOTAL["rounds ended"] > 0, TOTAL
