"""The privacy ledger: append-only, durable, refuses damage and over-spending."""

from __future__ import annotations

import json

import pytest

from hemafed.core.privacy.accounting import Accountant
from hemafed.core.privacy.ledger import (
    BudgetExhausted,
    LedgerCorrupt,
    LedgerError,
    LedgerMismatch,
    PrivacyLedger,
    ledger_exists,
    list_ledgers,
)
from hemafed.core.privacy.store import SiteStore
from hemafed.gui.cli import main as cli_main

SIGMA, Q, STEPS = 1.1, 0.05, 40


def _ledger(tmp_path, budget: float = 5.0, fed: str = "fed-A") -> PrivacyLedger:
    return PrivacyLedger(fed, budget, 1e-5, state=tmp_path)


def test_records_survive_reopening(tmp_path) -> None:
    led = _ledger(tmp_path)
    assert led.spent_epsilon() == 0.0
    e1 = led.record_round(1, SIGMA, Q, STEPS, "a" * 64)
    e2 = led.record_round(2, SIGMA, Q, STEPS, "b" * 64)
    assert e2.epsilon > e1.epsilon > 0
    again = PrivacyLedger("fed-A", state=tmp_path)
    assert again.entries == [e1, e2]
    acc = Accountant()
    acc.step(SIGMA, Q, 2 * STEPS)
    assert again.spent_epsilon() == pytest.approx(acc.epsilon(1e-5))
    assert again.spent_epsilon() == pytest.approx(e2.epsilon)
    assert again.budget_epsilon == 5.0 and again.delta == 1e-5 and again.kind == "rdp"


def test_check_round_projects_without_recording(tmp_path) -> None:
    led = _ledger(tmp_path)
    projected = led.check_round(SIGMA, Q, STEPS)
    assert projected > 0 and led.rounds == 0
    assert PrivacyLedger("fed-A", state=tmp_path).rounds == 0


def test_round_past_budget_raises_and_records_nothing(tmp_path) -> None:
    led = _ledger(tmp_path, budget=4.0)
    led.record_round(1, SIGMA, Q, STEPS, "h1")
    n = 1
    with pytest.raises(BudgetExhausted) as info:
        while True:  # spend until the budget refuses
            led.check_round(SIGMA, Q, STEPS)
            n += 1
            led.record_round(n, SIGMA, Q, STEPS, f"h{n}")
    with pytest.raises(BudgetExhausted):
        led.record_round(n + 1, SIGMA, Q, STEPS, "never")
    assert _rows(tmp_path) == n
    assert info.value.projected > info.value.budget == 4.0
    reloaded = PrivacyLedger("fed-A", state=tmp_path)
    assert reloaded.rounds == led.rounds == n
    assert reloaded.spent_epsilon() <= 4.0


def test_non_private_round_can_never_be_recorded(tmp_path) -> None:
    led = _ledger(tmp_path, budget=1000.0)
    with pytest.raises(BudgetExhausted):
        led.check_round(0.0, Q, STEPS)
    with pytest.raises(BudgetExhausted):
        led.record_round(1, 0.0, Q, STEPS, "x")
    assert led.rounds == 0


def _rows(state) -> int:
    with SiteStore(state).connect() as con:
        return con.execute("SELECT count(*) FROM rounds").fetchone()[0]


def _sql(state, *statements: str) -> None:
    """Change the store behind the ledger's back (as a disk fault or a hand edit would)."""
    import sqlite3

    con = sqlite3.connect(SiteStore(state).path, isolation_level=None)
    try:
        for statement in statements:
            con.execute(statement)
    finally:
        con.close()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "edit", "empty", "schema", "delete", "terms"])
