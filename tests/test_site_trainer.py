"""The one site trainer: what the app projects is what the ledger records, a round records what it trained
(before anything can leave), refusals and cancellations record nothing, features are computed once per image,
and nothing else in the product fits σ, projects ε or adds noise."""

from __future__ import annotations

import ast
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from hemafed.core.learning.feature_cache import FeatureCache, FeatureKind
from hemafed.core.learning.fedsgd import FedSGDServer, server_round
from hemafed.core.learning.models import build_model, get_flat_params, model_hash
from hemafed.core.learning.recipe import with_budget
from hemafed.core.learning.site_trainer import (
    FedAvgTrainer,
    FedSGDTrainer,
    SiteData,
    TrainingCancelled,
    site_trainer,
)
from hemafed.core.privacy.ledger import BudgetExhausted, PrivacyLedger
from hemafed.core.rounds.plan import FederationPlan, SiteBounds
from hemafed.core.rounds.site_round import PlanRefused
from hemafed.core.secagg.prg import RING_DTYPE
from hemafed.core.secagg.quantize import dequantize

ROUNDS = 6


def _data(n: int, seed: int, n_val: int = 12) -> SiteData:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n + n_val, 28, 28, 3), dtype=np.uint8)
    labels = rng.integers(0, 8, n + n_val)
    return SiteData(images[:n], labels[:n], images[n:], labels[n:])


def _fedsgd_plan(mode: str, epsilon: float = 8.0, **kw) -> FederationPlan:
    plan = FederationPlan(federation_id=f"t-{mode}", model="scatter_linear_28", rounds=ROUNDS, sample_rate=0.3,
                          threshold=2, min_sites=2, max_sites=3, batch_size=30, **kw)
    return with_budget(plan, epsilon, mode, recipe_lr=True)


def _fedavg_plan(secagg: bool) -> FederationPlan:
    return FederationPlan(federation_id=f"avg-{secagg}", model="cnn4_28", algorithm="fedavg", dp_mode="local",
                          noise_multiplier=0.0, rounds=3, batch_size=8, threshold=2, min_sites=2, max_sites=3,
                          secagg=secagg, max_weight=4096)


@pytest.fixture
def cache(tmp_path: Path) -> FeatureCache:
    return FeatureCache(tmp_path / "features.sqlite")


@pytest.mark.parametrize("mode", ["local", "distributed"])
def test_fedsgd_rounds_record_exactly_the_projection_the_app_shows(tmp_path: Path, cache: FeatureCache,
                                                                    mode: str) -> None:
    plan = _fedsgd_plan(mode)
    sites = []
    for i in range(3):
        ledger = PrivacyLedger(plan.federation_id, 8.0, 1e-5, state=tmp_path / f"s{i}")
        trainer = site_trainer(plan, feature_cache=cache)
        shown = trainer.project(8.0, 40, None)  # what the Privacy page shows before joining (same n, no ledger)
        proj = trainer.prepare(ledger, _data(40, i), 8.0)
        assert proj.epsilon_per_round == shown.epsilon_per_round and len(proj.epsilon_per_round) == ROUNDS
        assert proj.sigma == plan.noise_multiplier and proj.fits and proj.mode == mode
        trainer.featurize()
        sites.append((trainer, ledger))
    server = FedSGDServer(plan.server_lr, plan.momentum)
    privacy = sites[0][0].privacy
    w = get_flat_params(build_model(plan.model, 8)).astype(np.float32)
    cfg = plan.secagg_config(len(w))
    for rnd in range(1, ROUNDS + 1):
        ring = np.zeros(cfg.vector_len, RING_DTYPE)
        for trainer, ledger in sites:
            before = ledger.rounds
            c = trainer.contribution(rnd, w)
            assert ledger.rounds == before + 1 and c.entry.model_hash == model_hash(w)  # recorded before it left
            ring += c.ring
        w, extras = server_round(server, privacy, w, ring)
        assert np.isfinite(w).all() and extras[:64].sum() == 3 * 12  # every site's validation images, counted once
    for trainer, ledger in sites:
        recorded = [e.epsilon for e in ledger.entries]
        assert recorded == list(trainer.projection.epsilon_per_round)  # exactly, round by round
        assert ledger.spent_epsilon() <= 8.0 and ledger.spent_epsilon() > 0.95 * 8.0
        last = ledger.entries[-1]
        assert last.dp_mode == mode and last.mechanism == ("skellam" if mode == "distributed" else "gaussian")
        # a site that comes back (a restart) projects the rest of the plan on top of what it spent
        again = site_trainer(plan, feature_cache=cache).project(8.0, 40, PrivacyLedger(plan.federation_id,
                                                                                      state=ledger.store.state))
        assert again.rounds_done == ROUNDS and again.epsilon_per_round == () and again.spent == recorded[-1]


