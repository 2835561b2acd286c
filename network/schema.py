"""The one declared schema of every round message, checked at the edge.

`Envelope.decode` checks framing (sizes, strict JSON, header keys); this module
checks what a message *says*: for each message type, the exact body fields with
their types, ranges, lengths and allowed strings, and the count and sizes of the
blobs. Numbers that drive arithmetic come with bounds from the plan (`Bounds`): a
site's weight is at most `plan.max_weight`, a vector has exactly the model's
length, a secure-aggregation blob at most what the plan's site count can need.

A message that does not fit raises `MalformedEnvelope` (code ``malformed``), which
the transport turns into an `error` envelope and a close of *that* peer's
connection; no driver code sees it. Wrong type / round / stage for the moment is
the driver's `UnexpectedMessage` (see `protocol.SiteMessageValidator`).

`safe_text` is how peer-supplied text (a site's refusal reasons, a decline reason)
is made safe to print: control and format characters escaped, length capped, so a
peer cannot forge log lines or reorder a terminal.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hemafed.core.trust.text import safe_text
from hemafed.network.errors import MalformedEnvelope

__all__ = ["SafeLogFilter", "safe_text"]  # safe_text lives in core.text; re-exported for the transport

MAX_SITE_ID = 2**16
MAX_ROUND = 2**31 - 1
MAX_TEXT = 500


# ---------------------------------------------------------------- text


class SafeLogFilter(logging.Filter):
    """Escapes control characters in every record of the logger it is attached to.

    The second line of defence: peer text is passed through `safe_text` where it is
    logged, and this filter makes sure no record of the transport or the aggregator
    can hold a raw newline or terminal escape whatever its arguments were.
    Tracebacks (`exc_info`) are formatted later and are left as they are."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not lose the record
            message = f"{record.msg!r} {record.args!r}"
        record.msg = safe_text(message, 8000, escape_backslash=False)
        record.args = None
        return True


# ---------------------------------------------------------------- field specs


