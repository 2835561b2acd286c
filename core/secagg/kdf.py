"""X25519 key agreement and HKDF-SHA256 with one label per purpose.

A shared secret is never used directly: each use (share encryption, pairwise masks, self masks) derives its
own key with a distinct label, bound to the federation, the round and the (unordered) pair of sites, so a key
can never serve two purposes or two rounds.
"""

from __future__ import annotations

import enum
import struct

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import AuthenticationError, MalformedMessage

_PREFIX = b"hemafed/secagg/v1/"
KEY_LEN = 32


class Purpose(enum.Enum):
    """HKDF labels; each purpose gets keys nobody can derive for another."""

    SHARE_ENCRYPTION = b"share-encryption"
    PAIRWISE_MASK = b"pairwise-mask"
    SELF_MASK = b"self-mask"


def context(federation_id: str, round: int, *ids: int) -> bytes:
    """Canonical HKDF context: federation, round and the sorted site ids (both ends of a pair agree)."""
    fed = federation_id.encode()
    parts = sorted(ids)
    return struct.pack(f"<H{len(fed)}sQB{len(parts)}I", len(fed), fed, round, len(parts), *parts)


def derive(secret: bytes, purpose: Purpose, ctx: bytes, length: int = KEY_LEN) -> bytes:
    """HKDF-SHA256(secret) with info = prefix | label | 0 | context."""
    info = _PREFIX + purpose.value + b"\x00" + ctx
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


def new_keypair() -> tuple[X25519PrivateKey, bytes]:
    """A fresh X25519 key pair; the public half as its 32 raw bytes."""
    sk = X25519PrivateKey.generate()
    return sk, public_bytes(sk)


def public_bytes(sk: X25519PrivateKey) -> bytes:
    return sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_bytes(sk: X25519PrivateKey) -> bytes:
    return sk.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                            serialization.NoEncryption())


def private_from_bytes(raw: bytes) -> X25519PrivateKey:
    if len(raw) != 32:
        raise MalformedMessage("X25519 private key must be 32 bytes")
    return X25519PrivateKey.from_private_bytes(raw)


def agree(sk: X25519PrivateKey, peer_public: bytes, *, site_id: int | None = None) -> bytes:
    """X25519 shared secret with a peer's raw public key; refuses malformed or low-order keys."""
    if len(peer_public) != 32:
        raise MalformedMessage("X25519 public key must be 32 bytes", site_id=site_id)
    try:
        return sk.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:  # all-zero shared secret: a low-order point chosen to force a known key
        raise AuthenticationError("X25519 key agreement failed", site_id=site_id) from exc


def derive_pair_key(sk: X25519PrivateKey, peer_public: bytes, purpose: Purpose, federation_id: str,
                    round: int, me: int, peer: int) -> bytes:
    """The key both ends of (me, peer) derive for one purpose in one round."""
    return derive(agree(sk, peer_public, site_id=peer), purpose, context(federation_id, round, me, peer))
