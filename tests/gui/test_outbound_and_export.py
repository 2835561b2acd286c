"""The app's *What left this computer* page and *Export privacy report…*: a site store written through the real
ledger, outbound log and acceptance record (no federation needed), shown and exported from real widgets."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np

from hemafed.core.privacy.ledger import PrivacyLedger, Protection
from hemafed.core.privacy.store import SiteStore
from hemafed.core.rounds import round_messages as M
from hemafed.core.rounds.plan import FederationPlan
from hemafed.core.secagg import MaskedInput, encode
from hemafed.core.trust.identity import init_identity
from hemafed.network.envelope import Envelope
from hemafed.network.outbound import OutboundLog
from hemafed.network.plan_review import plan_rows
from hemafed.network.report_signature import verify_document

ROUNDS = 4


def fill_site(state_dir: Path) -> FederationPlan:
    """A site that joined `fed-gui`, accepted its plan and trained ROUNDS rounds, sending a masked update each."""
    plan = FederationPlan(federation_id="fed-gui", algorithm="fedsgd", dp_mode="distributed", noise_multiplier=2.6,
                          rounds=ROUNDS)
    store = SiteStore(state_dir)
    store.record_plan_acceptance(plan.federation_id, plan.digest(), plan.to_dict(), operator="Dr. A. Example",
                                 decided="operator", aggregator='{"url": "wss://agg.example:8765", '
                                 f'"certificate_sha256": "{"ab" * 32}"}}', review=plan_rows(plan, None, 8.0, ()),
                                 time=1.7e9)
    ledger = PrivacyLedger(plan.federation_id, 8.0, 1e-5, state=state_dir)
    clock = iter(np.arange(1.7e9, 1.7e9 + 1000, 7.0))
    log = OutboundLog(store, lambda: (plan.federation_id, plan), now=lambda: float(next(clock)))
    for env in (Envelope("auth", 0, {"key": "k", "sig": "s"}), Envelope(M.PLAN_ACCEPT, 0, {"digest": plan.digest()})):
        log(env, env.encode())
    for rnd in range(1, ROUNDS + 1):
        ledger.record_round(rnd, 2.6, 0.17, 1, hashlib.sha256(bytes([rnd])).hexdigest(),
                            protection=Protection(dp_mode="distributed", mechanism="skellam", l2_sensitivity=100.0,
                                                  l1_sensitivity=1e4, threshold=6, colluders=1, share_variance=1.0))
        masked = MaskedInput(rnd, 3, np.arange(100, dtype=np.uint32))
        env = Envelope(M.SECAGG, rnd, {}, (encode(masked),))
        log(env, env.encode())
    return plan


def test_what_left_this_computer_lists_and_totals_every_message(qtbot, window) -> None:
    plan = fill_site(window.state.state_dir)
    page = window.outbound_page
    window.show_page(page.title)
    page.reload()
    records = SiteStore(window.state.state_dir).outbound()
    assert page.federation.currentText() == plan.federation_id
    assert page.messages.rowCount() == len(records) == 2 + ROUNDS
    assert [page.messages.item(r, 6).text() for r in range(len(records))] == [r.sha256 for r in records]
    total = sum(r.bytes for r in records)
    assert f"{len(records)} messages, {total:,} bytes" in page.summary.text()
    assert f"{ROUNDS} carried a model update, every one masked and noised" in page.summary.text()
    kinds = {page.kinds.item(r, 0).text(): page.kinds.item(r, 1).text() for r in range(page.kinds.rowCount())}
    assert kinds == {"auth": "handshake", M.PLAN_ACCEPT: "plain", "secagg.masked_input": "DP-noised + masked"}
    assert page.rounds.rowCount() == ROUNDS + 1 and page.rounds.item(0, 0).text() == "joining"


def test_export_privacy_report_from_the_app_writes_a_signed_pdf(qtbot, window, tmp_path: Path) -> None:
    from hemafed.gui.app.report_export import write_report

    fill_site(window.state.state_dir)
    identity = init_identity(window.state.state_dir)
    window.state.refresh_ledgers()
    window.show_page("privacy")
    page = window.privacy_page
    assert page.export_btn.text() == "Export privacy report…" and page.selected_federation() == "fed-gui"
    message = write_report(window.state, tmp_path / "r.pdf", page.selected_federation())
    page.show_export(True, message)
    assert page.export_note.isVisible() and "signed with this site's key" in page.export_note.text()
    assert "r.pdf" in page.export_note.text()
    data = (tmp_path / "r.pdf").read_bytes()
    assert data.startswith(b"%PDF") and verify_document(data, identity.fingerprint).fingerprint == identity.fingerprint
    assert window.outbound_page.export_btn.text() == "Export privacy report…"


def test_the_operator_name_is_kept_and_goes_into_the_site_config(qtbot, window) -> None:
    fed = window.federation_page
    fed.operator.setText("  Dr.   B.  Example ")
    fed.operator.editingFinished.emit()
    assert window.state.operator == "Dr. B. Example"
    assert window.state.settings.get_str("site/operator") == "Dr. B. Example"


def test_the_reports_example_pages_are_the_pdfs_pages_as_images(qtbot, tmp_path: Path) -> None:
    """`report_pdf.html_to_images` lays the report out as `html_to_pdf` does (A4, the same margins and footer), so
    the documentation's example pages show what the PDF holds: as many pages, text on each, the footer's "page i of
    n"; `main` writes the first of them as PNG files."""
    from PySide6.QtGui import QImage

    from hemafed.gui.app.report_pdf import html_to_images, html_to_pdf, main

    html = "<h1>Privacy report</h1>" + "".join(f"<p>Round {i}: one clipped, noised sum.</p>" for i in range(150))
    pdf = html_to_pdf(html, "t", "footer text")
    pages = html_to_images(html, "footer text")
    assert len(pages) == len(re.findall(rb"/Type\s*/Page(?![a-z])", pdf)) > 1
    for image in pages:
        assert image.width() == 1240 and abs(image.height() / image.width() - 297 / 210) < 0.01
        grey = image.convertToFormat(QImage.Format.Format_Grayscale8)
        dark = sum(1 for y in range(0, grey.height(), 7) for x in range(0, grey.width(), 7)
                   if grey.pixel(x, y) & 0xFF < 128)
        assert dark > 100  # text, not a blank page
    assert len(html_to_images(html, pages=1, width=600)) == 1
    source = tmp_path / "r.html"
    source.write_text(html, encoding="utf-8")
    assert main([str(source), str(tmp_path / "page"), "--pages", "2"]) == 0
    assert QImage(str(tmp_path / "page-2.png")).width() == 1240 and not (tmp_path / "page-3.png").exists()
