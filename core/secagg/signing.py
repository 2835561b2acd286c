"""Ed25519 signatures over a site's advertised round keys, made with its long-term identity key.

The signed bytes name the federation, the round and the site id, so an advertisement cannot be replayed
in another round or federation nor claimed by another site.
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import SignatureError

SIGNATURE_LEN = 64
_DOMAIN = b"hemafed/secagg/v1/advertise-keys\x00"


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
