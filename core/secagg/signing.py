"""Ed25519 signatures made with a site's long-term identity key: over its advertised round keys, and over the
survivor and dropout lists of a round (Bonawitz et al.'s consistency check).

The signed bytes name the federation, the round and (for adverts) the site id, so a signature cannot be
replayed in another round or federation nor claimed by another site. Each kind has its own domain prefix.
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import SignatureError

SIGNATURE_LEN = 64
_DOMAIN = b"hemafed/secagg/v1/advertise-keys\x00"
_SURVIVORS_DOMAIN = b"hemafed/secagg/v2/survivor-lists\x00"


def advert_bytes(federation_id: str, round: int, site_id: int, c_pk: bytes, s_pk: bytes) -> bytes:
    fed = federation_id.encode()
    return _DOMAIN + struct.pack(f"<H{len(fed)}sQI32s32s", len(fed), fed, round, site_id, c_pk, s_pk)


def sign_advert(identity: Ed25519PrivateKey, federation_id: str, round: int, site_id: int,
                c_pk: bytes, s_pk: bytes) -> bytes:
    return identity.sign(advert_bytes(federation_id, round, site_id, c_pk, s_pk))


def verify_advert(identity: Ed25519PublicKey, signature: bytes, federation_id: str, round: int, site_id: int,
                  c_pk: bytes, s_pk: bytes) -> None:
    """Raise :class:`SignatureError` unless ``signature`` is the identity key's signature of these keys."""
    if len(signature) != SIGNATURE_LEN:
        raise SignatureError("advertised keys are unsigned or the signature has the wrong size",
                             round=round, site_id=site_id)
    try:
        identity.verify(signature, advert_bytes(federation_id, round, site_id, c_pk, s_pk))
    except InvalidSignature as exc:
        raise SignatureError("advertised keys are not signed by the site's identity key",
                             round=round, site_id=site_id) from exc


def survivors_bytes(federation_id: str, round: int, survivors: tuple[int, ...], dropouts: tuple[int, ...]) -> bytes:
    fed = federation_id.encode()
    ids = tuple(sorted(survivors)) + tuple(sorted(dropouts))
    return _SURVIVORS_DOMAIN + struct.pack(f"<H{len(fed)}sQII{len(ids)}I", len(fed), fed, round, len(survivors),
                                           len(dropouts), *ids)


def sign_survivors(identity: Ed25519PrivateKey, federation_id: str, round: int, survivors: tuple[int, ...],
                   dropouts: tuple[int, ...]) -> bytes:
    return identity.sign(survivors_bytes(federation_id, round, survivors, dropouts))


def verify_survivors(identity: Ed25519PublicKey, signature: bytes, federation_id: str, round: int, site_id: int,
                     survivors: tuple[int, ...], dropouts: tuple[int, ...]) -> None:
    """Raise :class:`SignatureError` unless site ``site_id`` signed exactly these survivor and dropout lists."""
    if len(signature) != SIGNATURE_LEN:
        raise SignatureError("survivor-list signature has the wrong size", round=round, site_id=site_id)
    try:
        identity.verify(signature, survivors_bytes(federation_id, round, survivors, dropouts))
    except InvalidSignature as exc:
        raise SignatureError("survivor lists are not signed by the site's identity key",
                             round=round, site_id=site_id) from exc
