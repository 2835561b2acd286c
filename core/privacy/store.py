"""The site's own records in one SQLite file per state directory: `<state>/site.sqlite`.

It holds, per federation, the privacy ledger (`core.privacy.ledger`), the site's round log, the outbound log
(every message the site sent, `network.outbound`), the plans its operator accepted and audits of them, as
append-only tables (triggers refuse UPDATE and DELETE). Each write is one transaction, committed
with WAL and `synchronous=FULL`, so a row is on disk when the call returns: a crash (even `kill -9`
or a power cut) keeps every committed row and never leaves a torn one. Several processes may share
the file (SQLite's locks serialise writers).

The file is created complete or not at all (built under a temporary name, then renamed), so an empty
or schema-less `site.sqlite` can only be damage, and is refused as such rather than taken for a new,
empty ledger. Ledgers of earlier versions (`<state>/ledgers/*.json`, rewritten whole every round)
are copied in once, on first open, in one transaction; the JSON files are kept as they were and are
no longer written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..atomic import fsync_dir
from ..errors import FatalError, HemafedError
from ..paths import state_dir

log = logging.getLogger(__name__)

FILE_NAME = "site.sqlite"
FORMAT = "hemafed-site-store"
SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE ledgers (
    federation_id TEXT PRIMARY KEY, budget_epsilon REAL NOT NULL, delta REAL NOT NULL, accountant TEXT NOT NULL,
    created REAL NOT NULL, migrated_from TEXT NOT NULL DEFAULT '', chain TEXT NOT NULL);
CREATE TABLE rounds (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, federation_id TEXT NOT NULL REFERENCES ledgers(federation_id),
    round INTEGER NOT NULL, attempt INTEGER NOT NULL, sigma REAL NOT NULL, sample_rate REAL NOT NULL,
    steps INTEGER NOT NULL, delta REAL NOT NULL, epsilon REAL NOT NULL, model_hash TEXT NOT NULL,
    time REAL NOT NULL, dp_mode TEXT NOT NULL, mechanism TEXT NOT NULL, l2_sensitivity REAL NOT NULL,
    l1_sensitivity REAL NOT NULL, threshold INTEGER NOT NULL, colluders INTEGER NOT NULL,
    share_variance REAL NOT NULL, protection TEXT NOT NULL, chain TEXT NOT NULL,
    UNIQUE (federation_id, round, attempt));
CREATE INDEX rounds_by_federation ON rounds (federation_id, seq);
CREATE TABLE budget_changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, federation_id TEXT NOT NULL REFERENCES ledgers(federation_id),
    budget_epsilon REAL NOT NULL, spent_epsilon REAL NOT NULL, time REAL NOT NULL, reason TEXT NOT NULL,
    chain TEXT NOT NULL);
CREATE TABLE round_log (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, federation_id TEXT NOT NULL, round INTEGER NOT NULL,
    status TEXT NOT NULL, time REAL NOT NULL, fields TEXT NOT NULL);
CREATE INDEX round_log_by_federation ON round_log (federation_id, seq);
CREATE TABLE outbound (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, federation_id TEXT NOT NULL, round INTEGER NOT NULL,
    stage TEXT NOT NULL, kind TEXT NOT NULL, bytes INTEGER NOT NULL CHECK (bytes >= 0),
    sha256 TEXT NOT NULL CHECK (length(sha256) = 64), protection TEXT NOT NULL, detail TEXT NOT NULL);
CREATE INDEX outbound_by_federation ON outbound (federation_id, seq);
CREATE TABLE accepted_plans (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, federation_id TEXT NOT NULL, digest TEXT NOT NULL, time REAL NOT NULL,
    operator TEXT NOT NULL, decided TEXT NOT NULL, aggregator TEXT NOT NULL, plan TEXT NOT NULL, review TEXT NOT NULL);
CREATE TABLE audits (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, plan_digest TEXT NOT NULL, time REAL NOT NULL, result TEXT NOT NULL);
"""
# outbound: every message this site sent (`log_outbound`); accepted_plans: each plan the operator accepted, as
# reviewed; audits: `hemafed audit --site` results for the plans this site accepted
APPEND_ONLY = ("ledgers", "rounds", "budget_changes", "round_log", "outbound", "accepted_plans", "audits")


class StoreCorrupt(FatalError):
    """`site.sqlite` is damaged (not a database, schema missing, rows that break the rules)."""

    what_to_do = ("stop this site and restore the file from a backup; never delete it (the privacy spend it "
                  "records would be lost)")


class StoreError(HemafedError):
    """The store could not be read or written (disk full, permissions); nothing was changed."""


