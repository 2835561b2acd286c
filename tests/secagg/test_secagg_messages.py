from __future__ import annotations

import contextlib
import json
import os
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hemafed.core.secagg import messages as m
from hemafed.core.secagg.errors import MalformedMessage, SecAggError, VectorLengthError

CT = os.urandom(m.CIPHERTEXT_LEN)
ADV = m.AdvertiseKeys(round=3, site_id=2, c_pk=os.urandom(32), s_pk=os.urandom(32), signature=os.urandom(64))
SAMPLES = [
    ADV,
    m.KeyList(round=3, adverts=(ADV, m.AdvertiseKeys(round=3, site_id=5, c_pk=os.urandom(32), s_pk=os.urandom(32),
                                                      signature=os.urandom(64)))),
    m.EncryptedShares(round=3, site_id=2, shares=((1, CT), (5, CT))),
    m.ShareDelivery(round=3, site_id=1, shares=((2, CT),)),
    m.MaskedInput(round=3, site_id=2, vector=np.arange(10, dtype=np.uint32) * 400_000_000),
    m.UnmaskRequest(round=3, survivors=(1, 2), dropouts=(5,)),
    m.UnmaskShares(round=3, site_id=2, self_mask_shares=((1, os.urandom(33)), (2, os.urandom(33))),
                   key_shares=((5, os.urandom(33)),)),
    m.RoundAbandoned(round=3, reason="too few sites"),
]


def header(data: bytes) -> dict:
    n = struct.unpack_from("<I", data, 5)[0]
    return json.loads(data[9:9 + n])


def rebuild(h: dict, payload: bytes = b"", version: int = m.SCHEMA_VERSION) -> bytes:
    head = json.dumps(h).encode()
    return b"HFSA" + struct.pack("<BI", version, len(head)) + head + payload


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda x: x.type)
def test_round_trip(msg):
    data = m.encode(msg)
    back = m.decode(data, max_vector_len=100)
    assert type(back) is type(msg) and back.round == msg.round
    if isinstance(msg, m.MaskedInput):
        assert np.array_equal(back.vector, msg.vector) and back.vector.dtype == np.uint32
    else:
        assert back == msg
    assert header(data)["type"] == msg.type


def test_masked_input_is_compact():
    n = 1_000_000
    data = m.encode(m.MaskedInput(round=1, site_id=1, vector=np.zeros(n, np.uint32)))
    assert len(data) <= 1.1 * 4 * n and len(data) - 4 * n < 200


def test_every_type_has_a_version_and_type_constant():
    for cls in m.MESSAGE_TYPES.values():
        assert cls.version == m.SCHEMA_VERSION and cls.type.startswith("secagg.")


@pytest.mark.parametrize("mutate", [
    lambda d: d[:3],
    lambda d: b"XXXX" + d[4:],
    lambda d: d[:4] + bytes([9]) + d[5:],                        # unknown schema version
    lambda d: d[:5] + struct.pack("<I", 10**9) + d[9:],          # header longer than the message
    lambda d: d[:9] + b"[" + d[10:],                             # broken JSON
    lambda d: d + b"extra payload",
    lambda d: rebuild({**header(d), "type": "secagg.nope"}),
    lambda d: rebuild({**header(d), "round": -1}),
    lambda d: rebuild({**header(d), "round": True}),
    lambda d: rebuild({**header(d), "site_id": 0}),
    lambda d: rebuild({**header(d), "site_id": "2"}),
    lambda d: rebuild({**header(d), "c_pk": "AAAA"}),            # 3-byte key
    lambda d: rebuild({**header(d), "c_pk": "!!!"}),             # not base64
    lambda d: rebuild({**header(d), "bonus": 1}),                # unexpected field
    lambda d: rebuild({k: v for k, v in header(d).items() if k != "s_pk"}),
    lambda d: rebuild({**header(d), "signature": "A" * 100}),    # 75 bytes: too long
    lambda d: rebuild([1, 2]),
])
def test_malformed_advert_is_refused(mutate):
    with pytest.raises(MalformedMessage):
        m.decode(mutate(m.encode(ADV)), max_vector_len=None)


def test_malformed_lists_are_refused():
    es = m.encode(SAMPLES[2])
    h = header(es)
    for bad in ([[1, "AAAA"]], [[1, h["shares"][0][1]], [1, h["shares"][0][1]]], [[1]], "x", [[70000, "AAAA"]]):
        with pytest.raises(MalformedMessage):
            m.decode(rebuild({**h, "shares": bad}), max_vector_len=None)
    ur = header(m.encode(SAMPLES[5]))
    for bad in ([1, 1], [0], "1,2", [1.5]):
        with pytest.raises(MalformedMessage):
            m.decode(rebuild({**ur, "survivors": bad}), max_vector_len=None)
    kl = header(m.encode(SAMPLES[1]))
    with pytest.raises(MalformedMessage):  # the same site twice
        m.decode(rebuild({**kl, "adverts": [kl["adverts"][0]] * 2}), max_vector_len=None)
    with pytest.raises(MalformedMessage):  # an advert for another round inside the list
        m.decode(rebuild({**kl, "adverts": [{**kl["adverts"][0], "round": 4}]}), max_vector_len=None)
    with pytest.raises(MalformedMessage):
        m.decode(rebuild({**header(m.encode(SAMPLES[7])), "reason": "x" * 500}), max_vector_len=None)


def test_vector_size_checks():
    msg = SAMPLES[4]
    data = m.encode(msg)
    with pytest.raises(VectorLengthError):
        m.decode(data, max_vector_len=9)
    with pytest.raises(VectorLengthError):
        m.decode(data[:-1], max_vector_len=None)
    h = header(data)
    with pytest.raises(VectorLengthError):
        m.decode(rebuild({**h, "vector_len": 11}, msg.vector.tobytes()), max_vector_len=None)
    with pytest.raises(VectorLengthError):
        m.validate(m.MaskedInput(round=1, site_id=1, vector=np.zeros(3, np.float32)))


def test_all_errors_share_one_base():
    with pytest.raises(SecAggError):
        m.decode(b"garbage!!!!!", max_vector_len=None)
    with pytest.raises(MalformedMessage):
        m.decode("text", max_vector_len=None)  # type: ignore[arg-type]
    with pytest.raises(MalformedMessage):
        m.validate(object())


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(SAMPLES))
def test_arbitrary_or_spliced_bytes_raise_only_secagg_errors(junk, sample):
    good = m.encode(sample)
    for data in (junk, good[:9] + junk, good[: len(good) // 2] + junk, b"HFSA\x01" + junk):
        with contextlib.suppress(SecAggError):
            m.decode(data, max_vector_len=100)