@pytest.mark.parametrize("secagg", [True, False])
def test_fedavg_rounds_record_exactly_the_projection_the_app_shows(tmp_path: Path, secagg: bool) -> None:
    plan = _fedavg_plan(secagg)
    ledger = PrivacyLedger(plan.federation_id, 5.0, 1e-5, state=tmp_path)
    trainer = site_trainer(plan, seed=7, bounds=SiteBounds(require_secagg=secagg))
    assert isinstance(trainer, FedAvgTrainer)
    shown = trainer.project(5.0, 32, None)
    proj = trainer.prepare(ledger, _data(32, 0, n_val=8), 5.0)
    assert proj.sigma == shown.sigma and proj.epsilon_per_round == shown.epsilon_per_round
    assert proj.steps_per_round == 4 and proj.sample_rate == 0.25
    w = get_flat_params(build_model(plan.model, 8, seed=0))
    for rnd in (1, 2, 3):
        c = trainer.contribution(rnd, w)
        assert (c.ring is not None) == secagg and c.update is not None  # a secure plan sends only the ring
        if secagg:
            update_sum, weight, _ = dequantize(plan.secagg_config(len(w)), c.ring)
            assert weight == 32 and np.isfinite(update_sum).all()
    assert [e.epsilon for e in ledger.entries] == list(proj.epsilon_per_round)
    assert [(e.sigma, e.sample_rate, e.steps) for e in ledger.entries] == [(proj.sigma, 0.25, 4)] * 3


def test_a_round_re_run_after_an_aggregator_restart_is_charged_and_the_last_round_still_fits(tmp_path: Path) -> None:
    """Local DP: the re-run is a second release, so it is charged; σ is fitted again for the rounds left (from
    the count alone), so the plan still ends inside the budget instead of the site declining its last round."""
    plan = _fedavg_plan(True)
    ledger = PrivacyLedger(plan.federation_id, 5.0, 1e-5, state=tmp_path)
    trainer = site_trainer(plan, seed=7)
    proj = trainer.prepare(ledger, _data(32, 0, n_val=8), 5.0)
    w = get_flat_params(build_model(plan.model, 8, seed=0))
    for rnd in (1, 2, 2, 3):  # the aggregator restarted after this site had sent round 2
        trainer.contribution(rnd, w)
    assert [e.round for e in ledger.entries] == [1, 2, 2, 3]
    sigmas = [e.sigma for e in ledger.entries]
    assert sigmas[:2] == [proj.sigma] * 2 and sigmas[2] == sigmas[3] > proj.sigma
    assert proj.epsilon_per_round[-1] - 0.01 < ledger.spent_epsilon() <= 5.0
    assert trainer.projection.sigma == sigmas[2]  # what the app shows from now on


def test_a_budget_too_small_is_refused_before_anything_is_recorded(tmp_path: Path, cache: FeatureCache) -> None:
    plan = _fedsgd_plan("distributed", epsilon=8.0)
    ledger = PrivacyLedger(plan.federation_id, 5.0, 1e-5, state=tmp_path)
    trainer = site_trainer(plan, feature_cache=cache)
    with pytest.raises(PlanRefused, match="budget is too small") as info:
        trainer.prepare(ledger, _data(40, 0), 5.0)
    assert "raise this site's ε budget" in info.value.what_to_do
    proj = trainer.project(5.0, 40, ledger)
    assert not proj.fits and 0 < proj.rounds_allowed < ROUNDS
    assert ledger.rounds == 0


def test_a_budget_other_than_the_ledgers_is_refused(tmp_path: Path) -> None:
    plan = _fedavg_plan(True)
    ledger = PrivacyLedger(plan.federation_id, 5.0, 1e-5, state=tmp_path)
    proj = site_trainer(plan).project(8.0, 32, ledger)
    assert not proj.fits and "holds ε = 5" in proj.refusal and "hemafed ledger budget" in proj.what_to_do


def test_the_sites_bounds_are_checked_in_the_projection() -> None:
    plan = _fedsgd_plan("distributed")
    proj = site_trainer(plan, bounds=SiteBounds(require_local_dp=True)).project(8.0, 40, None)
    assert not proj.fits and "requires local DP" in proj.refusal