_migrated: set[Path] = set()
_migrate_lock = threading.Lock()


def store_path(state: str | os.PathLike[str] | None = None) -> Path:
    return state_dir(state) / FILE_NAME


class SiteStore:
    """The site's SQLite file (created on first use). Each call opens its own short connection, so an object
    may be used from any thread, and several processes may use the same file."""

    def __init__(self, state: str | os.PathLike[str] | None = None) -> None:
        self.path = store_path(state)
        self.state = self.path.parent
        if not self.path.exists():
            self._create()
        self._check()
        with _migrate_lock:
            if self.path not in _migrated:
                from .ledger import migrate_json_ledgers  # here: the ledger module builds on this one

                migrate_json_ledgers(self)
                _migrated.add(self.path)

    # -- creation and checks ---------------------------------------------------------------------

    def _create(self) -> None:
        """Build the schema in a temporary file, then rename it into place (never an empty store)."""
        fd, tmp = tempfile.mkstemp(dir=self.state, prefix=f".{FILE_NAME}.", suffix=".tmp")
        os.close(fd)
        try:
            os.chmod(tmp, 0o600)
            con = sqlite3.connect(tmp)
            try:
                with con:
                    con.executescript(SCHEMA + _triggers())
                    con.executemany("INSERT INTO meta VALUES (?, ?)",
                                    [("format", FORMAT), ("schema_version", str(SCHEMA_VERSION))])
            finally:
                con.close()
            with contextlib.suppress(FileExistsError):  # another process created it first: theirs wins
                os.link(tmp, self.path)
            fsync_dir(self.state)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def _check(self) -> None:
        try:
            with self.connect() as con:
                meta = dict(con.execute("SELECT key, value FROM meta"))
        except StoreError:
            raise
        except (StoreCorrupt, sqlite3.DatabaseError) as exc:
            raise StoreCorrupt(f"{self.path}: not a readable hemafed store ({exc})") from exc
        if meta.get("format") != FORMAT:
            raise StoreCorrupt(f"{self.path}: not a hemafed store")
        if meta.get("schema_version") != str(SCHEMA_VERSION):
            raise StoreCorrupt(f"{self.path}: written by another version of hemafed "
                               f"(schema {meta.get('schema_version')!r}, this one reads {SCHEMA_VERSION})")

    @contextlib.contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """A connection in autocommit mode; use `transaction()` for writes."""
        if not self.path.is_file() or self.path.stat().st_size == 0:
            raise StoreCorrupt(f"{self.path}: the store is missing or empty (it is never left empty)")
        con = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
        try:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=FULL")  # a commit is durable when it returns, also in WAL mode
            con.execute("PRAGMA foreign_keys=ON")
            yield con
        except sqlite3.DatabaseError as exc:
            raise _translate(self.path, exc) from exc
        finally:
            con.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE: writers queue here), committed durably on exit."""
        with self.connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    # -- the round log ------------------------------------------------------------------------------

    def _select(self, query: str, column: str, value: str | None) -> list[tuple]:
        """The rows of `query` oldest first, only those whose `column` equals `value` unless it is None (`column` is
        one of this module's literals, never user text)."""
        args: tuple = ()
        if value is not None:
            query, args = f"{query} WHERE {column} = ?", (value,)
        with self.connect() as con:
            return con.execute(query + " ORDER BY seq", args).fetchall()

    def log_round(self, federation_id: str, round: int, status: str, when: float, **fields: object) -> None:
        """Append one line of the site's round log (what happened to a round at this site, and when)."""
        with self.transaction() as con:
            con.execute("INSERT INTO round_log (federation_id, round, status, time, fields) VALUES (?, ?, ?, ?, ?)",
                        (federation_id, int(round), str(status), float(when), json.dumps(fields, default=str)))

    def round_log(self, federation_id: str | None = None) -> list[dict]:
        """The round log, oldest first (every federation unless one is named)."""
        rows = self._select("SELECT federation_id, round, status, time, fields FROM round_log", "federation_id",
                            federation_id)
        return [{"federation_id": f, "round": r, "status": s, "time": t, **json.loads(extra)}
                for f, r, s, t, extra in rows]


    # -- what left this site ---------------------------------------------------------------------

    def log_outbound(self, record: OutboundRecord) -> None:
        """Append one message this site sends, durably, before it is sent (`network.outbound`)."""
        with self.transaction() as con:
            con.execute("INSERT INTO outbound (time, federation_id, round, stage, kind, bytes, sha256, protection, "
                        "detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (float(record.time), record.federation_id, int(record.round), record.stage, record.kind,
                         int(record.bytes), record.sha256, record.protection, record.detail))

    def outbound(self, federation_id: str | None = None) -> list[OutboundRecord]:
        """Every message this site sent, oldest first (every federation unless one is named)."""
        return [OutboundRecord(*row) for row in self._select(
            "SELECT time, federation_id, round, stage, kind, bytes, sha256, protection, detail FROM outbound",
            "federation_id", federation_id)]

    # -- the plans the operator accepted, and audits of them ----------------------------------------
    # A rejoin with a plan accepted here needs no second review, a changed plan is shown with what changed
    # (`last_accepted_plans`); the report lists each acceptance as reviewed.

    def record_plan_acceptance(self, federation_id: str, digest: str, plan: dict, *, operator: str, decided: str,
                               aggregator: str, review: list[tuple[str, str]], time: float) -> None:
        """The plan as it was accepted: its fields, digest, the review's words, who (`operator`), how (`decided`:
        "operator" when a person accepted it after the review, "automatic" when a headless site did because it
        was within its bounds), when, and which aggregator (JSON: url, certificate_sha256)."""
        if decided not in ("operator", "automatic"):
            raise ValueError("decided must be 'operator' or 'automatic'")
        with self.transaction() as con:
            con.execute("INSERT INTO accepted_plans (federation_id, digest, time, operator, decided, aggregator, plan, "
                        "review) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (federation_id, digest, float(time), operator, decided, aggregator,
                         json.dumps(plan, sort_keys=True), json.dumps([list(row) for row in review])))

    def accepted_plans(self, federation_id: str | None = None) -> list[dict]:
        """Each acceptance, oldest first: federation_id, digest, time, operator, decided, aggregator (JSON),
        plan (dict), review ((label, text) rows)."""
        rows = self._select("SELECT federation_id, digest, time, operator, decided, aggregator, plan, review "
                            "FROM accepted_plans", "federation_id", federation_id)
        return [{"federation_id": f, "digest": d, "time": t, "operator": o, "decided": h, "aggregator": a,
                 "plan": json.loads(p), "review": [tuple(row) for row in json.loads(r)]}
                for f, d, t, o, h, a, p, r in rows]

    def last_accepted_plans(self) -> dict[str, dict]:
        """The last plan accepted in each federation (its fields, as the aggregator sent them)."""
        return {row["federation_id"]: row["plan"] for row in self.accepted_plans()}

    def record_audit(self, plan_digest: str, result: dict, time: float | None = None) -> None:
        """An audit result (`hemafed audit --site`) for the plan with `plan_digest`."""
        import time as _time

        with self.transaction() as con:
            con.execute("INSERT INTO audits (plan_digest, time, result) VALUES (?, ?, ?)",
                        (plan_digest, float(_time.time() if time is None else time), json.dumps(result)))

    def audits(self, plan_digest: str | None = None) -> list[dict]:
        """Audit results, oldest first (of one plan when its digest is given)."""
        rows = self._select("SELECT plan_digest, time, result FROM audits", "plan_digest", plan_digest)
        return [{"plan_digest": d, "time": t, "result": json.loads(r)} for d, t, r in rows]


