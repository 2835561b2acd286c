"""JSON from a peer, parsed so that no value can hurt the code that reads it.

Python's `json.loads` accepts things no hemafed message ever holds and that break
the arithmetic downstream: integers with thousands of digits (Python's int-length
limit then raises a bare `ValueError`, and 10**400 overflows a float), `1e400`
(silently infinity), `NaN`/`Infinity` literals, duplicate keys (the last one wins,
so two readers can disagree), and nesting deep enough to exhaust the stack. Every
decoder of wire JSON (the envelope header, secure-aggregation headers) goes
through `loads`, which refuses all of these with one error type.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

from ..errors import HemafedError

# The largest integer any message holds is a 63-bit round number (19 digits).
MAX_INT_DIGITS = 20
MAX_FLOAT_CHARS = 40
MAX_DEPTH = 32


class StrictJSONError(HemafedError, ValueError):
    """The bytes are not JSON, or hold a value outside what strict parsing allows."""


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise StrictJSONError(f"integer of {len(text)} characters (at most {MAX_INT_DIGITS} digits)")
    return int(text)


def _float(text: str) -> float:
    if len(text) > MAX_FLOAT_CHARS:
        raise StrictJSONError(f"number of {len(text)} characters")
    value = float(text)
    if not math.isfinite(value):
        raise StrictJSONError(f"number {text[:20]} is not finite")
    return value


def _constant(name: str) -> float:
    raise StrictJSONError(f"{name} is not allowed")


def _no_duplicates(pairs: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise StrictJSONError(f"duplicate key {key[:40]!r}")
        out[key] = value
    return out


_STRING = re.compile(r'"(?:[^"\\]++|\\.)*+"', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")


def _depth_ok(raw: str) -> bool:
    """Nesting depth without recursing (the json module recurses once per level); C-speed scans."""
    depth = 0
    for ch in _BRACKETS.findall(_STRING.sub("", raw)):
        depth += 1 if ch in "[{" else -1
        if depth > MAX_DEPTH:
            return False
    return True


def loads(data: bytes | str) -> Any:
    """Parse `data` (UTF-8 bytes or text); raise `StrictJSONError` on anything doubtful."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes | bytearray) else data
    except UnicodeDecodeError as exc:
        raise StrictJSONError(f"not UTF-8: {exc.reason}") from None
    if not isinstance(text, str):
        raise StrictJSONError("JSON must be bytes or text")
    if not _depth_ok(text):
        raise StrictJSONError(f"nested deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_int=_int, parse_float=_float,
                          parse_constant=_constant)
    except StrictJSONError:
        raise
    except (json.JSONDecodeError, ValueError, RecursionError) as exc:
        raise StrictJSONError(f"not valid JSON: {str(exc)[:120]}") from None
