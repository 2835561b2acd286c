"""Secure-aggregation messages: frozen dataclasses, and their versioned wire format.

Stage order (→ aggregator, ← site):

1. ``AdvertiseKeys``   site → aggregator  two X25519 public keys, signed by the site's identity key
2. ``KeyList``         aggregator → each site of U1: every advertisement received
3. ``EncryptedShares`` site → aggregator  one AES-GCM ciphertext per other site of U1
4. ``ShareDelivery``   aggregator → each site of U2: the ciphertexts addressed to it
5. ``MaskedInput``     site → aggregator  the masked uint32 vector
6. ``UnmaskRequest``   aggregator → each site of U3: survivors (U3) and dropouts (U2 \\ U3)
7. ``SurvivorSignature`` site → aggregator  its identity key's signature over those two lists
8. ``SignatureList``   aggregator → each signer (U4): every signature received, ≥ t of them
9. ``UnmaskShares``    site → aggregator  shares of survivors' self-mask seeds and dropouts' mask keys
   ``RoundAbandoned``  aggregator → sites, at any stage: forget the round

Wire format (never pickle)::

    b"HFSA" | u8 schema version | u32 LE header length | JSON header (UTF-8) | payload

The header is an object with ``type``, ``round`` and the message's fields; bytes travel as base64. Only
``MaskedInput`` has a payload: its vector as raw little-endian uint32 words, whose count is in the header.
:func:`decode` checks magic, version, type, the exact field set, every type, range and size, and raises
:class:`~.errors.MalformedMessage` (or :class:`~.errors.VectorLengthError`) on anything else.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import numpy as np

from ..trust import strict_json
from . import aead, shamir
from .errors import MalformedMessage, SecAggError, VectorLengthError
from .prg import RING_DTYPE
from .signing import SIGNATURE_LEN

SCHEMA_VERSION = 2  # 2: the consistency check (SurvivorSignature, SignatureList)
MAGIC = b"HFSA"
MAX_SITE_ID = 2**16
MAX_ROUND = 2**63 - 1
MAX_HEADER_BYTES = 16 * 2**20
MAX_REASON_LEN = 200
KEY_LEN = 32
SHARE_PAYLOAD_LEN = 2 * shamir.SHARE_LEN
CIPHERTEXT_LEN = aead.sealed_len(SHARE_PAYLOAD_LEN)
_PREAMBLE = struct.Struct("<4sBI")


@dataclass(frozen=True)
class AdvertiseKeys:
    """Site → aggregator: the round's public keys (c: share encryption, s: pairwise masks), signed."""

    type: ClassVar[str] = "secagg.advertise_keys"
    version: ClassVar[int] = SCHEMA_VERSION
    round: int
    site_id: int
    c_pk: bytes
    s_pk: bytes
    signature: bytes


@dataclass(frozen=True)
class KeyList:
    """Aggregator → every site of U1: all advertisements, so each site checks the signatures itself."""

    type: ClassVar[str] = "secagg.key_list"
    version: ClassVar[int] = SCHEMA_VERSION
    round: int
    adverts: tuple[AdvertiseKeys, ...]


@dataclass(frozen=True)
class EncryptedShares:
    """Site → aggregator: ``(receiver, ciphertext)`` for every other site of U1."""

    type: ClassVar[str] = "secagg.encrypted_shares"
    version: ClassVar[int] = SCHEMA_VERSION
    round: int
    site_id: int
    shares: tuple[tuple[int, bytes], ...]


@dataclass(frozen=True)
class ShareDelivery:
    """Aggregator → site ``site_id``: ``(sender, ciphertext)`` from every other site of U2."""

    type: ClassVar[str] = "secagg.share_delivery"
    version: ClassVar[int] = SCHEMA_VERSION
    round: int
    site_id: int
    shares: tuple[tuple[int, bytes], ...]


