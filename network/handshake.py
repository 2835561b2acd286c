"""Site authentication, sans I/O: the server's challenge, the site's answer, the check.

    aggregator -> site   hello   {"proto": 1, "federation": str, "nonce": b64(32 random bytes)}
    site -> aggregator   auth    {"key": "hemafed-ed25519 <b64>", "sig": b64(Ed25519 signature)}
    aggregator -> site   welcome {"site": name}            or   error {"code", "message"} + close

The signature covers a domain-separation label, the federation name, the nonce,
the site's own public key and the hash of the aggregator's TLS certificate
(`tls.cert_binding`), so it cannot be replayed on another connection, to another
aggregator, or reused for any other purpose the identity key signs for.
"""

from __future__ import annotations

import base64
import binascii
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from hemafed.core.trust.identity import (
    IdentityError,
    IdentityKey,
    fingerprint,
    parse_public_line,
    public_line,
    public_raw,
    verify,
)
from hemafed.network.envelope import AUTH, ERROR, HELLO, WELCOME, Envelope
from hemafed.network.errors import AuthenticationRefused, HandshakeFailed, MalformedEnvelope

PROTO = 1
NONCE_BYTES = 32
_LABEL = b"hemafed/site-auth/v1\x00"


@dataclass(frozen=True)
class Challenge:
    federation: str
    nonce: bytes
    binding: bytes

    @classmethod
    def fresh(cls, federation: str, binding: bytes) -> Challenge:
        return cls(federation, os.urandom(NONCE_BYTES), binding)

    def envelope(self) -> Envelope:
        return Envelope(HELLO, 0, {"proto": PROTO, "federation": self.federation, "nonce": _b64(self.nonce)})


def transcript(federation: str, nonce: bytes, public_key_raw: bytes, binding: bytes) -> bytes:
    """The exact bytes a site signs; every field length-prefixed so none can bleed into another."""
    parts = [federation.encode(), nonce, public_key_raw, binding]
    return _LABEL + b"".join(struct.pack(">I", len(p)) + p for p in parts)


def answer(hello: Envelope, identity: IdentityKey, binding: bytes, expect_federation: str | None = None) -> Envelope:
    """The site's reply to `hello`; raises on anything but a well-formed challenge."""
    if hello.type == ERROR:
        raise refusal(hello)
    if hello.type != HELLO:
        raise MalformedEnvelope(f"expected {HELLO!r} from the aggregator, got {hello.type!r}")
    proto = hello.body.get("proto")
    if proto != PROTO:
        raise MalformedEnvelope(f"aggregator speaks protocol {proto!r}, this site speaks {PROTO}")
    federation = hello.body.get("federation")
    if not isinstance(federation, str):
        raise MalformedEnvelope("hello without a federation name")
    if expect_federation is not None and federation != expect_federation:
        raise HandshakeFailed(f"aggregator serves federation {federation!r}, expected {expect_federation!r}")
    nonce = _unb64(hello.body.get("nonce"), "nonce")
    if len(nonce) != NONCE_BYTES:
        raise MalformedEnvelope("challenge nonce has the wrong length")
    sig = identity.sign(transcript(federation, nonce, identity.public_bytes, binding))
    return Envelope(AUTH, 0, {"key": public_line(identity.public_key), "sig": _b64(sig)})


def check(challenge: Challenge, auth: Envelope, allowed: Mapping[bytes, str]) -> tuple[str, bytes]:
    """Verify a site's answer; returns (site name, raw public key) or raises `HandshakeFailed`.

    The signature is checked before the allow-list, so an outsider learns nothing
    about who is a member: a forged signature is refused the same way whatever key
    it names, and "unknown key" is only ever said to the holder of that key.
    """
    if auth.type != AUTH or set(auth.body) != {"key", "sig"}:
        raise HandshakeFailed(f"expected {AUTH!r} with key and sig, got {auth.type!r} {sorted(auth.body)}")
    key_line = auth.body["key"]
    if not isinstance(key_line, str):
        raise HandshakeFailed("auth key is not a string")
    try:
        public_key = parse_public_line(key_line)
    except IdentityError as exc:
        raise HandshakeFailed(f"auth key unreadable: {exc}") from None
    try:
        sig = _unb64(auth.body["sig"], "sig")
    except MalformedEnvelope as exc:
        raise HandshakeFailed(str(exc)) from None
    raw = public_raw(public_key)
    if not verify(public_key, sig, transcript(challenge.federation, challenge.nonce, raw, challenge.binding)):
        raise HandshakeFailed(f"bad signature for key {fingerprint(raw)}", code="bad_signature")
    site = allowed.get(raw)
    if site is None:
        raise HandshakeFailed(
            f"unknown key {fingerprint(raw)}",
            code="unknown_key",
            public=f"this site's key {fingerprint(raw)} is not in the federation's allowed list",
        )
    return site, raw


def welcome(site: str) -> Envelope:
    return Envelope(WELCOME, 0, {"site": site})


def refusal(env: Envelope) -> AuthenticationRefused:
    code = env.body.get("code")
    message = env.body.get("message")
    return AuthenticationRefused(
        code if isinstance(code, str) else "handshake",
        message if isinstance(message, str) else "authentication refused",
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(value: object, what: str) -> bytes:
    if not isinstance(value, str) or len(value) > 1024:
        raise MalformedEnvelope(f"{what} is not a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedEnvelope(f"{what} is not valid base64") from None