class Spec:
    """One field's rule; `check` returns the value (normalised) or raises `MalformedEnvelope`."""

    def check(self, value: Any, where: str) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class Int(Spec):
    lo: int
    hi: int

    def check(self, value: Any, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise MalformedEnvelope(f"{where} must be an integer")
        if not self.lo <= value <= self.hi:
            raise MalformedEnvelope(f"{where} must be in [{self.lo}, {self.hi}]")
        return value


@dataclass(frozen=True)
class Float(Spec):
    lo: float
    hi: float

    def check(self, value: Any, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise MalformedEnvelope(f"{where} must be a number")
        if isinstance(value, int) and abs(value) > 2**53:
            raise MalformedEnvelope(f"{where} is out of range")
        value = float(value)
        if not math.isfinite(value) or not self.lo <= value <= self.hi:
            raise MalformedEnvelope(f"{where} must be a finite number in [{self.lo:g}, {self.hi:g}]")
        return value


@dataclass(frozen=True)
class Bool(Spec):
    def check(self, value: Any, where: str) -> bool:
        if not isinstance(value, bool):
            raise MalformedEnvelope(f"{where} must be true or false")
        return value


@dataclass(frozen=True)
class Str(Spec):
    max_len: int = MAX_TEXT
    pattern: str | None = None
    choices: frozenset[str] | None = None

    def check(self, value: Any, where: str) -> str:
        if not isinstance(value, str):
            raise MalformedEnvelope(f"{where} must be text")
        if len(value) > self.max_len:
            raise MalformedEnvelope(f"{where} is longer than {self.max_len} characters")
        if self.choices is not None and value not in self.choices:
            raise MalformedEnvelope(f"{where} is not one of the allowed values")
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            raise MalformedEnvelope(f"{where} has the wrong form")
        return value


@dataclass(frozen=True)
class Nullable(Spec):
    inner: Spec

    def check(self, value: Any, where: str) -> Any:
        return None if value is None else self.inner.check(value, where)


@dataclass(frozen=True)
class List(Spec):
    item: Spec
    max_len: int
    min_len: int = 0

    def check(self, value: Any, where: str) -> list[Any]:
        if not isinstance(value, list):
            raise MalformedEnvelope(f"{where} must be a list")
        if not self.min_len <= len(value) <= self.max_len:
            raise MalformedEnvelope(f"{where} must hold {self.min_len}..{self.max_len} items")
        return [self.item.check(v, f"{where}[{i}]") for i, v in enumerate(value)]


@dataclass(frozen=True)
class Map(Spec):
    """An object with free keys (each matching `key`) and values of one kind."""

    key: Str
    value: Spec
    max_len: int

    def check(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise MalformedEnvelope(f"{where} must be an object")
        if len(value) > self.max_len:
            raise MalformedEnvelope(f"{where} holds more than {self.max_len} entries")
        return {self.key.check(k, f"{where} key"): self.value.check(v, f"{where}.{safe_text(k, 40)}")
                for k, v in value.items()}


@dataclass(frozen=True)
class Obj(Spec):
    """An object with exactly the `required` keys, plus any of the `optional` ones, nothing else."""

    required: Mapping[str, Spec] = field(default_factory=dict)
    optional: Mapping[str, Spec] = field(default_factory=dict)

    def check(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise MalformedEnvelope(f"{where} must be an object")
        keys = set(value)
        missing = set(self.required) - keys
        unknown = keys - set(self.required) - set(self.optional)
        if missing or unknown:
            raise MalformedEnvelope(f"{where}: missing {sorted(missing)}, unknown "
                                   f"{[safe_text(k, 40) for k in sorted(unknown)][:5]}")
        specs = {**self.optional, **self.required}
        return {k: specs[k].check(v, f"{where}.{k}") for k, v in value.items()}


# ---------------------------------------------------------------- message schemas


@dataclass(frozen=True)
class MessageSchema:
    """A message type: its body, and its blobs (exact sizes; `None` for "at most max_blob")."""

    body: Obj
    blobs: tuple[int | None, ...] = ()
    max_blob: int = 0

    def check(self, kind: str, body: Any, blobs: tuple[bytes, ...]) -> dict[str, Any]:
        checked = self.body.check(body, kind)
        if len(blobs) != len(self.blobs):
            raise MalformedEnvelope(f"{kind} carries {len(blobs)} blobs, expected {len(self.blobs)}")
        for i, (blob, size) in enumerate(zip(blobs, self.blobs, strict=True)):
            n = len(blob)
            if (size is not None and n != size) or (size is None and not 0 < n <= self.max_blob):
                raise MalformedEnvelope(f"{kind} blob {i} of {n} bytes, expected "
                                       f"{size if size is not None else f'1..{self.max_blob}'}")
        return checked


@dataclass(frozen=True)
class Bounds:
    """What the plan allows; every number a peer sends that drives arithmetic is checked against it."""

    dim: int  # model parameters
    n_classes: int
    max_weight: int  # the largest sample count a site may report (plan.max_weight)
    max_sites: int
    max_secagg_bytes: int

    @property
    def n_extras(self) -> int:
        return self.n_classes * self.n_classes


DIGEST = Str(64, pattern=r"[0-9a-f]{16,64}")
REASON = Str(MAX_TEXT)
KEY_LINE = Str(300, pattern=r"hemafed-ed25519 [A-Za-z0-9+/=]{40,64}( [^\x00-\x1f\x7f]*)?")
SITE_ID_KEY = Str(6, pattern=r"[1-9][0-9]{0,5}")


def site_schemas(b: Bounds) -> dict[str, MessageSchema]:
    """Site → aggregator."""
    return {
        "plan_accept": MessageSchema(Obj({"digest": DIGEST})),
        # progress while a site computes its images' features: images done of images in all, seconds left
        "preparing": MessageSchema(Obj({"done": Int(0, 2**31 - 1), "total": Int(0, 2**31 - 1)},
                                       {"eta_s": Float(0.0, 1e7)})),
        "plan_reject": MessageSchema(Obj({"reasons": List(REASON, 50)}, {"digest": DIGEST})),
        "decline": MessageSchema(Obj({"reason": REASON})),
        "secagg": MessageSchema(Obj(), (None,), max_blob=b.max_secagg_bytes),
        # weight: the site's sample count, which scales its update in the average.
        "plain_update": MessageSchema(Obj({"weight": Int(0, b.max_weight)}), (4 * b.dim, 8 * b.n_extras)),
    }


_PLAN_INT = Int(0, 2**31 - 1)
_PLAN_POS = Float(0.0, 1e9)
PLAN = Obj(optional={
    "federation_id": Str(64), "model": Str(64), "input_size": Int(1, 4096),
    "classes": List(Str(64), 1000), "rounds": Int(1, 1_000_000), "local_epochs": Int(1, 10_000),
    "batch_size": Int(1, 1 << 20), "lr": _PLAN_POS, "momentum": Float(0.0, 1.0), "clip_norm": _PLAN_POS,
    "update_clip": _PLAN_POS, "max_weight": Int(1, 2**40), "delta": Float(0.0, 1.0), "dp": Bool(),
    "secagg": Bool(), "threshold": Int(0, MAX_SITE_ID), "min_sites": Int(1, MAX_SITE_ID),
    "max_sites": Int(1, MAX_SITE_ID), "server_optimizer": Str(32), "server_lr": _PLAN_POS,
    "val_fraction": Float(0.0, 1.0), "train_timeout_s": _PLAN_POS, "stage_timeout_s": _PLAN_POS,
    "join_timeout_s": _PLAN_POS, "prepare_timeout_s": _PLAN_POS, "seed": _PLAN_INT,
    "algorithm": Str(16, choices=frozenset({"fedavg", "fedsgd"})), "sample_rate": Float(0.0, 1.0),
    "dp_mode": Str(16, choices=frozenset({"local", "distributed"})), "dp_colluders": Int(0, MAX_SITE_ID),
    "noise_multiplier": Float(0.0, 1e9), "ema": Float(0.0, 1.0), "center_rounds": Int(1, 1_000_000),
})
"""The plan's field types and outer ranges; `FederationPlan.from_dict` then checks its consistency."""


def aggregator_schemas(dim: int | None = None, n_extras: int | None = None,
                       max_secagg_bytes: int = 1 << 30) -> dict[str, MessageSchema]:
    """Aggregator → site. `dim`/`n_extras` are known once the plan is (None: any length, checked later)."""
    weights = 4 * dim if dim is not None else None
    return {
        "plan": MessageSchema(Obj({"plan": PLAN, "digest": DIGEST, "site_id": Int(1, MAX_SITE_ID)})),
        "round_start": MessageSchema(Obj({"participants": Map(SITE_ID_KEY, KEY_LINE, MAX_SITE_ID)}), (weights,),
                                     max_blob=max_secagg_bytes),
        "secagg": MessageSchema(Obj(), (None,), max_blob=max_secagg_bytes),
        "round_end": MessageSchema(Obj({"status": Str(16, choices=frozenset({"completed", "abandoned"}))},
                                       {"fed_val_accuracy": Nullable(Float(0.0, 1.0))})),
        "done": MessageSchema(Obj({}, {"temperature": Float(0.05, 20.0), "not_a_cell_threshold": Float(1.0, 1e7),
                                        "validation_classes": List(Int(0, 1 << 40), 1000)}),
                              (weights,), max_blob=max_secagg_bytes),
        "status": MessageSchema(Obj({"rounds": Int(1, 1_000_000), "participants": Int(0, MAX_SITE_ID),
                                     "reason": Str(16, choices=frozenset({"preparing", "not_ready"}))})),
        "finished": MessageSchema(Obj({"rounds": Int(1, 1_000_000), "completed": Int(0, 1_000_000)})),
        "error": MessageSchema(Obj({"code": Str(32, pattern=r"[a-z_]{1,32}"), "message": REASON})),
    }


def check_body(schemas: Mapping[str, MessageSchema], kind: str, body: Any, blobs: tuple[bytes, ...]) -> dict[str, Any]:
    """Check one message against its schema; an unknown type is malformed too."""
    schema = schemas.get(kind)
    if schema is None:
        raise MalformedEnvelope(f"unknown message type {safe_text(kind, 40)}")
    return schema.check(kind, body, blobs)