def test_an_exhausted_budget_declines_before_training_and_records_nothing(tmp_path: Path) -> None:
    plan = _fedavg_plan(True)
    ledger = PrivacyLedger(plan.federation_id, 5.0, 1e-5, state=tmp_path)
    trainer = site_trainer(plan)
    proj = trainer.prepare(ledger, _data(32, 0, n_val=8), 5.0)
    # another process (a second copy of the site) spends the plan's three rounds behind the trainer's back
    other = PrivacyLedger(plan.federation_id, state=tmp_path)
    for rnd in (1, 2, 3):
        other.record_round(rnd, proj.sigma, proj.sample_rate, proj.steps_per_round, "h")
    w = get_flat_params(build_model(plan.model, 8, seed=0))
    with pytest.raises(BudgetExhausted):
        trainer.contribution(4, w)
    assert PrivacyLedger(plan.federation_id, state=tmp_path).rounds == 3


def test_a_cancelled_round_records_nothing(tmp_path: Path, cache: FeatureCache) -> None:
    for plan in (_fedavg_plan(True), _fedsgd_plan("distributed")):
        ledger = PrivacyLedger(plan.federation_id, 8.0, 1e-5, state=tmp_path / plan.federation_id)
        trainer = site_trainer(plan, feature_cache=cache)
        trainer.prepare(ledger, _data(40, 0), 8.0)
        trainer.featurize()
        w = get_flat_params(build_model(plan.model, 8, seed=0))
        with pytest.raises(TrainingCancelled):
            trainer.contribution(1, w, cancel=lambda: True)
        assert PrivacyLedger(plan.federation_id, state=ledger.store.state).rounds == 0


def test_a_seeded_trainer_replays_exactly_and_an_unseeded_one_does_not(tmp_path: Path, cache: FeatureCache) -> None:
    plan = _fedsgd_plan("distributed")
    rings = []
    for name, seed in (("a", 5), ("b", 5), ("c", None)):
        ledger = PrivacyLedger(plan.federation_id, 8.0, 1e-5, state=tmp_path / name)
        trainer = site_trainer(plan, seed=seed, feature_cache=cache)
        trainer.prepare(ledger, _data(40, 0), 8.0)
        rings.append(trainer.contribution(1, get_flat_params(build_model(plan.model, 8, seed=0))).ring)
    assert np.array_equal(rings[0], rings[1]) and not np.array_equal(rings[0], rings[2])


def test_features_are_computed_once_per_image_and_model(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "f.sqlite")
    kind = FeatureKind("m", "train", "1")
    images = np.random.default_rng(0).integers(0, 256, (10, 28, 28, 3), dtype=np.uint8)
    computed: list[int] = []

    def compute(batch: np.ndarray):
        import torch

        computed.append(len(batch))
        return torch.as_tensor(batch.reshape(len(batch), -1)[:, :5].astype(np.float32))

    seen: list[tuple[int, int]] = []
    first = cache.features(kind, images, compute, progress=lambda d, t, left: seen.append((d, t)), chunk=4)
    assert sum(computed) == 10 and seen[-1] == (10, 10)
    # the same images in another order, with one new one: only the new one is computed
    more = np.concatenate([images[::-1], images[:1] + 1])
    again = cache.features(kind, more, compute)
    assert sum(computed) == 11
    np.testing.assert_array_equal(again[:10].numpy(), first.numpy()[::-1])
    # another model or code version never reads these
    cache.features(replace(kind, version="2"), images, compute)
    assert sum(computed) == 21
    with pytest.raises(Exception, match="stopped"):
        cache.features(replace(kind, model="other"), images, compute, cancel=lambda: True)


class CountingCache(FeatureCache):
    """A feature cache that counts the vectors it had to compute and store."""

    stored = 0

    def _store(self, kind, digests, vectors) -> None:
        self.stored += len(digests)
        super()._store(kind, digests, vectors)


def test_a_second_federation_on_the_same_images_reads_the_features_back(tmp_path: Path) -> None:
    cache = CountingCache(tmp_path / "f.sqlite")
    data = _data(30, 1)
    plans = [_fedsgd_plan("distributed"), replace(_fedsgd_plan("distributed"), federation_id="another")]
    inputs = []
    for i, plan in enumerate(plans):
        trainer = site_trainer(plan, feature_cache=cache)
        trainer.prepare(PrivacyLedger(plan.federation_id, 8.0, 1e-5, state=tmp_path / str(i)), data, 8.0)
        progress: list[tuple[int, int, float | None]] = []
        trainer.featurize(progress=lambda d, t, left, p=progress: p.append((d, t, left)))
        inputs.append(trainer.inputs)
        assert progress[-1] == (42, 42, 0.0)
        assert cache.stored == 42  # the first federation computed them all; the second, none
    np.testing.assert_array_equal(inputs[0].numpy(), inputs[1].numpy())


