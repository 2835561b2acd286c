"""Mask PRG: expand a 32-byte key into a uint32 vector from the AES-256-CTR keystream of ``cryptography``.

The keystream is written straight into numpy memory (``update_into`` on a zero chunk), so expanding a mask
costs the cipher and little else. Keys come from HKDF with a purpose label (see :mod:`.kdf`) and are used
for exactly one stream, so a fixed all-zero initial counter block is safe. Every uint32 value, 2^32-1
included, is equally likely (unlike a Mersenne-Twister ``randint(0, m-1)``).
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .errors import ConfigError

RING_DTYPE = np.dtype("<u4")
_CHUNK_BYTES = 1 << 18  # a chunk stays in L2 between writing the keystream and adding it; fewer calls than 64 KiB
_ZERO = memoryview(bytes(_CHUNK_BYTES))
_IV = bytes(16)


def _encryptor(key: bytes):
    if len(key) != 32:
        raise ConfigError("PRG key must be 32 bytes")
    return Cipher(algorithms.AES(key), modes.CTR(_IV)).encryptor()


def expand(key: bytes, n: int) -> np.ndarray:
    """``n`` uint32 words of keystream."""
    out = np.empty(n, dtype=RING_DTYPE)
    mv = memoryview(out.view(np.uint8))
    enc = _encryptor(key)
    nbytes = 4 * n
    for i in range(0, nbytes, _CHUNK_BYTES):
        m = min(_CHUNK_BYTES, nbytes - i)
        enc.update_into(_ZERO[:m], mv[i:i + m])
    return out


def apply_mask(acc: np.ndarray, key: bytes, sign: int) -> None:
    """``acc += sign * expand(key, len(acc))`` modulo 2^32, in place, one cache-sized chunk at a time."""
    if acc.dtype != RING_DTYPE or acc.ndim != 1 or not acc.flags.c_contiguous:
        raise ConfigError("accumulator must be a contiguous 1-D little-endian uint32 array")
    if sign not in (1, -1):
        raise ConfigError("sign must be +1 or -1")
    op = np.add if sign == 1 else np.subtract
    enc = _encryptor(key)
    scratch = np.empty(_CHUNK_BYTES // 4, dtype=RING_DTYPE)
    smv = memoryview(scratch.view(np.uint8))
    n = len(acc)
    step = _CHUNK_BYTES // 4
    for i in range(0, n, step):
        k = min(step, n - i)
        enc.update_into(_ZERO[:4 * k], smv[:4 * k])
        part = acc[i:i + k]
        op(part, scratch[:k], out=part)


def keystream_bytes(key: bytes, nbytes: int) -> bytes:
    """The raw keystream as bytes: the cipher's own speed, the benchmark's yardstick."""
    return _encryptor(key).update(bytes(nbytes))
