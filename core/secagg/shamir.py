"""Shamir t-of-n secret sharing of 32-byte secrets over the prime field GF(2^256 + 297).

The prime is the smallest above 2^256, so every 32-byte secret is a field element and a share's value fits
in 33 bytes. Share x-coordinates are the site ids (1..n); a polynomial of degree t-1 means any t shares
reconstruct the secret and any t-1 reveal nothing about it.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping, Sequence

from .errors import ShamirError

PRIME = 2**256 + 297
SECRET_LEN = 32
SHARE_LEN = 33


def split(secret: bytes, t: int, xs: Iterable[int]) -> dict[int, bytes]:
    """Shares ``{x: value}`` of ``secret`` for the given x-coordinates; any ``t`` of them reconstruct it."""
    if len(secret) != SECRET_LEN:
        raise ShamirError(f"secret must be {SECRET_LEN} bytes")
    xs = list(xs)
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ShamirError("share x-coordinates must be distinct and non-zero")
    if not 1 <= t <= len(xs):
        raise ShamirError(f"threshold {t} out of range for {len(xs)} shares")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(t - 1)]
    out = {}
    for x in xs:
        acc = 0
        for c in reversed(coeffs):  # Horner
            acc = (acc * x + c) % PRIME
        out[x] = acc.to_bytes(SHARE_LEN, "big")
    return out


def lagrange_at_zero(xs: Sequence[int]) -> list[int]:
    """Coefficients λ_j with f(0) = Σ λ_j f(x_j); computed once per set of responders, reused per secret."""
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ShamirError("share x-coordinates must be distinct and non-zero")
    lams = []
    for j, xj in enumerate(xs):
        num, den = 1, 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * xm % PRIME
                den = den * (xm - xj) % PRIME
        lams.append(num * pow(den, -1, PRIME) % PRIME)
    return lams


def combine(values: Sequence[bytes], lams: Sequence[int]) -> bytes:
    """The secret from share values in the order ``lams`` was computed for."""
    if len(values) != len(lams):
        raise ShamirError("one share value per coefficient")
    acc = 0
    for v, lam in zip(values, lams, strict=True):
        if len(v) != SHARE_LEN:
            raise ShamirError(f"share value must be {SHARE_LEN} bytes")
        y = int.from_bytes(v, "big")
        if y >= PRIME:
            raise ShamirError("share value outside the field")
        acc = (acc + lam * y) % PRIME
    if acc >= 2 ** (8 * SECRET_LEN):
        raise ShamirError("shares do not reconstruct a 32-byte secret")
    return acc.to_bytes(SECRET_LEN, "big")


def reconstruct(shares: Mapping[int, bytes], t: int) -> bytes:
    """The secret from at least ``t`` shares ``{x: value}`` (the first ``t`` by x are used)."""
    if len(shares) < t:
        raise ShamirError(f"{len(shares)} shares, {t} needed")
    xs = sorted(shares)[:t]
    return combine([shares[x] for x in xs], lagrange_at_zero(xs))
