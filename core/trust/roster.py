"""A federation's roster: the identity keys of the sites allowed in its rounds, pinned at
each site, so a compromised aggregator cannot hand a site public keys of its own making.

The aggregator tells each site who takes part in a round (site ids and identity keys);
secure aggregation is only as good as that list. A site that pins a roster refuses any
round whose participant list holds a key not on it. Two ways to pin:

1. **A signed roster file** (`roster.json`): the federation's admin lists the sites' public
   keys and signs the list with a *federation key* kept off the aggregator host
   (`hemafed roster sign`). Each site configures the file and the federation key's
   public line (`roster`, `roster_key` in site.toml) — the key is read out by phone once,
   like a site's fingerprint.
2. **Fingerprints in site.toml** (`peers = ["SHA256:…", …]`): each hospital lists its
   peers itself; no federation key needed, but every site edits its file when a site joins.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..atomic import atomic_write_bytes
from ..errors import FatalError
from .identity import IdentityError, IdentityKey, allowed_sites, fingerprint, parse_public_line, verify

ROSTER_FORMAT = "hemafed-roster/1"
_DOMAIN = b"hemafed/roster/v1\x00"


class RosterError(FatalError):
    """The roster is missing, malformed, for another federation, or not signed by the federation key."""

    what_to_do = ("Ask the federation's admin for the current roster.json and confirm the federation key "
                  "(roster_key in site.toml) by phone.")


@dataclass(frozen=True)
class Roster:
    """The identity keys (as fingerprints) a site accepts as peers. A container of raw 32-byte keys."""

    fingerprints: frozenset[str]
    federation_id: str | None = None
    source: str = ""

    def __contains__(self, raw: object) -> bool:
        return isinstance(raw, bytes) and len(raw) == 32 and fingerprint(raw) in self.fingerprints

    def allows(self, key: Ed25519PublicKey) -> bool:
        return fingerprint(key) in self.fingerprints

    def __len__(self) -> int:
        return len(self.fingerprints)


def _payload(federation_id: str, sites: Mapping[str, str], issued: int) -> bytes:
    body = {"format": ROSTER_FORMAT, "federation_id": federation_id, "issued": issued,
            "sites": dict(sorted(sites.items()))}
    return _DOMAIN + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def sign_roster(admin: IdentityKey, federation_id: str, sites: Mapping[str, str],
                issued: int | None = None) -> dict[str, Any]:
    """The roster file's contents: the sites' public-key lines, signed with the federation key."""
    allowed_sites(sites)  # refuses bad names and a key listed twice
    issued = int(time.time()) if issued is None else issued
    sig = admin.sign(_payload(federation_id, sites, issued))
    return {"format": ROSTER_FORMAT, "federation_id": federation_id, "issued": issued, "sites": dict(sites),
            "signature": base64.b64encode(sig).decode()}


def write_roster(path: str | Path, admin: IdentityKey, federation_id: str, sites: Mapping[str, str]) -> Path:
    path = Path(path)
    data = sign_roster(admin, federation_id, sites)
    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode(), mode=0o644)
    return path


def load_signed_roster(path: str | Path, federation_key: str, federation_id: str | None = None) -> Roster:
    """Read and verify a roster file against the federation key's public line."""
    try:
        key = parse_public_line(federation_key)
    except IdentityError as exc:
        raise RosterError(f"roster_key is not a valid public-key line: {exc}") from exc
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RosterError(f"cannot read the roster {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != ROSTER_FORMAT:
        raise RosterError(f"{path} is not a hemafed roster ({ROSTER_FORMAT})")
    fed, sites, issued, sig = (data.get(k) for k in ("federation_id", "sites", "issued", "signature"))
    if not isinstance(fed, str) or not isinstance(sites, dict) or not isinstance(issued, int) \
            or not isinstance(sig, str) or not all(isinstance(v, str) for v in sites.values()):
        raise RosterError(f"{path} is malformed")
    try:
        signature = base64.b64decode(sig, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RosterError(f"{path}: the signature is not base64") from exc
    if not verify(key, signature, _payload(fed, sites, issued)):
        raise RosterError(f"{path} is not signed by the configured federation key (or was altered)")
    if federation_id is not None and fed != federation_id:
        raise RosterError(f"{path} is the roster of federation {fed!r}, not {federation_id!r}")
    try:
        raw = allowed_sites(sites)
    except IdentityError as exc:
        raise RosterError(f"{path}: {exc}") from exc
    return Roster(frozenset(fingerprint(k) for k in raw), fed, str(path))


def roster_from_fingerprints(entries: Iterable[str]) -> Roster:
    """Peers listed in site.toml: `SHA256:…` fingerprints or full `hemafed-ed25519 …` lines."""
    fps = set()
    for entry in entries:
        if not isinstance(entry, str):
            raise RosterError("peers must be a list of fingerprints or public-key lines")
        text = entry.strip()
        if text.startswith("SHA256:") and len(text) == 50:
            fps.add(text)
            continue
        try:
            fps.add(fingerprint(parse_public_line(text)))
        except IdentityError as exc:
            raise RosterError(f"peers entry {text[:60]!r} is neither a SHA256: fingerprint nor a key line") from exc
    if not fps:
        raise RosterError("peers is empty: list every site of the federation, this one included")
    return Roster(frozenset(fps), None, "site.toml peers")
