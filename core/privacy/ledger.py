"""The site's privacy ledger: what this site has spent, per federation, on disk.

One JSON file per (state directory, federation) under `<state>/ledgers/`. It is
append-only: each `record_round` rewrites the file with the previous rounds plus
one, through a temporary file that is fsynced and renamed over the old one (then
the directory is fsynced), so after a crash the file holds either the old or the
new list, never a torn one. The entry is durable *before* `record_round` returns,
and the caller sends the update only after that: a crash can lose an update that
was never sent, never a spend that was.

A file that does not parse, fails its checksum or breaks the schema raises
`LedgerCorrupt`; training must stop there (a reset would silently return spent
budget). Before each round `check_round` projects ε after the round and raises
`BudgetExhausted` when it would pass the budget.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..atomic import atomic_write_bytes
from ..errors import FatalError, HemafedError
from ..paths import state_dir
from .accounting import Accountant, AccountantKind, check_kind

FORMAT = "hemafed-privacy-ledger"
VERSION = 1
LEDGER_DIR = "ledgers"


class LedgerError(HemafedError):
    """Base of the ledger's errors."""


class LedgerCorrupt(LedgerError, FatalError):
    """The ledger file is damaged or truncated; training must not continue."""


class LedgerMismatch(LedgerError, ValueError):
    """The ledger exists with a different budget, δ or accountant than asked for."""


class BudgetExhausted(LedgerError, FatalError):
    """The next round would take ε past the budget; nothing was recorded."""

    def __init__(self, federation_id: str, spent: float, projected: float, budget: float, delta: float) -> None:
        super().__init__(f"privacy budget exhausted for federation {federation_id!r}: ε after this round would be "
                         f"{projected:.4g} > budget {budget:.4g} (spent {spent:.4g}, δ={delta:g})")
        self.federation_id = federation_id
        self.spent = spent
        self.projected = projected
        self.budget = budget
        self.delta = delta


@dataclass(frozen=True)
class LedgerEntry:
    round: int
    sigma: float
    sample_rate: float
    steps: int
    delta: float
    epsilon: float  # cumulative ε after this round, at `delta`
    model_hash: str  # sha256 of the global model the round started from
    time: float  # Unix time the entry was written
    # What protects this site's records in this round (additive; ledgers written before these fields read
    # back as local Gaussian DP, which is what they recorded).
    dp_mode: str = "local"  # "local": this site added the full noise | "distributed": a share, see below
    mechanism: str = "gaussian"  # "gaussian" (σ w.r.t. C) | "skellam" (σ w.r.t. the integer Δ₂ below)
    l2_sensitivity: float = 0.0  # skellam: Δ₂ in ring units
    l1_sensitivity: float = 0.0  # skellam: Δ₁ in ring units
    threshold: int = 0  # distributed: t, the fewest survivors whose sum is ever unmasked
    colluders: int = 0  # distributed: c, shares discounted (each site knows its own)
    share_variance: float = 0.0  # distributed: Skellam variance this site added per coordinate (ring units)
    protection: str = ""  # one sentence for the operator: who the guarantee holds against, assuming what

    def accountant_entry(self) -> tuple:
        if self.mechanism == "skellam":
            return (self.sigma, self.sample_rate, self.steps, self.l2_sensitivity, self.l1_sensitivity)
        return (self.sigma, self.sample_rate, self.steps)


@dataclass(frozen=True)
class Protection:
    """What protects a round's release, as the ledger records it (default: local Gaussian DP)."""

    dp_mode: str = "local"
    mechanism: str = "gaussian"
    l2_sensitivity: float = 0.0
    l1_sensitivity: float = 0.0
    threshold: int = 0
    colluders: int = 0
    share_variance: float = 0.0
    protection: str = ("local DP: this site added the full Gaussian noise σ·C itself; the guarantee holds "
                       "against everyone who sees what it sent, trusting no one")

    @property
    def skellam(self) -> tuple[float, float] | None:
        return (self.l2_sensitivity, self.l1_sensitivity) if self.mechanism == "skellam" else None

    def fields(self) -> dict:
        return asdict(self)


