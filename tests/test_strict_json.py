"""The strict JSON every wire decoder uses, and the escaping of peer text (unit level)."""

from __future__ import annotations

import struct

import pytest

from hemafed.core import secagg
from hemafed.core.trust import strict_json
from hemafed.network.envelope import Envelope, Limits
from hemafed.network.errors import MalformedEnvelope
from hemafed.network.schema import safe_text

HUGE = "1" + "0" * 5000


@pytest.mark.parametrize("text", [HUGE, "-" + HUGE, "1e400", "-1e400", "NaN", "Infinity", '{"a":1,"a":2}',
                                  "[" * 33 + "]" * 33, "1" + "0" * 21])
def test_strict_json_refuses(text: str) -> None:
    with pytest.raises(strict_json.StrictJSONError):
        strict_json.loads(text)


def test_strict_json_accepts_what_messages_hold() -> None:
    assert strict_json.loads('{"round": 9223372036854775807, "x": [1.5, -2e-5, "[[[[{"], "n": null}') == {
        "round": 2**63 - 1, "x": [1.5, -2e-5, "[[[[{"], "n": None}
    assert strict_json.loads("[" * 32 + "]" * 32) is not None


@pytest.mark.parametrize("kind", sorted(secagg.messages.MESSAGE_TYPES))
def test_secagg_decoder_refuses_a_huge_integer_in_any_message(kind: str) -> None:
    """The path a site runs on the aggregator's bytes (and the aggregator on a site's)."""
    head = f'{{"type":"{kind}","round":{HUGE}}}'.encode()
    with pytest.raises(secagg.MalformedMessage):
        secagg.decode(b"HFSA" + struct.pack("<BI", 1, len(head)) + head, max_vector_len=10)


def test_envelope_decoder_refuses_a_huge_integer_anywhere() -> None:
    header = f'{{"v":1,"type":"plan","round":0,"body":{{"site_id":{HUGE}}},"blobs":[]}}'.encode()
    with pytest.raises(MalformedEnvelope):
        Envelope.decode(struct.pack(">I", len(header)) + header, Limits())


def test_safe_text_escapes_what_could_forge_or_hide_a_line() -> None:
    assert safe_text("ok\n2026 INFO forged\r\x1b[2K\u202egnp.exe\u2028\\") == \
        "ok\\x0a2026 INFO forged\\x0d\\x1b[2K\\u202egnp.exe\\u2028\\\\"
    assert safe_text("é 漢字 ok") == "é 漢字 ok"
    assert safe_text("x" * 300, 10) == "x" * 9 + "…"
    assert safe_text(12) == "12"
