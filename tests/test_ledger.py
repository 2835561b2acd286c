"""The privacy ledger: append-only, durable, refuses damage and over-spending."""

from __future__ import annotations

import json

import pytest

from hemafed.core.privacy.accounting import Accountant
from hemafed.core.privacy.ledger import (
    BudgetExhausted,
    LedgerCorrupt,
    LedgerMismatch,
    PrivacyLedger,
    ledger_path,
    list_ledgers,
)
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
    before = led.path.read_bytes()
    with pytest.raises(BudgetExhausted):
        led.record_round(n + 1, SIGMA, Q, STEPS, "never")
    assert led.path.read_bytes() == before
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


@pytest.mark.parametrize("damage", ["truncate", "garbage", "edit", "empty", "schema"])
def test_damaged_ledger_refuses_to_load(tmp_path, damage: str) -> None:
    led = _ledger(tmp_path)
    led.record_round(1, SIGMA, Q, STEPS, "h")
    raw = led.path.read_bytes()
    if damage == "truncate":
        led.path.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        led.path.write_bytes(b"\x00\xff" * 50)
    elif damage == "empty":
        led.path.write_bytes(b"")
    elif damage == "edit":  # someone lowers the spend by hand; the checksum catches it
        doc = json.loads(raw)
        doc["body"]["rounds"] = []
        led.path.write_text(json.dumps(doc))
    else:
        doc = json.loads(raw)
        doc["body"]["rounds"][0]["sigma"] = "x"
        from hemafed.core.privacy.ledger import _checksum

        doc["sha256"] = _checksum(doc["body"])
        led.path.write_text(json.dumps(doc))
    with pytest.raises(LedgerCorrupt):
        PrivacyLedger("fed-A", 5.0, 1e-5, state=tmp_path)
    with pytest.raises(LedgerCorrupt):
        led.record_round(2, SIGMA, Q, STEPS, "h2")  # never resets to zero and carries on
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
    assert a.path != b.path
    a.record_round(1, SIGMA, Q, STEPS, "h")
    assert b.spent_epsilon() == 0.0
    assert ledger_path("hospital/fed 1", tmp_path).parent == tmp_path / "ledgers"
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
    led.path.write_bytes(b"{")
    assert cli_main(["ledger", "--state", str(tmp_path)]) == 1