@dataclass(frozen=True, eq=False)
class MaskedInput:
    """Site → aggregator: the masked input, uint32 of length ``SecAggConfig.vector_len``."""

    type: ClassVar[str] = "secagg.masked_input"
    version: ClassVar[int] = SCHEMA_VERSION
    round: int
    site_id: int
    vector: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class UnmaskRequest:
    """Aggregator → every site of U3: who sent a masked input (survivors) and who did not (dropouts)."""

    type: ClassVar[str] = "secagg.unmask_request"
    version: ClassVar[int] = SCHEMA_VERSION
    round: int
    survivors: tuple[int, ...]
    dropouts: tuple[int, ...]


@dataclass(frozen=True)
class SurvivorSignature:
    """Site → aggregator: the site's identity-key signature over the survivor and dropout lists it was sent."""

    type: ClassVar[str] = "secagg.survivor_signature"
    version: ClassVar[int] = SCHEMA_VERSION
    round: int
    site_id: int
    signature: bytes


@dataclass(frozen=True)
class SignatureList:
    """Aggregator → every signer: the lists and ``(signer, signature)`` pairs; a site reveals shares only after
    checking that at least t sites signed the very lists it signed."""

    type: ClassVar[str] = "secagg.signature_list"
    version: ClassVar[int] = SCHEMA_VERSION
    round: int
    survivors: tuple[int, ...]
    dropouts: tuple[int, ...]
    signatures: tuple[tuple[int, bytes], ...]


@dataclass(frozen=True)
class UnmaskShares:
    """Site → aggregator: its share of each survivor's self-mask seed and of each dropout's mask key."""

    type: ClassVar[str] = "secagg.unmask_shares"
    version: ClassVar[int] = SCHEMA_VERSION
    round: int
    site_id: int
    self_mask_shares: tuple[tuple[int, bytes], ...]
    key_shares: tuple[tuple[int, bytes], ...]


@dataclass(frozen=True)
class RoundAbandoned:
    """Aggregator → sites: fewer than t sites remain; forget the round, reveal nothing more."""

    type: ClassVar[str] = "secagg.round_abandoned"
    version: ClassVar[int] = SCHEMA_VERSION
    round: int
    reason: str


Message = (AdvertiseKeys | KeyList | EncryptedShares | ShareDelivery | MaskedInput | UnmaskRequest
           | SurvivorSignature | SignatureList | UnmaskShares | RoundAbandoned)
MESSAGE_TYPES: dict[str, type] = {cls.type: cls for cls in (
    AdvertiseKeys, KeyList, EncryptedShares, ShareDelivery, MaskedInput, UnmaskRequest, SurvivorSignature,
    SignatureList, UnmaskShares, RoundAbandoned)}


# ---------------------------------------------------------------- validation (objects, whether decoded or built)

def _bad(detail: str, msg: Any = None) -> MalformedMessage:
    rnd = getattr(msg, "round", None)
    return MalformedMessage(detail, round=rnd if isinstance(rnd, int) else None)


