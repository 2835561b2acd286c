"""The site's privacy ledger: what this site has spent, per federation, in the site's store.

Rows live in `<state>/site.sqlite` (`core.privacy.store`): one row per federation with its budget, δ
and accountant, and one append-only row per round. `record_round` checks the budget and appends the
round in one transaction that is durable when it returns; the caller sends the update only after
that, so a crash can lose an update that was never sent, never a spend that was.

Every row carries a hash chained over the rows before it (and the ledger's terms), all checked whenever a
ledger is opened (every site start, `hemafed ledger`, the app); before each write the ledger checks that the
terms, the number of rows and the last row are still what it read. A changed, removed or reordered row — by
a disk fault or a casual hand edit — raises `LedgerCorrupt`, and training must stop there (a reset would
silently return spent budget). This
guards against accidents, not against the machine's owner, who could rewrite the whole chain (and
would only deceive themselves about their own patients' privacy).

A round that runs twice (the aggregator restarted and re-ran it) is a second spend: it is recorded
as attempt 2 of that round, never overwritten and never merged.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..errors import FatalError, HemafedError
from ..paths import state_dir
from .accounting import Accountant, AccountantKind, check_kind
from .store import SiteStore, StoreCorrupt, StoreError

FORMAT = "hemafed-privacy-ledger"  # the JSON ledgers of earlier versions, migrated on first open
VERSION = 1
LEGACY_DIR = "ledgers"


class LedgerError(HemafedError):
    """Base of the ledger's errors."""


class LedgerCorrupt(LedgerError, FatalError):
    """The ledger is damaged or truncated; training must not continue."""

    what_to_do = ("stop this site and restore the site's state folder from a backup; never delete the ledger "
                  "(the privacy spend it records would be lost)")


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
    # What protects this site's records in this round (ledgers written before these fields read back as local
    # Gaussian DP, which is what they recorded).
    dp_mode: str = "local"  # "local": this site added the full noise | "distributed": a share, see below
    mechanism: str = "gaussian"  # "gaussian" (σ w.r.t. C) | "skellam" (σ w.r.t. the integer Δ₂ below)
    l2_sensitivity: float = 0.0  # skellam: Δ₂ in ring units
    l1_sensitivity: float = 0.0  # skellam: Δ₁ in ring units
    threshold: int = 0  # distributed: t, the fewest survivors whose sum is ever unmasked
    colluders: int = 0  # distributed: c, shares discounted (each site knows its own)
    share_variance: float = 0.0  # distributed: Skellam variance this site added per coordinate (ring units)
    protection: str = ""  # one sentence for the operator: who the guarantee holds against, assuming what
    attempt: int = 1  # 2, 3, … when the same round ran again (each run is a spend of its own)

    def accountant_entry(self) -> tuple:
        if self.mechanism == "skellam":
            return (self.sigma, self.sample_rate, self.steps, self.l2_sensitivity, self.l1_sensitivity)
        return (self.sigma, self.sample_rate, self.steps)


_ENTRY_FIELDS = tuple(f.name for f in fields(LedgerEntry))
_INSERT_ROUND = (f"INSERT INTO rounds (federation_id, chain, {', '.join(_ENTRY_FIELDS)}) "
                 f"VALUES (?, ?, {', '.join('?' * len(_ENTRY_FIELDS))})")


@dataclass(frozen=True)
class BudgetChange:
    """The operator changed this federation's budget (never below what was already spent)."""

    budget_epsilon: float  # the budget from now on
    spent_epsilon: float  # ε spent when it changed
    time: float
    reason: str


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


def _check_entry(e: LedgerEntry) -> None:
    if not (e.sigma > 0 and 0 < e.sample_rate <= 1 and e.steps >= 0 and math.isfinite(e.epsilon)
            and e.attempt >= 1):
        raise ValueError(f"bad entry {e}")
    if e.mechanism not in ("gaussian", "skellam") or e.dp_mode not in ("local", "distributed"):
        raise ValueError(f"unknown mechanism or DP mode in {e}")
    if e.mechanism == "skellam" and not (e.l2_sensitivity > 0 and e.l1_sensitivity > 0):
        raise ValueError(f"Skellam entry without sensitivities: {e}")


