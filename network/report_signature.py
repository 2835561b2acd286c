"""Signing a site's privacy report with the site's identity key, and checking the signature.

The signature covers every byte of the document before it and is appended as one trailing line that PDF
readers and browsers ignore (a PDF comment after the final %%EOF; an HTML comment):

    %hemafed-signature v1 key=hemafed-ed25519 <base64 public key> sig=<base64 Ed25519 signature>
    <!-- hemafed-signature v1 key=hemafed-ed25519 <base64 public key> sig=<base64 Ed25519 signature> -->

The signed message is a domain-separation label followed by the SHA-256 of the document's bytes, so the same key
signing a handshake transcript or a roster can never produce a valid report signature. Checking re-reads the
key from the trailer, verifies, and requires the file to end exactly with the trailer it would have written:
a single changed, added or removed byte anywhere makes the check fail. The key in the trailer says who signed;
compare its fingerprint with the one this site gave the federation's admin (`--expect`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass

from hemafed.core.errors import HemafedError
from hemafed.core.trust.identity import IdentityError, IdentityKey, fingerprint, parse_public_line, public_line, verify

LABEL = b"hemafed/site-report/v1\x00"
_TRAILER = re.compile(rb"\n(%|<!-- )hemafed-signature v1 key=(hemafed-ed25519 [A-Za-z0-9+/=]{1,100}) "
                      rb"sig=([A-Za-z0-9+/=]{1,200})( -->)?\n\Z")


class ReportSignatureError(HemafedError):
    """The report is unsigned, its signature does not match its bytes, or it was signed by another key."""


@dataclass(frozen=True)
class Signer:
    fingerprint: str
    public_line: str


def _message(content: bytes) -> bytes:
    return LABEL + hashlib.sha256(content).digest()


def _trailer(kind: str, key_line: str, signature: bytes) -> bytes:
    body = f"hemafed-signature v1 key={key_line} sig={base64.b64encode(signature).decode()}"
    return (f"\n%{body}\n" if kind == "pdf" else f"\n<!-- {body} -->\n").encode()


def sign_document(content: bytes, identity: IdentityKey, kind: str) -> bytes:
    """`content` (a PDF or HTML document, `kind` "pdf" or "html") with its signature trailer appended."""
    if kind not in ("pdf", "html"):
        raise ValueError("kind must be 'pdf' or 'html'")
    return content + _trailer(kind, public_line(identity.public_key), identity.sign(_message(content)))


def verify_document(data: bytes, expect: str | None = None) -> Signer:
    """Check a signed report's bytes; returns who signed. Raises `ReportSignatureError` when the document carries
    no well-formed trailer, when any byte differs from what was signed, or when `expect` (a fingerprint or
    public-key line) names another key."""
    match = _TRAILER.search(data)
    if match is None:
        raise ReportSignatureError("no hemafed signature at the end of this file (not a signed report, or its "
                                   "last line was changed)")
    content = data[:match.start()]
    kind = "pdf" if match.group(1) == b"%" else "html"
    try:
        key = parse_public_line(match.group(2).decode())
        signature = base64.b64decode(match.group(3), validate=True)
    except (IdentityError, binascii.Error, ValueError) as exc:
        raise ReportSignatureError(f"the signature line is damaged ({exc})") from None
    line = public_line(key)
    if data[match.start():] != _trailer(kind, line, signature):
        raise ReportSignatureError("the signature line is not in the form hemafed writes")
    if not verify(key, signature, _message(content)):
        raise ReportSignatureError("the signature does not match this file: it was changed after it was signed")
    signer = Signer(fingerprint(key), line)
    if expect is not None and expect.strip() not in (signer.fingerprint, line):
        try:
            expected = fingerprint(parse_public_line(expect.strip()))
        except IdentityError:
            expected = expect.strip()
        if expected != signer.fingerprint:
            raise ReportSignatureError(f"signed by {signer.fingerprint}, not by {expected}")
    return signer
