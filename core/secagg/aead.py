"""AES-GCM encryption of Shamir shares between two sites, relayed by the aggregator.

The associated data binds (round, sender, receiver); the plaintext repeats them and they are checked again
after decryption, so a relay cannot swap the envelope's ids, reflect a share back to its sender or replay it
in another round without being caught.
"""

from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import DecryptionError

NONCE_LEN = 12
TAG_LEN = 16
_AD = struct.Struct("<8sQII")  # domain tag, round, sender, receiver
_DOMAIN = b"hfsa-sh1"
_HEADER = struct.Struct("<QII")


def _ad(round: int, sender: int, receiver: int) -> bytes:
    return _AD.pack(_DOMAIN, round, sender, receiver)


def seal(key: bytes, round: int, sender: int, receiver: int, payload: bytes) -> bytes:
    """nonce | AES-GCM(key, header(round, sender, receiver) | payload, ad = the same ids)."""
    nonce = os.urandom(NONCE_LEN)  # a pair uses one key in both directions, so nonces must be random, not a counter
    plaintext = _HEADER.pack(round, sender, receiver) + payload
    return nonce + AESGCM(key).encrypt(nonce, plaintext, _ad(round, sender, receiver))


def open_(key: bytes, round: int, sender: int, receiver: int, ciphertext: bytes) -> bytes:
    """The payload, after checking the tag and the ids repeated inside."""
    if len(ciphertext) < NONCE_LEN + _HEADER.size + TAG_LEN:
        raise DecryptionError("encrypted share too short", round=round, site_id=sender)
    nonce, body = ciphertext[:NONCE_LEN], ciphertext[NONCE_LEN:]
    try:
        plaintext = AESGCM(key).decrypt(nonce, body, _ad(round, sender, receiver))
    except InvalidTag as exc:
        raise DecryptionError("encrypted share failed authentication", round=round, site_id=sender) from exc
    inner = _HEADER.unpack_from(plaintext)
    if inner != (round, sender, receiver):
        raise DecryptionError(f"share names {inner} inside but {(round, sender, receiver)} outside",
                              round=round, site_id=sender)
    return plaintext[_HEADER.size:]


def sealed_len(payload_len: int) -> int:
    return NONCE_LEN + _HEADER.size + payload_len + TAG_LEN