def test_damaged_ledger_refuses_to_load(tmp_path, damage: str) -> None:
    led = _ledger(tmp_path)
    for r in (1, 2, 3):
        led.record_round(r, SIGMA, Q, STEPS, "h")
    path = led.path
    _sql(tmp_path, "PRAGMA wal_checkpoint(TRUNCATE)")  # everything in the main file, as after a clean close
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00\xff" * 50)
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "edit":  # someone lowers the spend by hand; the hash chain catches it
        _sql(tmp_path, "DROP TRIGGER rounds_no_update", "UPDATE rounds SET sigma = 50.0 WHERE round = 2")
    elif damage == "delete":  # a round taken out of the middle
        _sql(tmp_path, "DROP TRIGGER rounds_no_delete", "DELETE FROM rounds WHERE round = 2")
    elif damage == "terms":
        _sql(tmp_path, "DROP TRIGGER ledgers_no_update", "UPDATE ledgers SET budget_epsilon = 50.0")
    else:
        _sql(tmp_path, "DROP TRIGGER rounds_no_update", "UPDATE rounds SET mechanism = 'x' WHERE round = 1")
    with pytest.raises(LedgerCorrupt):
        PrivacyLedger("fed-A", 5.0, 1e-5, state=tmp_path)  # every row is checked when a ledger is opened
    assert "error" in list_ledgers(tmp_path)[0]
    if damage not in ("edit", "schema"):  # a changed old row is seen at the next open, not by a live ledger
        with pytest.raises(LedgerCorrupt):
            led.record_round(4, SIGMA, Q, STEPS, "h2")  # never resets to zero and carries on


def test_the_store_is_append_only(tmp_path) -> None:
    import sqlite3

    _ledger(tmp_path).record_round(1, SIGMA, Q, STEPS, "h")
    for statement in ("DELETE FROM rounds", "UPDATE rounds SET sigma = 9", "DELETE FROM ledgers",
                      "UPDATE ledgers SET budget_epsilon = 9"):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            _sql(tmp_path, statement)
    assert PrivacyLedger("fed-A", state=tmp_path).rounds == 1


def test_a_rerun_round_is_a_second_attempt(tmp_path) -> None:
    led = _ledger(tmp_path, budget=50.0)
    first = led.record_round(1, SIGMA, Q, STEPS, "h")
    again = led.record_round(1, SIGMA, Q, STEPS, "h")
    assert (first.round, first.attempt) == (1, 1) and (again.round, again.attempt) == (1, 2)
    assert again.epsilon > first.epsilon  # both runs are counted


def test_json_ledgers_of_earlier_versions_are_migrated_and_kept(tmp_path) -> None:
    from hemafed.core.privacy.ledger import legacy_path

    path = legacy_path("old-fed", tmp_path)
    path.parent.mkdir(parents=True)
    rounds = [{"round": r, "sigma": SIGMA, "sample_rate": Q, "steps": STEPS, "delta": 1e-5,
               "epsilon": Accountant("rdp", [(SIGMA, Q, STEPS * r)]).epsilon(1e-5), "model_hash": "h",
               "time": 1.0 + r} for r in (1, 2, 2)]  # round 2 ran twice
    body = {"federation_id": "old-fed", "budget_epsilon": 6.0, "delta": 1e-5, "accountant": "rdp", "created": 1.0,
            "rounds": rounds}
    from hemafed.core.privacy.ledger import _legacy_checksum

    raw = json.dumps({"format": "hemafed-privacy-ledger", "version": 1, "sha256": _legacy_checksum(body),
                      "body": body}).encode()
    path.write_bytes(raw)
    led = PrivacyLedger("old-fed", state=tmp_path)
    assert led.budget_epsilon == 6.0 and [(e.round, e.attempt) for e in led.entries] == [(1, 1), (2, 1), (2, 2)]
    assert led.spent_epsilon() == pytest.approx(Accountant("rdp", [(SIGMA, Q, 3 * STEPS)]).epsilon(1e-5))
    led.record_round(3, SIGMA, Q, STEPS, "h")  # it goes on in the store
    assert path.read_bytes() == raw  # the old file is kept, unchanged
    assert [s["rounds"] for s in list_ledgers(tmp_path)] == [4]  # listed once


def test_a_damaged_json_ledger_of_an_earlier_version_is_never_replaced_by_an_empty_one(tmp_path) -> None:
    from hemafed.core.privacy.ledger import legacy_path

    path = legacy_path("old-fed", tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b'{"format": "hemafed-privacy-ledger", "ver')
    with pytest.raises(LedgerCorrupt):
        PrivacyLedger("old-fed", 6.0, 1e-5, state=tmp_path)
    assert "error" in list_ledgers(tmp_path)[0]


