"""The versioned message envelope: one WebSocket binary message each way.

Layout (all integers big-endian):

    u32 header_length | header (UTF-8 JSON object) | blob 0 | blob 1 | ...

    header = {"v": 1, "type": str, "round": int, "body": {...}, "blobs": [len0, len1, ...]}

The JSON header carries control data; blobs carry opaque bytes (encoded
secure-aggregation messages, float32 weights) so vectors never go through JSON
and nothing is ever unpickled. Decoding is strict: every field, type and size is
checked, and anything else raises `MalformedEnvelope` / `MessageTooLarge` before
the caller sees a byte of it.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hemafed.core.trust import strict_json
from hemafed.network.errors import MalformedEnvelope, MessageTooLarge

VERSION = 1
_PREFIX = struct.Struct(">I")
_TYPE_RE = re.compile(r"[a-z][a-z0-9_.-]{0,63}\Z")
_MAX_ROUND = 2**31 - 1
_HEADER_KEYS = frozenset({"v", "type", "round", "body", "blobs"})

# Types the transport itself uses; the round drivers use their own names.
HELLO = "hello"
AUTH = "auth"
WELCOME = "welcome"
ERROR = "error"


@dataclass(frozen=True)
class Limits:
    """Caps applied to every incoming message before it is parsed further."""

    max_message: int = 1 << 20
    max_header: int = 256 << 10
    max_blobs: int = 1024

    def __post_init__(self) -> None:
        if self.max_header < 64 or self.max_message < self.max_header + _PREFIX.size:
            raise ValueError("max_message must exceed max_header, which must be at least 64 bytes")
        if self.max_blobs < 0:
            raise ValueError("max_blobs must be >= 0")

    @classmethod
    def for_model(
        cls,
        n_params: int,
        *,
        bytes_per_param: int = 8,
        extra_values: int = 1024,
        max_sites: int = 100,
        per_site_bytes: int = 4096,
        max_header: int = 256 << 10,
        max_blobs: int = 1024,
    ) -> Limits:
        """Limits sized from the model: one vector of `n_params + extra_values`
        coordinates at `bytes_per_param` each (8 covers float64 and 64-bit masked
        ring elements; float32 weights need 4), plus `per_site_bytes` for every
        site's forwarded key material or shares, plus the header."""
        if n_params <= 0:
            raise ValueError("n_params must be positive")
        vector = (n_params + extra_values) * bytes_per_param
        return cls(
            max_message=_PREFIX.size + max_header + vector + max_sites * per_site_bytes,
            max_header=max_header,
            max_blobs=max_blobs,
        )


HANDSHAKE_LIMITS = Limits(max_message=16 << 10, max_header=8 << 10, max_blobs=0)
"""What an unauthenticated peer may send: enough for the handshake, nothing more."""


@dataclass(frozen=True)
class Envelope:
    """One message. `body` must be JSON-serialisable (no NaN/Infinity); `blobs` are opaque bytes."""

    type: str
    round: int = 0
    body: Mapping[str, Any] = field(default_factory=dict)
    blobs: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        # Catch mistakes at the sender, where the stack trace is useful.
        _check_type(self.type)
        _check_round(self.round)
        if not isinstance(self.body, Mapping):
            raise TypeError("body must be a mapping")
        if not isinstance(self.blobs, tuple):
            object.__setattr__(self, "blobs", tuple(self.blobs))
        for blob in self.blobs:
            if not isinstance(blob, bytes | bytearray | memoryview):
                raise TypeError("blobs must be bytes-like")

    def encode(self) -> bytes:
        header = {
            "v": VERSION,
            "type": self.type,
            "round": self.round,
            "body": dict(self.body),
            "blobs": [memoryview(b).nbytes for b in self.blobs],
        }
        raw = json.dumps(header, separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode()
        return b"".join([_PREFIX.pack(len(raw)), raw, *(bytes(b) for b in self.blobs)])

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview, limits: Limits) -> Envelope:
        """Parse and validate one message; raises `MalformedEnvelope` or `MessageTooLarge`."""
        if isinstance(data, str):
            raise MalformedEnvelope("text frame where a binary envelope was expected")
        view = memoryview(data)
        total = view.nbytes
        if total > limits.max_message:
            raise MessageTooLarge(f"message of {total} bytes over the limit of {limits.max_message}")
        if total < _PREFIX.size:
            raise MalformedEnvelope(f"message of {total} bytes is shorter than the length prefix")
        (hlen,) = _PREFIX.unpack_from(view, 0)
        if hlen > limits.max_header:
            raise MessageTooLarge(f"header of {hlen} bytes over the limit of {limits.max_header}")
        end = _PREFIX.size + hlen
        if end > total:
            raise MalformedEnvelope(f"header length {hlen} runs past the end of a {total}-byte message")
        header = _parse_header(bytes(view[_PREFIX.size : end]))

        lengths = header["blobs"]
        if len(lengths) > limits.max_blobs:
            raise MessageTooLarge(f"{len(lengths)} blobs over the limit of {limits.max_blobs}")
        if sum(lengths) != total - end:
            raise MalformedEnvelope(f"blob lengths sum to {sum(lengths)} but {total - end} bytes follow the header")
        blobs = []
        pos = end
        for n in lengths:
            blobs.append(bytes(view[pos : pos + n]))
            pos += n
        return cls(type=header["type"], round=header["round"], body=header["body"], blobs=tuple(blobs))


def error_envelope(code: str, message: str, round: int = 0) -> Envelope:
    return Envelope(ERROR, round, {"code": code, "message": message})


def _parse_header(raw: bytes) -> dict[str, Any]:
    try:
        header = strict_json.loads(raw)
    except strict_json.StrictJSONError as exc:
        raise MalformedEnvelope(f"header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise MalformedEnvelope("header is not a JSON object")
    if set(header) != _HEADER_KEYS:
        raise MalformedEnvelope(f"header keys {sorted(header)} != {sorted(_HEADER_KEYS)}")
    if header["v"] != VERSION or isinstance(header["v"], bool):
        raise MalformedEnvelope(f"unsupported envelope version {header['v']!r}")
    try:
        _check_type(header["type"])
        _check_round(header["round"])
    except (TypeError, ValueError) as exc:
        raise MalformedEnvelope(str(exc)) from None
    if not isinstance(header["body"], dict):
        raise MalformedEnvelope("body is not a JSON object")
    lengths = header["blobs"]
    if not isinstance(lengths, list) or not all(_is_int(n) and n >= 0 for n in lengths):
        raise MalformedEnvelope("blobs must be a list of non-negative integers")
    return header


def _check_type(value: object) -> None:
    if not isinstance(value, str) or not _TYPE_RE.match(value):
        raise ValueError(f"message type {value!r} is not a short lower-case name")


def _check_round(value: object) -> None:
    if not _is_int(value) or not 0 <= value <= _MAX_ROUND:  # type: ignore[operator]
        raise ValueError(f"round {value!r} is not an integer in [0, {_MAX_ROUND}]")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: object) -> bool:
    """For validators: a JSON number that is a real, finite value (not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