def _int(v: Any, lo: int, hi: int, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise MalformedMessage(f"{what} must be an integer in {lo}..{hi}")
    return v


def _bytes(v: Any, lengths: range | int, what: str) -> bytes:
    ok = isinstance(v, bytes) and (len(v) == lengths if isinstance(lengths, int) else len(v) in lengths)
    if not ok:
        raise MalformedMessage(f"{what} must be bytes of length {lengths}")
    return v


def _ids(v: Any, what: str) -> tuple[int, ...]:
    if not isinstance(v, tuple) or len(v) > MAX_SITE_ID:
        raise MalformedMessage(f"{what} must be a tuple of site ids")
    for x in v:
        _int(x, 1, MAX_SITE_ID, what)
    if len(set(v)) != len(v):
        raise MalformedMessage(f"{what} repeats a site id")
    return v


def _pairs(v: Any, length: int, what: str) -> None:
    if not isinstance(v, tuple) or len(v) > MAX_SITE_ID:
        raise MalformedMessage(f"{what} must be a tuple of (site id, bytes) pairs")
    for p in v:
        if not isinstance(p, tuple) or len(p) != 2:
            raise MalformedMessage(f"{what} must hold (site id, bytes) pairs")
        _int(p[0], 1, MAX_SITE_ID, f"{what} site id")
        _bytes(p[1], length, what)
    if len({p[0] for p in v}) != len(v):
        raise MalformedMessage(f"{what} repeats a site id")


def validate(msg: Any, *, max_vector_len: int | None = None) -> Message:
    """Check a message object's field types, ranges and sizes; return it or raise MalformedMessage."""
    if type(msg) not in MESSAGE_TYPES.values():
        raise MalformedMessage(f"not a secure-aggregation message: {type(msg).__name__}")
    try:
        _int(msg.round, 0, MAX_ROUND, "round")
        if isinstance(msg, AdvertiseKeys):
            _int(msg.site_id, 1, MAX_SITE_ID, "site_id")
            _bytes(msg.c_pk, KEY_LEN, "c_pk")
            _bytes(msg.s_pk, KEY_LEN, "s_pk")
            _bytes(msg.signature, range(SIGNATURE_LEN + 1), "signature")  # a wrong size is a SignatureError later
        elif isinstance(msg, KeyList):
            if not isinstance(msg.adverts, tuple) or len(msg.adverts) > MAX_SITE_ID:
                raise MalformedMessage("adverts must be a tuple")
            for a in msg.adverts:
                if not isinstance(a, AdvertiseKeys):
                    raise MalformedMessage("adverts must hold AdvertiseKeys")
                validate(a)
                if a.round != msg.round:
                    raise MalformedMessage("an advert in the key list is for another round")
            _ids(tuple(a.site_id for a in msg.adverts), "adverts")
        elif isinstance(msg, EncryptedShares | ShareDelivery):
            _int(msg.site_id, 1, MAX_SITE_ID, "site_id")
            _pairs(msg.shares, CIPHERTEXT_LEN, "shares")
        elif isinstance(msg, MaskedInput):
            _int(msg.site_id, 1, MAX_SITE_ID, "site_id")
            v = msg.vector
            if not isinstance(v, np.ndarray) or v.dtype != RING_DTYPE or v.ndim != 1:
                raise VectorLengthError("masked vector must be a 1-D uint32 array", round=msg.round,
                                        site_id=msg.site_id)
            if max_vector_len is not None and len(v) > max_vector_len:
                raise VectorLengthError(f"masked vector longer than {max_vector_len}", round=msg.round,
                                        site_id=msg.site_id)
        elif isinstance(msg, UnmaskRequest):
            _ids(msg.survivors, "survivors")
            _ids(msg.dropouts, "dropouts")
        elif isinstance(msg, SurvivorSignature):
            _int(msg.site_id, 1, MAX_SITE_ID, "site_id")
            _bytes(msg.signature, range(SIGNATURE_LEN + 1), "signature")  # a wrong size is a SignatureError later
        elif isinstance(msg, SignatureList):
            _ids(msg.survivors, "survivors")
            _ids(msg.dropouts, "dropouts")
            _pairs(msg.signatures, SIGNATURE_LEN, "signatures")
        elif isinstance(msg, UnmaskShares):
            _int(msg.site_id, 1, MAX_SITE_ID, "site_id")
            _pairs(msg.self_mask_shares, shamir.SHARE_LEN, "self_mask_shares")
            _pairs(msg.key_shares, shamir.SHARE_LEN, "key_shares")
        elif isinstance(msg, RoundAbandoned) and (not isinstance(msg.reason, str)
                                                  or len(msg.reason) > MAX_REASON_LEN):
            raise MalformedMessage(f"reason must be a string of at most {MAX_REASON_LEN} characters")
    except SecAggError as exc:
        if exc.round is None and isinstance(msg.round, int) and not isinstance(msg.round, bool):
            exc.round = msg.round
        raise
    return msg


# ---------------------------------------------------------------- wire format

def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def _unb64(s: Any, what: str) -> bytes:
    if not isinstance(s, str):
        raise MalformedMessage(f"{what} must be base64 text")
    try:
        return base64.b64decode(s.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise MalformedMessage(f"{what} is not valid base64") from exc


def _advert_json(a: AdvertiseKeys) -> dict[str, Any]:
    return {"round": a.round, "site_id": a.site_id, "c_pk": _b64(a.c_pk), "s_pk": _b64(a.s_pk),
            "signature": _b64(a.signature)}


def encode(msg: Message) -> bytes:
    """The wire bytes of a (valid) message."""
    validate(msg)
    header: dict[str, Any] = {"type": msg.type, "round": msg.round}
    payload = b""
    if isinstance(msg, AdvertiseKeys):
        header.update(_advert_json(msg))
    elif isinstance(msg, KeyList):
        header["adverts"] = [_advert_json(a) for a in msg.adverts]
    elif isinstance(msg, EncryptedShares | ShareDelivery):
        header.update(site_id=msg.site_id, shares=[[i, _b64(c)] for i, c in msg.shares])
    elif isinstance(msg, MaskedInput):
        header.update(site_id=msg.site_id, vector_len=len(msg.vector))
        payload = np.ascontiguousarray(msg.vector, RING_DTYPE).tobytes()
    elif isinstance(msg, UnmaskRequest):
        header.update(survivors=list(msg.survivors), dropouts=list(msg.dropouts))
    elif isinstance(msg, SurvivorSignature):
        header.update(site_id=msg.site_id, signature=_b64(msg.signature))
    elif isinstance(msg, SignatureList):
        header.update(survivors=list(msg.survivors), dropouts=list(msg.dropouts),
                      signatures=[[i, _b64(s)] for i, s in msg.signatures])
    elif isinstance(msg, UnmaskShares):
        header.update(site_id=msg.site_id, self_mask_shares=[[i, _b64(s)] for i, s in msg.self_mask_shares],
                      key_shares=[[i, _b64(s)] for i, s in msg.key_shares])
    elif isinstance(msg, RoundAbandoned):
        header["reason"] = msg.reason
    head = json.dumps(header, separators=(",", ":")).encode()
    return _PREAMBLE.pack(MAGIC, SCHEMA_VERSION, len(head)) + head + payload


def _fields(h: dict[str, Any], cls: type, extra: tuple[str, ...] = ()) -> None:
    want = {"type"} | {f.name for f in fields(cls)} | set(extra)
    if isinstance(cls, type) and cls is MaskedInput:
        want = (want - {"vector"}) | {"vector_len"}
    if set(h) != want:
        raise MalformedMessage(f"{cls.type} header fields {sorted(h)} differ from {sorted(want)}")


def _pair_list(v: Any, what: str) -> tuple[tuple[int, bytes], ...]:
    if not isinstance(v, list) or len(v) > MAX_SITE_ID:
        raise MalformedMessage(f"{what} must be a list")
    out = []
    for p in v:
        if not isinstance(p, list) or len(p) != 2:
            raise MalformedMessage(f"{what} must hold [site id, base64] pairs")
        out.append((p[0], _unb64(p[1], what)))
    return tuple(out)


def _id_list(v: Any, what: str) -> tuple[int, ...]:
    if not isinstance(v, list) or len(v) > MAX_SITE_ID:
        raise MalformedMessage(f"{what} must be a list of site ids")
    return tuple(v)


def _advert_from(h: Any) -> AdvertiseKeys:
    if not isinstance(h, dict) or set(h) != {"round", "site_id", "c_pk", "s_pk", "signature"}:
        raise MalformedMessage("malformed advert")
    return AdvertiseKeys(round=h["round"], site_id=h["site_id"], c_pk=_unb64(h["c_pk"], "c_pk"),
                         s_pk=_unb64(h["s_pk"], "s_pk"), signature=_unb64(h["signature"], "signature"))


def peek_type(data: bytes) -> str:
    """The message type named in the header of wire bytes this end wrote (e.g. "secagg.masked_input"), without
    decoding the rest: how a site's outbound log names what it sends. "secagg.?" when the header is unreadable."""
    try:
        magic, _version, head_len = _PREAMBLE.unpack_from(data)
        if magic != MAGIC or head_len > MAX_HEADER_BYTES:
            return "secagg.?"
        kind = json.loads(bytes(data[_PREAMBLE.size:_PREAMBLE.size + head_len])).get("type")
    except (struct.error, ValueError, AttributeError):
        return "secagg.?"
    return kind if isinstance(kind, str) and kind in MESSAGE_TYPES else "secagg.?"


def decode(data: bytes, *, max_vector_len: int | None) -> Message:
    """Parse and validate wire bytes. ``max_vector_len`` caps a masked vector before any memory is used for it."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedMessage("message must be bytes")
    data = bytes(data)
    if len(data) < _PREAMBLE.size:
        raise MalformedMessage("message shorter than its preamble")
    magic, version, head_len = _PREAMBLE.unpack_from(data)
    if magic != MAGIC:
        raise MalformedMessage("not a secure-aggregation message (bad magic)")
    if version != SCHEMA_VERSION:
        raise MalformedMessage(f"schema version {version} not supported (this end speaks {SCHEMA_VERSION})")
    if head_len > MAX_HEADER_BYTES or _PREAMBLE.size + head_len > len(data):
        raise MalformedMessage("header length out of range")
    try:
        # Strict: an integer of thousands of digits, 1e400 or NaN is refused here, as a MalformedMessage.
        h = strict_json.loads(data[_PREAMBLE.size:_PREAMBLE.size + head_len])
    except strict_json.StrictJSONError as exc:
        raise MalformedMessage(f"header is not strict JSON: {exc}") from None
    if not isinstance(h, dict) or not isinstance(h.get("type"), str):
        raise MalformedMessage("header must be an object with a type")
    cls = MESSAGE_TYPES.get(h["type"])
    if cls is None:
        raise MalformedMessage(f"unknown message type {h['type'][:40]!r}")
    _fields(h, cls)
    _int(h["round"], 0, MAX_ROUND, "round")
    payload = data[_PREAMBLE.size + head_len:]
    msg: Message
    if cls is MaskedInput:
        n = _int(h["vector_len"], 0, 2**31, "vector_len")
        if max_vector_len is not None and n > max_vector_len:
            raise VectorLengthError(f"masked vector of {n} words exceeds {max_vector_len}", round=h["round"])
        if len(payload) != 4 * n:
            raise VectorLengthError(f"payload holds {len(payload)} bytes, header says {n} words", round=h["round"])
        msg = MaskedInput(round=h["round"], site_id=h["site_id"], vector=np.frombuffer(payload, RING_DTYPE))
    else:
        if payload:
            raise MalformedMessage(f"{cls.type} carries no payload", round=h["round"])
        if cls is AdvertiseKeys:
            msg = _advert_from({k: v for k, v in h.items() if k != "type"})
        elif cls is KeyList:
            if not isinstance(h["adverts"], list) or len(h["adverts"]) > MAX_SITE_ID:
                raise MalformedMessage("adverts must be a list", round=h["round"])
            msg = KeyList(round=h["round"], adverts=tuple(_advert_from(a) for a in h["adverts"]))
        elif cls in (EncryptedShares, ShareDelivery):
            msg = cls(round=h["round"], site_id=h["site_id"], shares=_pair_list(h["shares"], "shares"))
        elif cls is UnmaskRequest:
            msg = UnmaskRequest(round=h["round"], survivors=_id_list(h["survivors"], "survivors"),
                                dropouts=_id_list(h["dropouts"], "dropouts"))
        elif cls is SurvivorSignature:
            msg = SurvivorSignature(round=h["round"], site_id=h["site_id"], signature=_unb64(h["signature"],
                                                                                             "signature"))
        elif cls is SignatureList:
            msg = SignatureList(round=h["round"], survivors=_id_list(h["survivors"], "survivors"),
                                dropouts=_id_list(h["dropouts"], "dropouts"),
                                signatures=_pair_list(h["signatures"], "signatures"))
        elif cls is UnmaskShares:
            msg = UnmaskShares(round=h["round"], site_id=h["site_id"],
                               self_mask_shares=_pair_list(h["self_mask_shares"], "self_mask_shares"),
                               key_shares=_pair_list(h["key_shares"], "key_shares"))
        else:
            msg = RoundAbandoned(round=h["round"], reason=h["reason"])
    return validate(msg, max_vector_len=max_vector_len)