def test_the_recipe_model_trains_on_its_cached_evaluation_view(tmp_path: Path) -> None:
    plan = with_budget(FederationPlan(federation_id="inv", rounds=3, sample_rate=0.5, threshold=2, min_sites=2,
                                      max_sites=3, batch_size=10), 8.0)
    trainer = site_trainer(plan, feature_cache=FeatureCache(tmp_path / "f.sqlite"))
    assert isinstance(trainer, FedSGDTrainer)
    trainer.prepare(PrivacyLedger("inv", 8.0, 1e-5, state=tmp_path), _data(12, 2, n_val=4), 8.0)
    trainer.featurize()
    from hemafed.core.learning.models import evaluation_features, images_to_tensor

    direct = evaluation_features(trainer.model)(images_to_tensor(trainer.data.train_images, plan.input_size))
    np.testing.assert_allclose(trainer.inputs.numpy(), direct.reshape(len(direct), -1).numpy(), atol=2e-6)


# -------------------------------------------------------------------------------- the one noise step

# What fits σ to a budget, projects ε per round, adds DP noise or runs a DP training step. Only the privacy
# room (where they are defined), the site trainer, and the recipe's plan σ (which calls the trainer's) may
# call them; `core/learning/dp_train.py`'s DP-SGD loop is the FedAvg trainer's step and defines its noise.
GUARDED = {"calibrate_sigma", "max_rounds", "plan_privacy", "projected_epsilon", "epsilon_curve", "gaussian_noise",
           "noise_hook", "train_local", "clipped_round_sum", "clipped_gradient_sum", "epsilon_of", "skellam_noise",
           "fedsgd_plan_sigma", "quantize"}
ALLOWED = {
    "core/privacy/accounting.py", "core/privacy/calibration.py", "core/privacy/distributed_noise.py",
    "core/privacy/ledger.py",  # the ledger checks the budget itself before it records a round
    "core/learning/site_trainer.py",
    "core/learning/fedsgd.py",  # clipped_round_sum calls clipped_gradient_sum: the clipping, no noise
    "core/learning/recipe.py",  # the admin's plan σ, through site_trainer.fedsgd_plan_sigma
    "core/secagg/site.py",  # quantize for callers that hand it a float update (tests, benchmarks)
    # The privacy audit's trainer (a FedSGDTrainer subclass only `hemafed audit`'s in-process federation builds):
    # it computes the real records' expected clipped sum, q·Σ clip(∇ℓ_i) — what the DP adversary knows — with no
    # noise; its test-only fault changes the noise share's σ through the trainer's own `privacy`, calling nothing.
    "network/sim/audit_trainer.py",
}


def test_sigma_epsilon_per_round_and_noise_are_computed_only_in_the_trainer() -> None:
    import importlib

    found = []
    for package in ("core", "network", "gui"):
        base = Path(importlib.import_module(f"hemafed.{package}").__file__).parent
        for path in sorted(base.rglob("*.py")):
            rel = f"{package}/{path.relative_to(base)}"
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call):
                    f = node.func
                    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
                    if name in GUARDED and rel not in ALLOWED:
                        found.append(f"{rel}:{node.lineno} calls {name}")
    assert not found, "σ, ε per round or noise computed outside the site trainer:\n" + "\n".join(found)


def test_the_final_models_calibration_comes_from_this_sites_validation_images(tmp_path: Path,
                                                                              cache: FeatureCache) -> None:
    """What the site fits when the federation ends (network.site._calibrate): the logits of its own validation
    images under the final model, whose answers are the ones the rounds' validation counts report."""
    from hemafed.core.learning.classify import load_model_file
    from hemafed.core.learning.confidence import Calibration
    from hemafed.core.learning.dp_train import evaluate
    from hemafed.network.site import save_model_file

    plan = _fedsgd_plan("distributed")
    trainer = site_trainer(plan, feature_cache=cache)
    data = _data(40, 0, n_val=48)
    trainer.prepare(PrivacyLedger(plan.federation_id, 8.0, 1e-5, state=tmp_path), data, 8.0)
    w = get_flat_params(build_model(plan.model, 8, seed=1)).astype(np.float32)
    logits, labels = trainer.validation_logits(w)
    assert logits.shape == (48, 8) and (labels == data.val_labels).all()
    confusion = evaluate(trainer.trainable, trainer.val_inputs, trainer.val_labels, 8)
    assert np.array_equal(np.bincount(labels * 8 + logits.argmax(1), minlength=64).reshape(8, 8), confusion)
    cal = Calibration.fit(logits, labels)
    assert cal is not None and cal.images == 48 and cal.nll_after <= cal.nll_before
    saved = load_model_file(save_model_file(tmp_path / "final.npz", w, plan, ROUNDS, cal))
    assert saved.calibration == cal
