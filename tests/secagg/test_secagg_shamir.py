from __future__ import annotations

import contextlib
import itertools
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hemafed.core.secagg import shamir
from hemafed.core.secagg.errors import ShamirError


def _is_probable_prime(n: int) -> bool:
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37):
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def test_field_is_prime_and_holds_every_secret():
    assert _is_probable_prime(shamir.PRIME) and shamir.PRIME > 2**256


@settings(max_examples=30, deadline=None)
@given(secret=st.binary(min_size=32, max_size=32), n=st.integers(2, 12), data=st.data())
def test_any_t_shares_reconstruct(secret, n, data):
    t = data.draw(st.integers(1, n))
    shares = shamir.split(secret, t, range(1, n + 1))
    subset = data.draw(st.permutations(list(shares)))[:t]
    assert shamir.reconstruct({x: shares[x] for x in subset}, t) == secret


def test_fewer_than_t_shares_do_not_give_the_secret():
    secret = os.urandom(32)
    shares = shamir.split(secret, 3, range(1, 6))
    with pytest.raises(ShamirError):
        shamir.reconstruct({1: shares[1], 2: shares[2]}, 3)
    # interpolating t-1 shares as if t-1 were the threshold yields something else (with overwhelming probability)
    for pair in itertools.combinations(shares, 2):
        lams = shamir.lagrange_at_zero(list(pair))
        with contextlib.suppress(ShamirError):  # not even a 32-byte value
            assert shamir.combine([shares[x] for x in pair], lams) != secret


def test_extreme_secrets():
    for secret in (bytes(32), b"\xff" * 32):
        shares = shamir.split(secret, 4, [3, 9, 17, 40, 41])
        assert shamir.reconstruct(shares, 4) == secret


def test_bad_inputs():
    with pytest.raises(ShamirError):
        shamir.split(b"short", 2, [1, 2])
    with pytest.raises(ShamirError):
        shamir.split(bytes(32), 2, [1, 1])
    with pytest.raises(ShamirError):
        shamir.split(bytes(32), 2, [0, 1])
    with pytest.raises(ShamirError):
        shamir.split(bytes(32), 3, [1, 2])
    with pytest.raises(ShamirError):
        shamir.combine([b"\xff" * 33], [1])  # outside the field
    with pytest.raises(ShamirError):
        shamir.combine([b"\x00" * 32], [1])  # wrong size
