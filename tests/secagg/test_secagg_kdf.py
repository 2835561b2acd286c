from __future__ import annotations

import pytest

from hemafed.core.secagg import kdf
from hemafed.core.secagg.errors import AuthenticationError, MalformedMessage


def test_both_ends_derive_the_same_key_per_purpose():
    a_sk, a_pk = kdf.new_keypair()
    b_sk, b_pk = kdf.new_keypair()
    for purpose in kdf.Purpose:
        k_ab = kdf.derive_pair_key(a_sk, b_pk, purpose, "fed", 3, 1, 2)
        k_ba = kdf.derive_pair_key(b_sk, a_pk, purpose, "fed", 3, 2, 1)
        assert k_ab == k_ba and len(k_ab) == 32


def test_labels_rounds_pairs_and_federations_give_distinct_keys():
    a_sk, _ = kdf.new_keypair()
    _, b_pk = kdf.new_keypair()
    keys = {kdf.derive_pair_key(a_sk, b_pk, p, fed, r, 1, other)
            for p in kdf.Purpose for fed in ("fed", "feD") for r in (0, 1) for other in (2, 3)}
    assert len(keys) == 2 * 2 * 2 * len(kdf.Purpose)


def test_context_is_unambiguous():
    # the federation name is length-prefixed, so no (name, round) pair can collide with another
    assert kdf.context("ab", 1, 2, 3) != kdf.context("a", 1, 2, 3)
    assert kdf.context("f", 1, 3, 2) == kdf.context("f", 1, 2, 3)


def test_private_key_round_trip():
    sk, pk = kdf.new_keypair()
    assert kdf.public_bytes(kdf.private_from_bytes(kdf.private_bytes(sk))) == pk


def test_malformed_and_low_order_peer_keys_are_refused():
    sk, _ = kdf.new_keypair()
    with pytest.raises(MalformedMessage):
        kdf.agree(sk, b"\x01" * 31)
    with pytest.raises(AuthenticationError):
        kdf.agree(sk, bytes(32))  # the zero point: every shared secret would be all zeros
