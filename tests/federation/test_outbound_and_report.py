"""After a real federation over TLS websockets (DP-FedSGD, distributed noise, secure aggregation): each site's
outbound log lists every message it sent — the same bytes, in the same order, that the aggregator received from
it — nothing unmasked left a site, and the site's signed privacy report is written, verifies, and fails to verify
after any one byte is changed."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import shutil
import subprocess
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from fedharness import make_federation, run

from hemafed.core.learning.models import build_model
from hemafed.core.learning.recipe import with_budget
from hemafed.core.privacy.store import SiteStore
from hemafed.core.trust.identity import load_identity
from hemafed.gui.cli import main as cli
from hemafed.network import outbound as O
from hemafed.network.report_signature import ReportSignatureError, verify_document
from hemafed.network.server import AggregatorServer
from hemafed.network.site_report import export_report, gather, to_html

pytestmark = pytest.mark.slow

ROUNDS, Q = 3, 0.3
MODEL = "scatter_linear_28"


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory):
    """Three sites, t = 2, three rounds; what the aggregator's server received from each site, message by message."""
    root = tmp_path_factory.mktemp("fed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HEMAFED_CACHE_DIR", str(root / "cache"))
        mp.setenv("HEMAFED_STATE_DIR", str(root / "state"))
        received: dict[str, list[tuple[int, str]]] = defaultdict(list)
        count = AggregatorServer._count

        def counting(self, site: str, data: bytes) -> None:
            count(self, site, data)
            received[site].append((len(data), hashlib.sha256(data).hexdigest()))

        mp.setattr(AggregatorServer, "_count", counting)
        fed = make_federation(root, n_sites=3, threshold=2, rounds=ROUNDS, images_per_site=48, model=MODEL,
                              algorithm="fedsgd", sample_rate=Q, server_lr=0.5, noise_multiplier=1.0)
        dim = sum(p.numel() for p in build_model(MODEL).parameters())
        plan = with_budget(replace(fed.plan, batch_size=round(Q * 3 * 43)), 30.0, "distributed", dim)
        fed.plan, fed.agg_config = plan, replace(fed.agg_config, plan=plan)
        fed.site_configs = {n: replace(c, operator=f"Dr. Operator of {n}") for n, c in fed.site_configs.items()}

        async def main() -> AggregatorServer:
            agg = await fed.start_aggregator()
            sites = [fed.start_site(n) for n in fed.site_configs]
            await agg
            await asyncio.wait_for(asyncio.gather(*sites), 60)
            assert fed.aggregator is not None and fed.aggregator.server is not None
            return fed.aggregator.server

        server = run(main(), timeout=300)
        yield fed, server, dict(received)


def test_each_site_logged_exactly_what_the_aggregator_received(federation) -> None:
    fed, server, received = federation
    for name, cfg in fed.site_configs.items():
        log = SiteStore(cfg.state_dir).outbound()
        assert [(r.bytes, r.sha256) for r in log] == received[name], name  # same bytes, same order
        assert sum(r.bytes for r in log) == server.received_bytes[name] > 0
        assert len(log) == server.received_messages[name]
        assert {r.federation_id for r in log} == {fed.plan.federation_id}
        # the handshake first, with the aggregator's certificate as the site saw it
        first = log[0]
        assert (first.kind, first.stage, first.protection, first.round) == ("auth", "handshake", "handshake", 0)
        seen = json.loads(first.detail)["certificate_sha256"]
        assert seen == hashlib.sha256(_leaf_der(fed.agg_config.cert)).hexdigest()
        # every round: keys, shares, the masked update, the consistency signature, the unmasking shares
        for rnd in range(1, ROUNDS + 1):
            kinds = [r.kind for r in log if r.round == rnd]
            assert kinds == ["secagg.advertise_keys", "secagg.encrypted_shares", "secagg.masked_input",
                             "secagg.survivor_signature", "secagg.unmask_shares"], (name, rnd, kinds)
        assert all(a.time <= b.time for a, b in itertools.pairwise(log))


def test_nothing_unmasked_left_a_site_of_a_secure_plan(federation) -> None:
    fed, _, _ = federation
    for cfg in fed.site_configs.values():
        log = SiteStore(cfg.state_dir).outbound()
        updates = [r for r in log if r.kind in O.UPDATE_KINDS]
        assert len(updates) == ROUNDS
        assert all(r.kind == "secagg.masked_input" and r.protection == O.NOISED_MASKED for r in updates)
        assert not [r for r in log if r.kind == "plain_update" or r.protection in (O.NOISED, O.UNPROTECTED)]
        assert {r.protection for r in log} == {O.HANDSHAKE, O.PLAIN, O.ENCRYPTED, O.NOISED_MASKED}
        # the masked update is the biggest thing a site sends: the ring vector, 4 bytes a coordinate
        dim = sum(p.numel() for p in build_model(MODEL).parameters())
        assert min(r.bytes for r in updates) > 4 * dim > max(r.bytes for r in log if r.kind not in O.UPDATE_KINDS)