def _chain(previous: str, record: dict) -> str:
    blob = json.dumps(record, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256((previous + blob).encode()).hexdigest()


def _terms(federation_id: str, budget: float, delta: float, kind: str, created: float) -> dict:
    return {"federation_id": federation_id, "budget_epsilon": budget, "delta": delta, "accountant": kind,
            "created": created}


def ledger_exists(federation_id: str, state: str | os.PathLike[str] | None = None) -> bool:
    """Whether this site has a ledger (any spend or a fixed budget) for `federation_id`."""
    store = SiteStore(state)
    with store.connect() as con:
        return con.execute("SELECT 1 FROM ledgers WHERE federation_id = ?", (federation_id,)).fetchone() is not None


class PrivacyLedger:
    """The spend of one site in one federation, in the site's store.

    Open with the budget the operator set; a new ledger's terms are written at once so the budget is fixed
    from the first round. Reopening an existing ledger with a different budget, δ or accountant raises
    `LedgerMismatch` (pass None to take what is stored); no ledger and no terms: `FileNotFoundError`.
    """

    def __init__(self, federation_id: str, budget_epsilon: float | None = None, delta: float | None = None, *,
                 kind: AccountantKind | None = None, state: str | os.PathLike[str] | None = None) -> None:
        if not federation_id:
            raise ValueError("federation id must not be empty")
        self.federation_id = federation_id
        try:
            self.store = SiteStore(state)
        except StoreCorrupt as exc:
            raise LedgerCorrupt(str(exc)) from exc
        self.path = self.store.path
        self.entries: list[LedgerEntry] = []
        self._chain = ""
        self._seq = 0
        if self._load_terms():
            for name, asked, stored in (("budget ε", budget_epsilon, self.budget_epsilon),
                                        ("δ", delta, self.delta), ("accountant", kind, self.kind)):
                if asked is not None and asked != stored:
                    raise LedgerMismatch(f"ledger for {federation_id!r} has {name} {stored}, not {asked}")
            self._load_rounds()
            return
        damage = legacy_damage(federation_id, self.store.state)
        if damage:  # an earlier version's ledger that could not be copied in: never start again from zero
            raise LedgerCorrupt(damage)
        if budget_epsilon is None or delta is None:
            raise FileNotFoundError(f"no ledger for federation {federation_id!r} in {self.store.state}")
        if not (budget_epsilon > 0 and math.isfinite(budget_epsilon)) or not 0 < delta < 1:
            raise ValueError("budget ε must be positive and finite, δ in (0, 1)")
        kind = kind or "rdp"
        check_kind(kind)
        self._create(float(budget_epsilon), float(delta), kind, time.time())

    # -- reading -----------------------------------------------------------------

    def _read(self, query: str, args: tuple, con=None) -> list:
        """Rows of `query`, through `con` (a transaction's) or a connection of its own."""
        try:
            if con is not None:
                return con.execute(query, args).fetchall()
            with self.store.connect() as own:
                return own.execute(query, args).fetchall()
        except StoreCorrupt as exc:
            raise LedgerCorrupt(str(exc)) from exc

    def _load_terms(self) -> bool:
        rows = self._read("SELECT budget_epsilon, delta, accountant, created, chain FROM ledgers "
                          "WHERE federation_id = ?", (self.federation_id,))
        if not rows:
            return False
        budget, delta, kind, created, chain = rows[0]
        try:
            check_kind(kind)
            if not (budget > 0 and 0 < delta < 1):
                raise ValueError("bad budget or δ")
        except (TypeError, ValueError) as exc:
            raise LedgerCorrupt(f"{self.path}: malformed terms for {self.federation_id!r} ({exc})") from exc
        if chain != _chain("", _terms(self.federation_id, budget, delta, kind, created)):
            raise LedgerCorrupt(f"{self.path}: the terms of {self.federation_id!r} were changed (hash mismatch)")
        self.budget_epsilon, self.delta, self.kind, self.created = float(budget), float(delta), kind, created
        self._terms_chain = self._chain = chain
        self._seq, self.entries = 0, []
        self.budget_changes: list[BudgetChange] = []
        self._budget_chain, self._budget_seq = chain, 0
        self._load_budgets()
        return True

    def _load_budgets(self, con=None) -> None:
        """Budget changes since the last read, each checked against the chain that starts at the terms."""
        rows = self._read("SELECT seq, chain, budget_epsilon, spent_epsilon, time, reason FROM budget_changes "
                          "WHERE federation_id = ? AND seq > ? ORDER BY seq", (self.federation_id, self._budget_seq),
                          con)
        chain = self._budget_chain
        for seq, stored, budget, spent, when, reason in rows:
            change = BudgetChange(float(budget), float(spent), float(when), str(reason))
            chain = _chain(chain, asdict(change))
            if chain != stored or not (change.budget_epsilon > 0 and math.isfinite(change.budget_epsilon)):
                raise LedgerCorrupt(f"{self.path}: a budget change of {self.federation_id!r} was altered (hash "
                                    "mismatch); refusing to continue")
            self.budget_changes.append(change)
            self.budget_epsilon, self._budget_seq = change.budget_epsilon, seq
        self._budget_chain = chain

    def _load_rounds(self, con=None) -> None:
        """Read the rows appended since the last read (another process may have added some) and check them."""
        rows = self._read(f"SELECT seq, chain, {', '.join(_ENTRY_FIELDS)} FROM rounds WHERE federation_id = ? "
                          "AND seq > ? ORDER BY seq", (self.federation_id, self._seq), con)
        entries, chain, seq = list(self.entries), self._chain, self._seq
        for row in rows:
            seq, stored_chain, values = row[0], row[1], row[2:]
            try:
                entry = LedgerEntry(**dict(zip(_ENTRY_FIELDS, values, strict=True)))
                _check_entry(entry)
            except (TypeError, ValueError) as exc:
                raise LedgerCorrupt(f"{self.path}: malformed round in {self.federation_id!r} ({exc})") from exc
            chain = _chain(chain, asdict(entry))
            if chain != stored_chain:
                raise LedgerCorrupt(f"{self.path}: round {entry.round} of {self.federation_id!r} was changed, or a "
                                    "round before it removed (hash mismatch); refusing to continue")
            entries.append(entry)
        self.entries, self._chain, self._seq = entries, chain, seq

    def change_budget(self, budget_epsilon: float, reason: str = "") -> BudgetChange:
        """Set this federation's budget from now on (durably): raise it, or lower it to no less than what was
        already spent. The ledger keeps every change, and ε spent never goes back."""
        if not (budget_epsilon > 0 and math.isfinite(budget_epsilon)):
            raise LedgerError("a budget must be a positive number")
        try:
            with self.store.transaction() as con:
                self._check_unchanged(con)
                self._load_rounds(con)
                self._load_budgets(con)
                spent = self.spent_epsilon()
                if budget_epsilon < spent:
                    raise LedgerError(f"a budget of ε = {budget_epsilon:g} is below what this site already spent in "
                                      f"{self.federation_id!r} (ε = {spent:.4g}); spent privacy never comes back")
                change = BudgetChange(float(budget_epsilon), float(spent), time.time(), str(reason))
                chain = _chain(self._budget_chain, asdict(change))
                cur = con.execute("INSERT INTO budget_changes (federation_id, budget_epsilon, spent_epsilon, time, "
                                  "reason, chain) VALUES (?, ?, ?, ?, ?, ?)",
                                  (self.federation_id, change.budget_epsilon, change.spent_epsilon, change.time,
                                   change.reason, chain))
        except StoreCorrupt as exc:
            raise LedgerCorrupt(str(exc)) from exc
        self.budget_changes.append(change)
        self.budget_epsilon, self._budget_chain, self._budget_seq = change.budget_epsilon, chain, cur.lastrowid
        return change

    def _check_unchanged(self, con) -> None:
        """Before a write: the terms, the number of rows read and the last of them are as this object read them
        (every row was checked when the ledger was opened; a change since then shows here as a count, a last
        row or a terms hash that differ, and every row is checked again at the next open)."""
        terms = self._read("SELECT budget_epsilon, delta, accountant, created, chain FROM ledgers "
                           "WHERE federation_id = ?", (self.federation_id,), con)
        if not terms or terms[0][4] != self._terms_chain or \
                _chain("", _terms(self.federation_id, *terms[0][:4])) != self._terms_chain:
            raise LedgerCorrupt(f"{self.path}: the terms of {self.federation_id!r} were changed or removed")
        (count, last), = self._read("SELECT count(*), max(seq) FROM rounds WHERE federation_id = ? AND seq <= ?",
                                    (self.federation_id, self._seq), con)
        tail = self._read("SELECT chain FROM rounds WHERE seq = ?", (self._seq,), con) if self._seq else []
        if count != len(self.entries) or (last or 0) != self._seq or (self._seq and tail[0][0] != self._chain):
            raise LedgerCorrupt(f"{self.path}: rounds of {self.federation_id!r} were changed or removed; refusing "
                                "to continue")

    def accountant(self) -> Accountant:
        """A fresh accountant rebuilt from every recorded round."""
        return Accountant(self.kind, [e.accountant_entry() for e in self.entries])

    def spent_epsilon(self) -> float:
        """ε spent so far at the ledger's δ (recomputed from the history, not trusted from a stored figure)."""
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

        Call this after training and *before* the update leaves the site. Each call is a spend: a round
        number seen before (a re-run round) is recorded again, as its next attempt.
        `protection` (default: local Gaussian DP) says which mechanism and trust assumption apply.
        """
        protection = protection or Protection()
        try:
            with self.store.transaction() as con:
                # what is on disk is the truth: another process may have appended since we read (a damaged
                # ledger must stop the site before it spends more)
                self._check_unchanged(con)
                self._load_rounds(con)
                self._load_budgets(con)
                epsilon = self.check_round(sigma, sample_rate, steps, skellam=protection.skellam)
                attempt = 1 + sum(1 for e in self.entries if e.round == int(round))
                entry = LedgerEntry(round=int(round), sigma=float(sigma), sample_rate=float(sample_rate),
                                    steps=int(steps), delta=self.delta, epsilon=float(epsilon),
                                    model_hash=str(model_hash), time=time.time(), attempt=attempt,
                                    **protection.fields())
                _check_entry(entry)
                chain = _chain(self._chain, asdict(entry))
                cur = con.execute(_INSERT_ROUND, (self.federation_id, chain, *astuple_entry(entry)))
                seq = cur.lastrowid
        except StoreCorrupt as exc:
            raise LedgerCorrupt(str(exc)) from exc
        self.entries, self._chain, self._seq = [*self.entries, entry], chain, seq
        return entry

    def _create(self, budget: float, delta: float, kind: str, created: float, migrated_from: str = "") -> None:
        chain = _chain("", _terms(self.federation_id, budget, delta, kind, created))
        try:
            with self.store.transaction() as con:
                if con.execute("SELECT 1 FROM ledgers WHERE federation_id = ?", (self.federation_id,)).fetchone():
                    existing = True  # another process created it first: take theirs (checked below)
                else:
                    existing = False
                    con.execute("INSERT INTO ledgers VALUES (?, ?, ?, ?, ?, ?, ?)",
                                (self.federation_id, budget, delta, kind, created, migrated_from, chain))
        except StoreCorrupt as exc:
            raise LedgerCorrupt(str(exc)) from exc
        self._load_terms()
        if existing and (self.budget_epsilon, self.delta, self.kind) != (budget, delta, kind):
            raise LedgerMismatch(f"ledger for {self.federation_id!r} was just created with other terms")
        self._load_rounds()

    def view(self) -> LedgerView:
        """A read-only snapshot (what a projection needs), safe to hand to another thread."""
        return LedgerView(self.federation_id, self.budget_epsilon, self.delta, self.kind, tuple(self.entries),
                          tuple(self.budget_changes))

    def summary(self) -> dict:
        return self.view().summary(str(self.path))


@dataclass(frozen=True)
class LedgerView:
    """A ledger as it stood when read: its terms and rounds (no writing)."""

    federation_id: str
    budget_epsilon: float
    delta: float
    kind: str
    entries: tuple[LedgerEntry, ...]
    budget_changes: tuple[BudgetChange, ...] = ()

    @property
    def rounds(self) -> int:
        return len(self.entries)

    def accountant(self) -> Accountant:
        return Accountant(self.kind, [e.accountant_entry() for e in self.entries])  # type: ignore[arg-type]

    def spent_epsilon(self) -> float:
        return self.accountant().epsilon(self.delta)

    def summary(self, path: str = "") -> dict:
        spent = self.spent_epsilon()
        return {
            "federation_id": self.federation_id,
            "path": path,
            "accountant": self.kind,
            "budget_epsilon": self.budget_epsilon,
            "delta": self.delta,
            "rounds": self.rounds,
            "steps": sum(e.steps for e in self.entries),
            "spent_epsilon": spent,
            "remaining_epsilon": max(0.0, self.budget_epsilon - spent),
            "last_round": asdict(self.entries[-1]) if self.entries else None,
            "budget_changes": [asdict(c) for c in self.budget_changes],
        }


def astuple_entry(entry: LedgerEntry) -> tuple:
    return tuple(getattr(entry, name) for name in _ENTRY_FIELDS)


def list_ledgers(state: str | os.PathLike[str] | None = None) -> list[dict]:
    """A summary per ledger in the state directory; a damaged one is listed with its `error`."""
    try:
        store = SiteStore(state)
        with store.connect() as con:
            ids = [row[0] for row in con.execute("SELECT federation_id FROM ledgers ORDER BY federation_id")]
    except (StoreCorrupt, StoreError, LedgerError) as exc:
        return [{"path": str(state_dir(state)), "error": str(exc)}]
    out: list[dict] = []
    folder = store.state / LEGACY_DIR
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            read_legacy(path)
        except LedgerCorrupt as exc:
            out.append({"path": str(path), "error": str(exc)})
    for federation_id in ids:
        try:
            out.append(PrivacyLedger(federation_id, state=state).summary())
        except (LedgerError, StoreError, OSError) as exc:
            out.append({"federation_id": federation_id, "path": str(store.path), "error": str(exc)})
    return out


# -- the JSON ledgers of earlier versions ------------------------------------------------------------


def legacy_path(federation_id: str, state: str | os.PathLike[str] | None = None) -> Path:
    """Where an earlier version kept the JSON ledger of `federation_id`."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", federation_id)[:48].strip("._") or "federation"
    digest = hashlib.sha256(federation_id.encode()).hexdigest()[:12]
    return state_dir(state) / LEGACY_DIR / f"{slug}-{digest}.json"