@dataclass(frozen=True)
class OutboundRecord:
    """One message a site sent: when, in which federation, round and stage, what kind, its exact size, the SHA-256
    of its exact bytes, what protected it, and a few details (JSON) — see `network.outbound`."""

    time: float
    federation_id: str
    round: int
    stage: str
    kind: str
    bytes: int
    sha256: str
    protection: str
    detail: str = "{}"


_RESOURCE = ("locked", "busy", "disk", "full", "readonly", "read-only", "unable to open", "out of memory")


def _translate(path: Path, exc: sqlite3.DatabaseError) -> HemafedError:
    """SQLite's error as ours: a resource problem (nothing changed, may clear) or damage (stop)."""
    text = str(exc)
    if isinstance(exc, sqlite3.IntegrityError) or (isinstance(exc, sqlite3.OperationalError)
                                                   and any(word in text.lower() for word in _RESOURCE)):
        return StoreError(f"{path}: {text}")
    return StoreCorrupt(f"{path}: {text}")


def _triggers() -> str:
    out = []
    for table in APPEND_ONLY:
        for op in ("UPDATE", "DELETE"):
            out.append(f"CREATE TRIGGER {table}_no_{op.lower()} BEFORE {op} ON {table} BEGIN "
                       f"SELECT RAISE(ABORT, '{table} is append-only'); END;")
    return "\n".join(out)
