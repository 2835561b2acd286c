"""The cell check ("not an image of a single blood cell"): its statistics ride in the training rounds within each
record's clip norm, the aggregator averages them, and a model file with them flags noise and whole fields.

Images are generated: a "cell" is a stained disc in the middle of a pale background with a few pale discs (red
cells) around it; a "field" tiles nine of them at a third of the scale; noise is uniform."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hemafed.core.learning.cell_check import (
    DIM,
    EIGEN_FLOOR,
    GRADIENT_SHARE,
    MOMENT_LEN,
    MOMENT_RADIUS,
    MOMENT_SHARE,
    CellStats,
    fit_threshold,
    measurements,
    moment_vector,
    standardised,
)
from hemafed.core.learning.classify import classify_paths, load_model_file
from hemafed.core.learning.confidence import Calibration
from hemafed.core.learning.fedsgd import FedSGDServer, clipped_round_sum, moments_layout


def _disc(img: np.ndarray, cy: float, cx: float, r: float, colour: np.ndarray) -> None:
    yy, xx = np.mgrid[:img.shape[0], :img.shape[1]]
    img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = colour


def cells(n: int, seed: int, size: int = 28) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.zeros((n, size, size, 3), np.uint8)
    for i in range(n):
        img = np.empty((size, size, 3), np.float64)
        img[:] = np.array([245, 215, 205]) + rng.normal(0, 6, 3)
        for _ in range(rng.integers(2, 6)):  # red cells, off centre
            angle = rng.uniform(0, 2 * np.pi)
            _disc(img, size / 2 + 11 * np.sin(angle), size / 2 + 11 * np.cos(angle), 4.5,
                  np.array([225, 170, 170]) + rng.normal(0, 5, 3))
        _disc(img, size / 2 + rng.normal(0, 0.7), size / 2 + rng.normal(0, 0.7), rng.uniform(6, 9),
              np.array([110, 70, 160]) + rng.normal(0, 12, 3))
        out[i] = np.clip(img + rng.normal(0, 3, img.shape), 0, 255)
    return out


def fields(n: int, seed: int) -> np.ndarray:
    from PIL import Image

    tiles = cells(9 * n, seed, size=84)
    out = []
    for i in range(n):
        canvas = np.concatenate([np.concatenate(list(tiles[9 * i + 3 * r: 9 * i + 3 * r + 3]), 1)
                                 for r in range(3)], 0)
        out.append(np.asarray(Image.fromarray(canvas).resize((28, 28), Image.BILINEAR)))
    return np.stack(out)


@pytest.fixture(scope="module")
def stats() -> tuple[np.ndarray, float]:
    """Noise-free moments of 800 generated cells and the threshold set on 300 others."""
    moments = moment_vector(standardised(cells(800, 0))).mean(0)
    threshold = fit_threshold(moments, cells(300, 1), min_images=20)
    assert threshold is not None
    return moments, threshold


def test_the_moments_recover_the_mean_and_covariance() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(0, 0.3, (DIM, DIM))
    z = rng.normal(0, 1, (20000, DIM)) @ a.T * 0.3 + 0.2
    got = CellStats.from_moments(moment_vector(z).mean(0))
    assert got is not None
    np.testing.assert_allclose(got.mean, z.mean(0), atol=1e-9)
    cov = np.cov(z.T, bias=True)
    values, vectors = np.linalg.eigh(cov)
    expected = (vectors / np.maximum(values, EIGEN_FLOOR)) @ vectors.T
    np.testing.assert_allclose(got.precision, expected, rtol=1e-6, atol=1e-6)
    assert CellStats.from_moments(np.zeros(MOMENT_LEN)) is None  # not estimated yet


def test_no_images_give_no_measurements() -> None:
    assert standardised(np.zeros((0, 28, 28, 3), np.uint8)).shape == (0, DIM)
    assert moment_vector(np.zeros((0, DIM))).shape == (0, MOMENT_LEN)


def test_a_64_px_model_checks_the_image_at_28_px(stats) -> None:
    """The measurements are taken at 28 px whatever the model's input (the public standardisation and the
    threshold were set there): a 64-px image measures and scores as its 28-px resize through the check's own
    resampling window (`RESAMPLE`, not the bilinear one that made the 64-px image)."""
    from hemafed.core.data.imaging import resize_array_batch
    from hemafed.core.learning.cell_check import RESAMPLE

    big = np.concatenate([cells(10, 8, size=64), resize_array_batch(fields(10, 9), 64)])
    small = resize_array_batch(big, 28, RESAMPLE)
    assert not np.array_equal(small, resize_array_batch(big, 28))
    np.testing.assert_array_equal(measurements(big), measurements(small))
    check = CellStats.from_moments(stats[0])
    np.testing.assert_array_equal(check.scores(big), check.scores(small))


def test_noise_and_whole_fields_are_flagged_and_new_cells_are_not(stats) -> None:
    moments, threshold = stats
    check = CellStats.from_moments(moments)
    noise = np.random.default_rng(5).integers(0, 256, (30, 28, 28, 3), dtype=np.uint8)
    assert (check.scores(noise) > threshold).all()
    assert (check.scores(fields(30, 6)) > threshold).all()
    assert np.mean(check.scores(cells(400, 7)) > threshold) <= 0.05  # 1.5 % on its own validation images


def test_a_record_moves_the_round_vector_by_at_most_the_clip_norm() -> None:
    from hemafed.core.learning.models import build_model, split_features

    head = split_features(build_model("scatter_synth_inv_cc_28", 8, seed=0))[1]
    head.center.data[:] = 1.0  # centred: the rounds that carry moments
    where = moments_layout(head)
    assert where is not None and where.stop - where.start == MOMENT_LEN
    x = torch.randn(6, head.linear.in_features) * 50
    y = torch.arange(6) % 8
    big = torch.as_tensor(moment_vector(np.random.default_rng(0).normal(0, 30, (6, DIM))))
    for i in range(6):
        gs = clipped_round_sum(head, x[i:i + 1], y[i:i + 1], 1.0, 2.0, moments=big[i:i + 1])
        v = gs.vector.astype(np.float64)
        rest = np.ones(len(v), bool)
        rest[where] = False
        assert np.linalg.norm(v) <= 2.0 * (1 + 1e-5)
        assert np.linalg.norm(v[where]) == pytest.approx(MOMENT_SHARE * 2.0, rel=1e-5)  # clipped at R
        assert np.linalg.norm(v[rest]) <= GRADIENT_SHARE * 2.0 * (1 + 1e-5)
    with pytest.raises(ValueError, match="moments"):
        clipped_round_sum(head, x, y, 1.0, 2.0)


def test_the_aggregator_averages_the_rounds_moments_and_keeps_the_count() -> None:
    server = FedSGDServer(lr=0.1)
    where = slice(2, 5)
    weights = np.zeros(5, np.float32)
    weights[:2] = 1.0
    batch, clip = 100.0, 2.0
    estimates = [np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0]), np.array([2.0, 5.0, 2.0])]
    for est in estimates:
        noisy = np.zeros(5)
        noisy[where] = est * batch * MOMENT_SHARE * clip / MOMENT_RADIUS
        weights = server.apply(weights, noisy, batch, clip_norm=clip, moments=where)
    np.testing.assert_allclose(weights[where], np.mean(estimates, 0), rtol=1e-5)
    np.testing.assert_allclose(weights[:2], 1.0)  # the moments took no gradient step
    again = FedSGDServer(lr=0.1)
    again.load_state(server.state())
    assert again.moment_rounds == 3


def cell_check_model(path: Path) -> Path:
    """A model file whose cell check knows the generated cells (noise-free moments; threshold on 300 others)."""
    from hemafed.core.learning.models import build_model, get_flat_params, split_features
    from hemafed.core.rounds.plan import FederationPlan
    from hemafed.network.site import save_model_file

    moments = moment_vector(standardised(cells(800, 0))).mean(0)
    model = build_model("scatter_synth_inv_cc_28", 8, seed=0)
    split_features(model)[1].cell_moments.data[:] = torch.as_tensor(moments, dtype=torch.float32)
    plan = FederationPlan(federation_id="cc", model="scatter_synth_inv_cc_28", threshold=2, min_sites=2)
    cal = Calibration(temperature=1.5, threshold=0.5, coverage_target=0.95, images=300, ece_before=None,
                      ece_after=None, nll_before=None, nll_after=None,
                      not_a_cell_threshold=fit_threshold(get_flat_params(split_features(model)[1])[
                          moments_layout(split_features(model)[1])], cells(300, 1), min_images=20),
                      not_a_cell_false_alarms=0.015)
    return save_model_file(path, get_flat_params(model), plan, 3, cal)


def test_classify_says_not_recognised_with_the_reason(stats, tmp_path: Path) -> None:
    from PIL import Image

    _, threshold = stats
    path = cell_check_model(tmp_path / "final.npz")
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (60, 60, 3), dtype=np.uint8)).save(folder / "noise.png")
    Image.fromarray(cells(1, 9)[0]).save(folder / "cell.png")  # at the model's input size
    loaded = load_model_file(path)
    assert loaded.calibration.not_a_cell_threshold == pytest.approx(threshold)
    report = json.loads(json.dumps(classify_paths(loaded, [folder]).to_dict()))
    by_name = {Path(p["path"]).name: p for p in report["files"]}
    noise, cell = by_name["noise.png"], by_name["cell.png"]
    assert noise["out_of_distribution"] is True and noise["predicted"] is None and noise["closest_class"]
    assert "not recognised" in noise["reason"]
    assert cell["out_of_distribution"] is False and cell["predicted"] is not None


def test_the_federation_threshold_comes_from_the_pooled_validation_counts() -> None:
    from hemafed.core.rounds.agg_round import federation_cell_threshold
    from hemafed.core.rounds.calibration_sums import CELL_SCORE_EDGES, cell_tails, cell_threshold_from_tails

    rng = np.random.default_rng(0)
    sites = [rng.chisquare(DIM, 150 + 50 * i) for i in range(4)]  # in-distribution scores, 4 hospitals
    tails = sum(cell_tails(s) for s in sites)
    images = sum(len(s) for s in sites)
    threshold = cell_threshold_from_tails(tails, images, 0.015)
    pooled = np.concatenate(sites)
    assert threshold in CELL_SCORE_EDGES and np.mean(pooled > threshold) <= 0.015
    below = CELL_SCORE_EDGES[CELL_SCORE_EDGES.index(threshold) - 1]
    assert np.mean(pooled > below) > 0.015  # the smallest such edge
    log = [{"status": "completed", "confusion": [[images]], "cell_tails": tails.tolist()},
           {"status": "abandoned", "confusion": None, "cell_tails": None}]
    assert federation_cell_threshold(log, 0.015) == threshold
    assert federation_cell_threshold([{"status": "completed", "confusion": [[5]], "cell_tails": None}]) is None
