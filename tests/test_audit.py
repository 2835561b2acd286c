"""`hemafed audit` on a small federation in process (generated images, the product's machines, trainers, Skellam
shares, secure aggregation and ledgers): with the test-only fault that draws every noise share for σ/4 the audit
catches the plan's claim (ε̂ > ε); without it, it finds nothing (ε̂ ≤ ε) and measures the noise the plan promises.

The plan claims ε = 2 over 8 full-batch rounds (q = 1) with 3 sites, t = 3 and c = 1: the attacker colludes with
one site (which tells it its noise share and holds no canary), so what protects the other sites' canaries is
exactly the accounted noise. A one-run audit with m canaries can only certify an ε̂ of a few units (every guess
right among r gives at most logit(0.05^(1/r))), so the claim must be small for a fault to show.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from hemafed.core.learning.models import build_model
from hemafed.core.learning.recipe import with_budget
from hemafed.core.learning.site_trainer import SiteData
from hemafed.core.rounds.plan import FederationPlan
from hemafed.network.sim.audit import AuditOptions, AuditResult, audit_federation, draw_canaries
from hemafed.network.sim.audit_doc import audit_table, write_audit_doc
from hemafed.network.sim.audit_trainer import FAULTS, AuditTrainer

MODEL, SITES, ROUNDS, CLAIM = "scatter_linear_28", 3, 8, 2.0


def images(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, 8, n)
    x = rng.integers(0, 255, (n, 28, 28, 3), dtype=np.uint8)
    x[..., 0] = (labels * 30)[:, None, None]  # a learnable colour cue
    return x, labels


@pytest.fixture(scope="module")
def small_federation() -> tuple[FederationPlan, dict[str, SiteData], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    sites = {}
    for i in range(SITES):
        xt, yt = images(rng, 48)
        xv, yv = images(rng, 8)
        sites[f"site{i + 1}"] = SiteData(xt, yt, xv, yv)
    pool_x, pool_y = images(rng, 200)
    plan = FederationPlan(federation_id="audit-test", model=MODEL, algorithm="fedsgd", dp_mode="distributed",
                          rounds=ROUNDS, sample_rate=1.0, batch_size=144, clip_norm=1.0, server_lr=0.5,
                          threshold=SITES, min_sites=SITES, max_sites=SITES, dp_colluders=1, noise_multiplier=1.0,
                          delta=1e-5, join_timeout_s=5.0)
    dim = sum(p.numel() for p in build_model(MODEL).parameters())
    return with_budget(plan, CLAIM, "distributed", dim), sites, pool_x, pool_y


def audit(small_federation, tmp_path: Path, fault: str | None) -> AuditResult:
    plan, sites, pool_x, pool_y = small_federation
    opts = AuditOptions(canaries=8000, input_canaries=100, fault=fault, seed=1)
    return audit_federation(plan, sites, pool_x, pool_y, opts, budget=CLAIM,
                            seeds={name: i for i, name in enumerate(sites, start=1)}, state=tmp_path)


@pytest.mark.timeout(120)
def test_the_audit_catches_noise_drawn_for_a_quarter_of_sigma(small_federation, tmp_path: Path) -> None:
    result = audit(small_federation, tmp_path, "noise/4")
    assert result.claimed_epsilon == pytest.approx(CLAIM, abs=0.01)  # the ledger still claims ε = 2
    assert result.noise_ratio == pytest.approx(0.25, abs=0.02)  # the attacker sees a quarter of the noise
    assert result.gradient["epsilon_lower_bound"] > result.claimed_epsilon
    assert result.caught and result.plan["rounds_completed"] == ROUNDS


@pytest.mark.timeout(120)
def test_the_audit_finds_nothing_wrong_with_the_real_plan(small_federation, tmp_path: Path) -> None:
    result = audit(small_federation, tmp_path, None)
    assert result.noise_ratio == pytest.approx(1.0, abs=0.05)  # the noise the plan promises
    assert result.epsilon_lower_bound <= result.claimed_epsilon and not result.caught
    assert 0 < result.gradient["epsilon_lower_bound"] < 1.5  # some signal, as much as a tight ε = 2 allows
    assert result.gradient["canaries"] == 8000 and result.input["canaries"] == 100
    assert result.plan["colluding_sites"] == ["site3"]
    # the table the docs are generated from
    result.save(tmp_path / "results" / "real.json")
    assert AuditResult.load(tmp_path / "results" / "real.json").to_dict() == result.to_dict()
    written = write_audit_doc(tmp_path / "results", tmp_path / "AUDIT.md")
    text = (tmp_path / "AUDIT.md").read_text()
    assert len(written) == 1 and audit_table(written) in text and "not caught (ε̂ ≤ ε)" in text


def test_canaries_and_faults_are_what_they_claim() -> None:
    rng = np.random.default_rng(3)
    x, y = images(rng, 50)
    c = draw_canaries(rng, 1000, 400, x, y, 30, [0, 2], 8)
    assert len(set(c.coordinates)) == 400 and c.coordinates.max() < 1000
    assert 150 < c.included.sum() < 250 and set(c.site) == {0, 2} and set(c.images_site) == {0, 2}
    assert (c.labels != y[[list(map(bytes, x)).index(bytes(im)) for im in c.images]]).all()  # mislabelled
    with pytest.raises(ValueError):
        draw_canaries(rng, 1000, 501, x, y, 0, [0, 1, 2], 8)  # the attacker needs half the coordinates for the noise
    with pytest.raises(ValueError):
        AuditTrainer(replace(FederationPlan(federation_id="f", algorithm="fedsgd", dp_mode="local",
                                            noise_multiplier=1.0, model=MODEL)),
                     site="s", canaries=np.array([1]), expected=lambda *a: None, canary_seed=0, fault="noise/4")


def test_the_command_line_offers_exactly_the_audit_s_faults() -> None:
    from hemafed.gui.cli.research import AUDIT_CONTROLS

    assert set(AUDIT_CONTROLS) == set(FAULTS)


def test_no_site_can_switch_a_fault_on() -> None:
    """The faults exist only in the audit's trainer: a plan, site.toml and `hemafed site` know nothing of them."""
    import dataclasses

    from hemafed.network.config import SiteConfig

    names = {f.name for f in dataclasses.fields(FederationPlan)} | {f.name for f in dataclasses.fields(SiteConfig)}
    assert not {n for n in names if "fault" in n or "audit" in n}
    import ast
    import importlib

    importers = []
    for package in ("core", "network", "gui"):
        base = Path(importlib.import_module(f"hemafed.{package}").__file__).parent
        for path in base.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("audit_trainer"):
                    importers.append(f"{package}/{path.relative_to(base).as_posix()}")
    assert sorted(importers) == ["network/sim/audit.py", "network/sim/audit_doc.py"]


@pytest.mark.realdata
def test_a_sites_accepted_64_px_plan_is_audited_on_64_px_images(shared_data: Path) -> None:
    """`hemafed audit --site` audits the plan the site accepted: the hospitals' images are loaded at its model's size,
    whatever the simulation's own model is, or the audit fails mixing the two sizes."""
    from hemafed.core.learning.recipe import recommended_plan
    from hemafed.network.sim.audit import audit_hospitals
    from hemafed.network.sim.simulate import SimulationOptions

    small, large = "scatter_synth_inv_cc_lf_looks_hed_28", "scatter_synth_inv_cc_ms4p_lf_looks_hed_64"
    for sim_model, plan_model, side in ((small, large, 64), (large, small, 28)):
        opts = AuditOptions(sim=SimulationOptions(data=shared_data, subset=100, model=sim_model),
                            plan=recommended_plan(8.0, 100, 10, model=plan_model))
        h = audit_hospitals(opts)
        assert h.train.images.shape[1:3] == (side, side) and h.plan.model == plan_model
        assert audit_hospitals(replace(opts, plan=None)).plan.model == sim_model