def _legacy_checksum(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_legacy(path: Path) -> dict:
    """The validated body of an earlier version's JSON ledger (`LedgerCorrupt` when damaged)."""
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LedgerCorrupt(f"{path}: not a readable ledger ({exc}); refusing to continue") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise LedgerCorrupt(f"{path}: not a hemafed privacy ledger of a known version")
    body = doc.get("body")
    if not isinstance(body, dict) or doc.get("sha256") != _legacy_checksum(body):
        raise LedgerCorrupt(f"{path}: checksum mismatch (file damaged or edited)")
    try:
        check_kind(body["accountant"])
        if not (float(body["budget_epsilon"]) > 0 and 0 < float(body["delta"]) < 1):
            raise ValueError("bad budget or δ")
        entries = [LedgerEntry(**e) for e in body["rounds"]]
        for e in entries:
            _check_entry(e)
    except (KeyError, TypeError, ValueError) as exc:
        raise LedgerCorrupt(f"{path}: malformed ledger ({exc})") from exc
    body["rounds"] = entries
    return body


def migrate_json_ledgers(store: SiteStore) -> None:
    """Copy every JSON ledger of an earlier version into the store, once, each in one transaction (its terms
    and rounds as they were). The file stays where it was, no longer written. A damaged one is left for
    `PrivacyLedger` to refuse by name when that federation is opened."""
    folder = store.state / LEGACY_DIR
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            body = read_legacy(path)
        except LedgerCorrupt:
            continue
        fid = body["federation_id"]
        with store.transaction() as con:
            if con.execute("SELECT 1 FROM ledgers WHERE federation_id = ?", (fid,)).fetchone():
                continue
            terms = _terms(fid, float(body["budget_epsilon"]), float(body["delta"]), body["accountant"],
                           float(body.get("created", 0.0)))
            chain = _chain("", terms)
            con.execute("INSERT INTO ledgers VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (fid, terms["budget_epsilon"], terms["delta"], terms["accountant"], terms["created"],
                         str(path), chain))
            seen: dict[int, int] = {}
            for e in body["rounds"]:
                seen[e.round] = seen.get(e.round, 0) + 1
                entry = LedgerEntry(**{**asdict(e), "attempt": seen[e.round]})
                chain = _chain(chain, asdict(entry))
                con.execute(_INSERT_ROUND, (fid, chain, *astuple_entry(entry)))


def legacy_damage(federation_id: str, state: str | os.PathLike[str] | None = None) -> str | None:
    """Why an earlier version's JSON ledger of `federation_id` could not be migrated (None: none, or fine)."""
    path = legacy_path(federation_id, state)
    if not path.exists():
        return None
    try:
        read_legacy(path)
    except LedgerCorrupt as exc:
        return str(exc)
    return None
