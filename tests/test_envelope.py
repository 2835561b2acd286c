from __future__ import annotations

import contextlib
import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hemafed.network.envelope import Envelope, Limits
from hemafed.network.errors import MalformedEnvelope, MessageTooLarge, ProtocolError

LIMITS = Limits(max_message=1 << 16, max_header=1 << 12, max_blobs=8)


def frame(header: object, *blobs: bytes, raw_header: bytes | None = None) -> bytes:
    raw = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack(">I", len(raw)) + raw + b"".join(blobs)


def good(**over: object) -> dict:
    header = {"v": 1, "type": "update", "round": 3, "body": {"stage": "masked"}, "blobs": [3]}
    header.update(over)
    return header


def test_round_trip_with_blobs():
    env = Envelope("masked-input", 7, {"stage": "x", "n": [1, 2.5, None]}, (b"\x00\x01", b"", b"\xff" * 100))
    back = Envelope.decode(env.encode(), LIMITS)
    assert back == env
    assert Envelope.decode(Envelope("ping").encode(), LIMITS) == Envelope("ping", 0, {}, ())


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@given(
    type_=st.from_regex(r"[a-z][a-z0-9_.-]{0,20}", fullmatch=True),
    round_=st.integers(0, 2**31 - 1),
    body=st.dictionaries(st.text(max_size=8), json_values, max_size=5),
    blobs=st.lists(st.binary(max_size=200), max_size=8),
)
def test_round_trip_property(type_, round_, body, blobs):
    env = Envelope(type_, round_, body, tuple(blobs))
    assert Envelope.decode(env.encode(), LIMITS) == env


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_escape_as_other_errors(data):
    with contextlib.suppress(ProtocolError):
        Envelope.decode(data, LIMITS)


@pytest.mark.parametrize(
    "data, match",
    [
        (b"", "shorter than the length prefix"),
        (b"\x00\x00", "shorter than the length prefix"),
        (struct.pack(">I", 100) + b"{}", "runs past the end"),
        (frame(None, raw_header=b"{not json"), "not valid JSON"),
        (frame(None, raw_header=b"\xff\xfe"), "not valid JSON"),
        (frame([1, 2]), "not a JSON object"),
        (frame(None, raw_header=b'{"v":1,"v":1,"type":"a","round":0,"body":{},"blobs":[]}'), "duplicate key"),
        (frame(None, raw_header=b'{"v":1,"type":"a","round":0,"body":{"x":NaN},"blobs":[]}'), "NaN"),
        (frame({k: v for k, v in good().items() if k != "round"}, b"abc"), "header keys"),
        (frame(good(extra=1), b"abc"), "header keys"),
        (frame(good(v=2), b"abc"), "version"),
        (frame(good(v=True), b"abc"), "version"),
        (frame(good(type="Update"), b"abc"), "message type"),
        (frame(good(type=""), b"abc"), "message type"),
        (frame(good(type=5), b"abc"), "message type"),
        (frame(good(round=-1), b"abc"), "round"),
        (frame(good(round=True), b"abc"), "round"),
        (frame(good(round=1.0), b"abc"), "round"),
        (frame(good(round=2**31), b"abc"), "round"),
        (frame(good(body=[]), b"abc"), "body"),
        (frame(good(blobs=[-1]), b"abc"), "non-negative"),
        (frame(good(blobs="3"), b"abc"), "non-negative"),
        (frame(good(blobs=[True]), b"abc"), "non-negative"),
        (frame(good(blobs=[2]), b"abc"), "sum to 2"),
        (frame(good(blobs=[4]), b"abc"), "sum to 4"),
        (frame(None, raw_header=b"[" * 2000 + b"]" * 2000), "JSON"),
    ],
)
def test_malformed(data, match):
    with pytest.raises(MalformedEnvelope, match=match) as info:
        Envelope.decode(data, LIMITS)
    assert info.value.code == "malformed"
    assert info.value.public == "malformed message"  # what the peer sees: no parser details


def test_text_frame_is_malformed():
    with pytest.raises(MalformedEnvelope, match="text frame"):
        Envelope.decode("hello", LIMITS)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "data",
    [
        frame(good(blobs=[1 << 16]), b"\x00" * (1 << 16)),
        frame(good(body={"pad": "x" * 5000}, blobs=[])),
        frame(good(blobs=[0] * 9)),
    ],
)
def test_too_large(data):
    with pytest.raises(MessageTooLarge) as info:
        Envelope.decode(data, LIMITS)
    assert info.value.code == "too_large" and info.value.close_code == 1009


def test_sender_side_checks():
    with pytest.raises(ValueError):
        Envelope("Bad Type")
    with pytest.raises(ValueError):
        Envelope("ok", -1)
    with pytest.raises(ValueError):
        Envelope("ok", 0, {"x": float("nan")}).encode()
    assert Envelope("ok", blobs=[b"a"]).blobs == (b"a",)  # type: ignore[arg-type]


def test_limits_follow_the_model_size():
    small = Limits.for_model(10_000)
    big = Limits.for_model(11_000_000)
    assert big.max_message > 11_000_000 * 8 > small.max_message > 10_000 * 8
    assert Limits.for_model(1000, bytes_per_param=4, max_sites=0).max_message == 4 + (256 << 10) + (2024 * 4)
    with pytest.raises(ValueError):
        Limits.for_model(0)
    with pytest.raises(ValueError):
        Limits(max_message=100, max_header=200)
