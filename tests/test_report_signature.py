"""The report's signature: over every byte before it, in a trailer PDF readers and browsers ignore."""

from __future__ import annotations

import pytest

from hemafed.core.trust.identity import IdentityKey
from hemafed.network.report_signature import ReportSignatureError, sign_document, verify_document


@pytest.mark.parametrize("kind, content", [("pdf", b"%PDF-1.4\n...\n%%EOF\n"), ("html", b"<html><p>hi</p></html>")])
def test_sign_and_verify(kind: str, content: bytes) -> None:
    key, other = IdentityKey.generate(), IdentityKey.generate()
    signed = sign_document(content, key, kind)
    assert signed.startswith(content) and signed.endswith(b" -->\n" if kind == "html" else b"\n")
    assert verify_document(signed).fingerprint == key.fingerprint
    assert verify_document(signed, key.public_line("a comment")).fingerprint == key.fingerprint
    flipped = signed[:3] + bytes([signed[3] ^ 1]) + signed[4:]
    for changed in (signed + b"\n", signed[:-1], b" " + signed, flipped,
                    content + sign_document(content, other, kind)[len(content):].replace(b"sig=", b"sig=A")):
        with pytest.raises(ReportSignatureError):
            verify_document(changed)
    with pytest.raises(ReportSignatureError, match="not by"):
        verify_document(signed, other.fingerprint)
    with pytest.raises(ReportSignatureError, match="no hemafed signature"):
        verify_document(content)
    # another key re-signing the same content is valid — for that other key, which --expect tells apart
    assert verify_document(sign_document(content, other, kind)).fingerprint == other.fingerprint


def test_a_report_signature_is_not_a_handshake_signature() -> None:
    """Domain separation: the key signs label + SHA-256 of the document, never the document's raw bytes."""
    key = IdentityKey.generate()
    content = b"<html></html>"
    signed = sign_document(content, key, "html")
    forged = content + signed[len(content):].replace(
        signed.split(b"sig=")[1].split(b" ")[0], __import__("base64").b64encode(key.sign(content)))
    with pytest.raises(ReportSignatureError):
        verify_document(forged)