def test_reopening_with_other_terms_is_refused(tmp_path) -> None:
    _ledger(tmp_path)
    with pytest.raises(LedgerMismatch):
        PrivacyLedger("fed-A", 10.0, 1e-5, state=tmp_path)
    with pytest.raises(LedgerMismatch):
        PrivacyLedger("fed-A", 5.0, 1e-6, state=tmp_path)
    with pytest.raises(LedgerMismatch):
        PrivacyLedger("fed-A", 5.0, 1e-5, kind="prv", state=tmp_path)
    with pytest.raises(FileNotFoundError):
        PrivacyLedger("fed-unknown", state=tmp_path)


def test_federations_are_kept_apart(tmp_path) -> None:
    a = _ledger(tmp_path, fed="hospital/fed 1")
    b = _ledger(tmp_path, fed="hospital_fed_1")
    a.record_round(1, SIGMA, Q, STEPS, "h")
    assert b.spent_epsilon() == 0.0 and PrivacyLedger("hospital_fed_1", state=tmp_path).rounds == 0
    assert ledger_exists("hospital/fed 1", tmp_path) and not ledger_exists("hospital/fed 2", tmp_path)
    summaries = {s["federation_id"]: s for s in list_ledgers(tmp_path)}
    assert summaries["hospital/fed 1"]["rounds"] == 1 and summaries["hospital_fed_1"]["rounds"] == 0


def test_default_state_dir_is_used(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HEMAFED_STATE_DIR", str(tmp_path / "st"))
    led = PrivacyLedger("fed", 3.0, 1e-5)
    assert led.path.is_relative_to(tmp_path / "st")


def test_ledger_cli(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    led = _ledger(tmp_path)
    led.record_round(1, SIGMA, Q, STEPS, "h")
    assert cli_main(["ledger", "--state", str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data[0]["federation_id"] == "fed-A" and data[0]["rounds"] == 1
    assert data[0]["spent_epsilon"] == pytest.approx(led.spent_epsilon())
    assert cli_main(["ledger", "--state", str(tmp_path)]) == 0
    assert "fed-A" in capsys.readouterr().out
    _sql(tmp_path, "PRAGMA wal_checkpoint(TRUNCATE)")
    led.path.write_bytes(b"{")
    assert cli_main(["ledger", "--state", str(tmp_path)]) == 1


def test_the_budget_can_be_raised_or_lowered_to_what_is_spent_never_below(tmp_path) -> None:
    led = _ledger(tmp_path, budget=4.0)
    for r in (1, 2):
        led.record_round(r, SIGMA, Q, STEPS, "h")
    spent = led.spent_epsilon()
    with pytest.raises(LedgerError, match="never comes back"):
        led.change_budget(spent / 2)
    change = led.change_budget(10.0, "the ethics board approved ε = 10")
    assert change.spent_epsilon == pytest.approx(spent) and led.budget_epsilon == 10.0
    again = PrivacyLedger("fed-A", state=tmp_path)
    assert again.budget_epsilon == 10.0 and [c.reason for c in again.budget_changes] == [change.reason]
    assert 4.0 < again.check_round(SIGMA, Q, 3 * STEPS) <= 10.0  # rounds past the old budget fit the new one
    led.change_budget(spent)  # lowered to exactly what is spent: nothing more can be recorded
    with pytest.raises(BudgetExhausted):
        PrivacyLedger("fed-A", state=tmp_path).record_round(3, SIGMA, Q, STEPS, "h")
    summary = list_ledgers(tmp_path)[0]
    assert summary["budget_epsilon"] == pytest.approx(spent) and len(summary["budget_changes"]) == 2
    _sql(tmp_path, "DROP TRIGGER budget_changes_no_update", "UPDATE budget_changes SET budget_epsilon = 99")
    with pytest.raises(LedgerCorrupt):
        PrivacyLedger("fed-A", state=tmp_path)


def test_ledger_budget_cli(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    led = _ledger(tmp_path)
    led.record_round(1, SIGMA, Q, STEPS, "h")
    assert cli_main(["ledger", "budget", "fed-A", "9", "--reason", "board approval 17", "--yes",
                     "--state", str(tmp_path)]) == 0
    assert PrivacyLedger("fed-A", state=tmp_path).budget_epsilon == 9.0
    assert cli_main(["ledger", "budget", "fed-A", "0.01", "--yes", "--state", str(tmp_path)]) == 1
    assert "never comes back" in capsys.readouterr().err
    assert cli_main(["ledger", "budget", "nope", "9", "--yes", "--state", str(tmp_path)]) == 1