def ledger_path(federation_id: str, state: str | os.PathLike[str] | None = None) -> Path:
    """Where the ledger of `federation_id` lives (a readable slug plus a hash, so distinct ids never collide)."""
    if not federation_id:
        raise ValueError("federation id must not be empty")
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", federation_id)[:48].strip("._") or "federation"
    digest = hashlib.sha256(federation_id.encode()).hexdigest()[:12]
    return state_dir(state) / LEDGER_DIR / f"{slug}-{digest}.json"


def _checksum(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _parse(path: Path, raw: bytes) -> dict:
    """The validated body of a ledger file, or `LedgerCorrupt`."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LedgerCorrupt(f"{path}: not a readable ledger ({exc}); refusing to continue") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise LedgerCorrupt(f"{path}: not a hemafed privacy ledger")
    if doc.get("version") != VERSION:
        raise LedgerCorrupt(f"{path}: unsupported ledger version {doc.get('version')!r}")
    body = doc.get("body")
    if not isinstance(body, dict) or doc.get("sha256") != _checksum(body):
        raise LedgerCorrupt(f"{path}: checksum mismatch (file damaged or edited)")
    try:
        check_kind(body["accountant"])
        budget, delta = float(body["budget_epsilon"]), float(body["delta"])
        if not (budget > 0 and 0 < delta < 1) or not isinstance(body["federation_id"], str):
            raise ValueError("bad budget, δ or federation id")
        entries = [LedgerEntry(**e) for e in body["rounds"]]
        for e in entries:
            if not (e.sigma > 0 and 0 < e.sample_rate <= 1 and e.steps >= 0 and math.isfinite(e.epsilon)):
                raise ValueError(f"bad entry {e}")
            if e.mechanism not in ("gaussian", "skellam") or e.dp_mode not in ("local", "distributed"):
                raise ValueError(f"unknown mechanism or DP mode in {e}")
            if e.mechanism == "skellam" and not (e.l2_sensitivity > 0 and e.l1_sensitivity > 0):
                raise ValueError(f"Skellam entry without sensitivities: {e}")
    except (KeyError, TypeError, ValueError) as exc:
        raise LedgerCorrupt(f"{path}: malformed ledger ({exc})") from exc
    body["rounds"] = entries
    return body


class PrivacyLedger:
    """The spend of one site in one federation, persisted in the site's state directory.

    Open with the budget the operator set; a new ledger is written at once so the
    budget is fixed from the first round. Reopening an existing ledger with a
    different budget, δ or accountant raises `LedgerMismatch` (pass None to take
    what is stored).
    """

    def __init__(self, federation_id: str, budget_epsilon: float | None = None, delta: float | None = None, *,
                 kind: AccountantKind | None = None, state: str | os.PathLike[str] | None = None) -> None:
        self.federation_id = federation_id
        self.path = ledger_path(federation_id, state)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._locked():
            if self.path.exists():
                self._load()
                for name, asked, stored in (("budget ε", budget_epsilon, self.budget_epsilon),
                                            ("δ", delta, self.delta), ("accountant", kind, self.kind)):
                    if asked is not None and asked != stored:
                        raise LedgerMismatch(f"ledger for {federation_id!r} has {name} {stored}, not {asked}")
                return
            if budget_epsilon is None or delta is None:
                raise FileNotFoundError(f"no ledger for federation {federation_id!r} in {self.path.parent}")
            if not (budget_epsilon > 0 and math.isfinite(budget_epsilon)) or not 0 < delta < 1:
                raise ValueError("budget ε must be positive and finite, δ in (0, 1)")
            self.budget_epsilon = float(budget_epsilon)
            self.delta = float(delta)
            self.kind: AccountantKind = kind or "rdp"
            check_kind(self.kind)
            self.created = time.time()
            self.entries: list[LedgerEntry] = []
            self._write()

    # -- reading -----------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self):
        """Serialise writers of this ledger (two site processes must not both append)."""
        with open(self.path.with_suffix(".lock"), "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _load(self) -> None:
        try:
            raw = self.path.read_bytes()
        except OSError as exc:
            raise LedgerCorrupt(f"{self.path}: cannot read ledger ({exc})") from exc
        body = _parse(self.path, raw)
        if body["federation_id"] != self.federation_id:
            raise LedgerCorrupt(f"{self.path}: belongs to federation {body['federation_id']!r}")
        self.budget_epsilon = float(body["budget_epsilon"])
        self.delta = float(body["delta"])
        self.kind = body["accountant"]
        self.created = float(body.get("created", 0.0))
        self.entries = body["rounds"]

    def accountant(self) -> Accountant:
        """A fresh accountant rebuilt from every recorded round."""
        return Accountant(self.kind, [e.accountant_entry() for e in self.entries])

    def spent_epsilon(self) -> float:
        """ε spent so far at the ledger's δ (recomputed from the history, not trusted from the file)."""
        return self.accountant().epsilon(self.delta)

    def remaining_epsilon(self) -> float:
        return max(0.0, self.budget_epsilon - self.spent_epsilon())

    @property
    def rounds(self) -> int:
        return len(self.entries)

    # -- the budget check and the append -------------------------------------------

    def check_round(self, sigma: float, sample_rate: float, steps: int, *,
                    skellam: tuple[float, float] | None = None) -> float:
        """ε after a round of `steps` steps at (σ, q) (Skellam noise with integer sensitivities (Δ₂, Δ₁) when
        `skellam` is given); raises `BudgetExhausted` if past the budget."""
        projected = self.accountant().projected_epsilon(sigma, sample_rate, steps, self.delta, skellam=skellam)
        if not projected <= self.budget_epsilon:
            raise BudgetExhausted(self.federation_id, self.spent_epsilon(), projected, self.budget_epsilon,
                                  self.delta)
        return projected

    def record_round(self, round: int, sigma: float, sample_rate: float, steps: int, model_hash: str, *,
                     protection: Protection | None = None) -> LedgerEntry:
        """Append a round and make it durable before returning; nothing is written if it would pass the budget.

        Call this after training and *before* the update leaves the site. Each call is
        a spend: a round number seen before (a retried round) is recorded again.
        `protection` (default: local Gaussian DP) says which mechanism and trust assumption apply.
        """
        protection = protection or Protection()
        with self._locked():
            # Another process may have appended since we loaded: the file is the truth.
            self._load()
            epsilon = self.check_round(sigma, sample_rate, steps, skellam=protection.skellam)
            entry = LedgerEntry(round=int(round), sigma=float(sigma), sample_rate=float(sample_rate),
                                steps=int(steps), delta=self.delta, epsilon=float(epsilon),
                                model_hash=str(model_hash), time=time.time(), **protection.fields())
            self.entries = [*self.entries, entry]
            try:
                self._write()
            except BaseException:
                self.entries = self.entries[:-1]
                raise
            return entry

    def _write(self) -> None:
        body = {
            "federation_id": self.federation_id,
            "budget_epsilon": self.budget_epsilon,
            "delta": self.delta,
            "accountant": self.kind,
            "created": self.created,
            "rounds": [asdict(e) for e in self.entries],
        }
        doc = {"format": FORMAT, "version": VERSION, "sha256": _checksum(body), "body": body}
        atomic_write_bytes(self.path, json.dumps(doc, indent=1).encode())
        # Temp files of writers killed mid-write are never read; we hold the lock, so
        # none of them belongs to a live writer.
        for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            with contextlib.suppress(OSError):
                stale.unlink()

    def summary(self) -> dict:
        return {
            "federation_id": self.federation_id,
            "path": str(self.path),
            "accountant": self.kind,
            "budget_epsilon": self.budget_epsilon,
            "delta": self.delta,
            "rounds": self.rounds,
            "steps": sum(e.steps for e in self.entries),
            "spent_epsilon": self.spent_epsilon(),
            "remaining_epsilon": self.remaining_epsilon(),
            "last_round": asdict(self.entries[-1]) if self.entries else None,
        }


def list_ledgers(state: str | os.PathLike[str] | None = None) -> list[dict]:
    """A summary per ledger in the state directory; a damaged one is listed with its `error`."""
    folder = state_dir(state) / LEDGER_DIR
    out: list[dict] = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            body = _parse(path, path.read_bytes())
            out.append(PrivacyLedger(body["federation_id"], state=state).summary())
        except (LedgerError, OSError) as exc:
            out.append({"path": str(path), "error": str(exc)})
    return out
