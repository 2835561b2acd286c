from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hemafed.core.secagg import aead
from hemafed.core.secagg.errors import DecryptionError

KEY = os.urandom(32)


def test_round_trip():
    ct = aead.seal(KEY, 7, 1, 2, b"payload")
    assert len(ct) == aead.sealed_len(7)
    assert aead.open_(KEY, 7, 1, 2, ct) == b"payload"


@pytest.mark.parametrize("where", [(8, 1, 2), (7, 2, 1), (7, 1, 3), (7, 3, 2)])
def test_other_round_or_ids_fail(where):
    ct = aead.seal(KEY, 7, 1, 2, b"payload")
    with pytest.raises(DecryptionError):
        aead.open_(KEY, *where, ct)


def test_flipped_bit_and_wrong_key_fail():
    ct = bytearray(aead.seal(KEY, 7, 1, 2, b"payload"))
    ct[-1] ^= 1
    with pytest.raises(DecryptionError):
        aead.open_(KEY, 7, 1, 2, bytes(ct))
    with pytest.raises(DecryptionError):
        aead.open_(os.urandom(32), 7, 1, 2, aead.seal(KEY, 7, 1, 2, b"payload"))
    with pytest.raises(DecryptionError):
        aead.open_(KEY, 7, 1, 2, b"short")


def test_ids_inside_are_rechecked():
    # a sender that authenticates the envelope (7, 1, 2) but writes other ids inside is caught after decryption
    nonce = os.urandom(aead.NONCE_LEN)
    inner = aead._HEADER.pack(7, 2, 1) + b"payload"
    ct = nonce + AESGCM(KEY).encrypt(nonce, inner, aead._ad(7, 1, 2))
    with pytest.raises(DecryptionError, match="inside"):
        aead.open_(KEY, 7, 1, 2, ct)