def test_hemafed_site_outbound_prints_the_log(federation, capsys: pytest.CaptureFixture[str]) -> None:
    fed, server, _ = federation
    cfg = fed.site_configs["site1"]
    assert cli(["site", "--outbound", "--state", str(cfg.state_dir)]) == 0
    out = capsys.readouterr().out
    log = SiteStore(cfg.state_dir).outbound()
    assert all(r.sha256 in out for r in log)
    assert f"total: {len(log)} messages, {server.received_bytes['site1']:,} bytes" in out
    assert "secagg.masked_input" in out and "DP-noised + masked" in out


def test_the_acceptance_is_recorded_with_the_review_and_the_operator(federation) -> None:
    fed, _, _ = federation
    for name, cfg in fed.site_configs.items():
        (acc,) = SiteStore(cfg.state_dir).accepted_plans()
        assert acc["digest"] == fed.plan.digest() and acc["plan"] == json.loads(json.dumps(fed.plan.to_dict()))
        assert acc["operator"] == f"Dr. Operator of {name}" and acc["decided"] == "automatic"
        review = dict(acc["review"])
        assert "distributed" in review["differential privacy"] and "what the aggregator sees" in review


def test_the_site_report_is_signed_and_any_changed_byte_breaks_it(federation, tmp_path: Path) -> None:
    fed, _, _ = federation
    cfg = fed.site_configs["site2"]
    identity = load_identity(cfg.state_dir)
    report = gather(cfg.state_dir, identity)
    assert report.federation_id == fed.plan.federation_id and len(report.entries) == ROUNDS
    assert len(report.peers) == 3 and identity.fingerprint in report.peers
    assert report.aggregator_certificate == hashlib.sha256(_leaf_der(fed.agg_config.cert)).hexdigest()
    page = to_html(report)
    for text in ("In plain words", "Dr. Operator of site2", fed.plan.digest(), "ε after", report.package_digest[:8],
                 f"{len(report.outbound)} messages", "No audit of this plan is recorded"):
        assert text in page, text
    (path,) = export_report(report, identity, [tmp_path / "report.html"])
    data = path.read_bytes()
    assert verify_document(data, identity.fingerprint).fingerprint == identity.fingerprint
    rng = np.random.default_rng(0)
    for i in [0, len(data) // 2, len(data) - 2, *rng.integers(0, len(data), 40)]:
        changed = bytearray(data)
        changed[i] ^= 0x01
        with pytest.raises(ReportSignatureError):
            verify_document(bytes(changed))
    with pytest.raises(ReportSignatureError):  # a valid signature, but not by the key expected
        verify_document(data, load_identity(fed.site_configs["site1"].state_dir).fingerprint)


def test_the_pdf_report_via_the_command_line(federation, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("PySide6")
    fed, _, _ = federation
    cfg = fed.site_configs["site3"]
    pdf, html = tmp_path / "report.pdf", tmp_path / "report.html"
    assert cli(["report", "--site", str(cfg.state_dir), "--out", str(pdf), "--out", str(html)]) == 0
    assert pdf.read_bytes().startswith(b"%PDF-")
    fingerprint = load_identity(cfg.state_dir).fingerprint
    assert cli(["report", "--verify", str(pdf), "--expect", fingerprint]) == 0
    assert f"signed by the site key {fingerprint}" in capsys.readouterr().out
    broken = tmp_path / "broken.pdf"
    data = bytearray(pdf.read_bytes())
    data[len(data) // 3] ^= 0x20
    broken.write_bytes(bytes(data))
    assert cli(["report", "--verify", str(broken)]) == 1
    assert "NOT VALID" in capsys.readouterr().out
    if shutil.which("pdftotext"):  # what a reader sees: the plain words come first
        text = subprocess.run(["pdftotext", str(pdf), "-"], capture_output=True, text=True, check=True).stdout
        assert text.index("In plain words") < text.index("The federation") < text.index("Every round")
        assert "page 1 of" in text


def _leaf_der(cert_file: Path) -> bytes:
    from hemafed.core.trust.certs import leaf_certificate_der

    return leaf_certificate_der(cert_file)


@pytest.mark.realdata
def test_an_audit_of_the_accepted_plan_goes_into_the_report(federation, shared_data: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """`hemafed audit --site` audits the plan this site accepted (on BloodMNIST hospitals, few canaries here) and
    records the result in the site's store; the report then shows ε̂ next to ε."""
    fed, _, _ = federation
    cfg = fed.site_configs["site1"]
    out = tmp_path / "audit.json"
    assert cli(["audit", "--site", str(cfg.state_dir), "--subset", "600", "--canaries", "400",
                "--input-canaries", "40", "--data", str(shared_data), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ε̂ (95 %) gradient canaries" in printed and "not caught" in printed
    (audit,) = SiteStore(cfg.state_dir).audits(fed.plan.digest())
    assert audit["result"]["plan"]["digest"] == fed.plan.digest() and json.loads(out.read_text()) == audit["result"]
    assert audit["result"]["plan"]["rounds_completed"] == ROUNDS
    assert audit["result"]["claimed_epsilon"] <= 30.0 and not audit["result"]["caught"]
    page = to_html(gather(cfg.state_dir, load_identity(cfg.state_dir)))
    assert "ε̂ from gradient canaries" in page and "No audit of this plan" not in page
    assert cli(["audit", "--site", str(cfg.state_dir), "--control", "noise/4"]) == 1  # never recorded for a site
