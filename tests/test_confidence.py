"""Calibration at a hospital: the temperature lowers the NLL on images it was not fitted on, the threshold answers
the stated share of validation images, a model file carries both, and classify reports them."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from hemafed.core.learning.classify import ModelFileError, classify_paths, load_model_file
from hemafed.core.learning.confidence import (
    MIN_IMAGES,
    Calibration,
    abstention_threshold,
    coverage_curve,
    expected_calibration_error,
    fit_temperature,
    nll,
    nll_sums,
    softmax,
    temperature_from_sums,
)


def _overconfident(n: int, seed: int, sharpen: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z); the model reports sharpen·z (as sure as a DP-trained head tends to be)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, (n, 8))
    z[np.arange(n), rng.integers(0, 8, n)] += 2.0
    p = softmax(z)
    labels = np.array([rng.choice(8, p=row) for row in p])
    return sharpen * z, labels


def test_the_temperature_lowers_the_nll_and_the_ece_on_held_out_images() -> None:
    fit_logits, fit_labels = _overconfident(400, 0)
    test_logits, test_labels = _overconfident(2000, 1)
    t = fit_temperature(fit_logits, fit_labels)
    assert 2.0 < t < 4.5  # the sharpening was 3
    assert nll(test_logits, test_labels, t) < nll(test_logits, test_labels) - 0.1
    before = expected_calibration_error(softmax(test_logits), test_labels)
    after = expected_calibration_error(softmax(test_logits, t), test_labels)
    assert after < before / 2
    # a temperature never changes the answer
    assert (softmax(test_logits, t).argmax(1) == test_logits.argmax(1)).all()


def test_a_well_calibrated_model_keeps_a_temperature_near_one() -> None:
    logits, labels = _overconfident(3000, 2, sharpen=1.0)
    assert 0.85 < fit_temperature(logits, labels) < 1.15


def test_the_threshold_answers_the_stated_share_of_validation_images() -> None:
    logits, labels = _overconfident(500, 3)
    cal = Calibration.fit(logits, labels, coverage=0.9)
    conf = softmax(logits, cal.temperature).max(1)
    answered = (conf >= cal.threshold).mean()
    assert 0.9 <= answered <= 0.9 + 2 / 500
    assert abstention_threshold(conf, 1.0) == conf.min()
    curve = coverage_curve(softmax(logits, cal.temperature), labels)
    assert curve[0][0] == 1.0 and curve[-1][1] >= curve[0][1]  # referring the least sure raises accuracy


def test_too_few_images_give_no_calibration() -> None:
    logits, labels = _overconfident(MIN_IMAGES - 1, 4)
    assert Calibration.fit(logits, labels) is None


def _with_calibration(model_file: Path, tmp_path: Path, cal: dict | None, name: str = "calibrated.npz") -> Path:
    with np.load(model_file) as data:
        weights = data["weights"]
        meta = json.loads(bytes(data["meta"]).decode())
    meta["calibration"] = cal
    out = tmp_path / name
    np.savez(out, weights=weights, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
    return out


@pytest.fixture
def small_model(tmp_path: Path) -> Path:
    from hemafed.core.learning.models import build_model, get_flat_params
    from hemafed.core.rounds.plan import FederationPlan
    from hemafed.network.site import save_model_file

    plan = FederationPlan(federation_id="cal", model="cnn4_28", threshold=2, min_sites=2, algorithm="fedavg",
                          dp_mode="local", noise_multiplier=0.0)
    return save_model_file(tmp_path / "final.npz", get_flat_params(build_model("cnn4_28", 8, seed=3)), plan, 2)


def _images(folder: Path, n: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "basophil").mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / "basophil" / f"{i}.png")
    return folder


def test_classify_reports_calibrated_probabilities_and_uncertain_answers(small_model: Path, tmp_path: Path) -> None:
    folder = _images(tmp_path / "images", 6)
    plain = classify_paths(load_model_file(small_model), [folder])
    assert all(p.uncertain is None and "calibrated_probabilities" not in p.to_dict() for p in plain.predictions)
    cal = Calibration(temperature=4.0, threshold=0.99, coverage_target=0.95, images=100, ece_before=0.1,
                      ece_after=0.01, nll_before=1.0, nll_after=0.5)
    model = load_model_file(_with_calibration(small_model, tmp_path, cal.to_dict()))
    assert model.calibration == cal
    report = classify_paths(model, [folder])
    for before, after in zip(plain.predictions, report.predictions, strict=True):
        d = after.to_dict()
        assert d["probabilities"] == pytest.approx(before.probabilities)  # the model's own, unchanged
        assert after.predicted == before.predicted
        flat = max(d["calibrated_probabilities"].values())
        assert flat < max(d["probabilities"].values())  # T = 4 flattens them
        assert d["uncertain"] is True and "refer to a person" in d["reason"]  # nothing reaches 99 % at T = 4


def test_classify_answers_with_the_hospitals_class_offsets(small_model: Path, tmp_path: Path) -> None:
    folder = _images(tmp_path / "images", 6)
    plain = classify_paths(load_model_file(small_model), [folder])
    model = load_model_file(small_model)
    shifted = 1 + model.classes.index(plain.predictions[0].predicted)  # a class other than the first answer
    offsets = [0.0] * len(model.classes)
    offsets[shifted % len(offsets)] = 40.0
    cal = Calibration(temperature=1.0, threshold=0.5, coverage_target=0.95, images=100, ece_before=0.1,
                      ece_after=0.01, nll_before=1.0, nll_after=0.5, class_offsets=tuple(offsets),
                      offsets_loss_released=0.9, offsets_loss_refitted=0.7)
    report = classify_paths(load_model_file(_with_calibration(small_model, tmp_path, cal.to_dict())), [folder])
    d = report.to_dict()
    assert "re-fitted to this hospital's images" in d["class_scores"]
    for before, after in zip(plain.predictions, report.predictions, strict=True):
        assert after.raw_probabilities == pytest.approx(before.probabilities)  # the model's own, unchanged
        assert after.predicted == model.classes[shifted % len(offsets)]  # the offsets decide the answer
    assert "class_scores" not in plain.to_dict()
    assert report.class_offsets_applied and not plain.class_offsets_applied
    # a re-fit the guard turned down: the file says so, and its answers are the federation's
    declined = replace(cal, class_offsets=None, offsets_loss_refitted=0.95)
    kept_out = classify_paths(load_model_file(_with_calibration(small_model, tmp_path, declined.to_dict(),
                                                                "declined.npz")), [folder])
    assert not kept_out.class_offsets_applied and "did not predict" in kept_out.to_dict()["class_scores"]
    assert [p.predicted for p in kept_out.predictions] == [p.predicted for p in plain.predictions]


def test_a_damaged_calibration_is_refused_with_the_reason(small_model: Path, tmp_path: Path) -> None:
    bad = _with_calibration(small_model, tmp_path, {"temperature": -1, "threshold": 0.5})
    with pytest.raises(ModelFileError, match="calibration"):
        load_model_file(bad)


def test_the_federation_picks_the_temperature_of_the_pooled_sums() -> None:
    """Each site's sums are bounded integers; their sum over sites picks what one pooled fit would, up to the
    grid's step (about 7 % in T)."""
    from hemafed.core.rounds.calibration_sums import CALIBRATION_GRID, NLL_CAP, NLL_SCALE

    parts = [_overconfident(n, seed) for n, seed in ((120, 5), (60, 6), (300, 7))]
    sums = [nll_sums(logits, labels) for logits, labels in parts]
    for s, (_, labels) in zip(sums, parts, strict=True):
        assert s.dtype == np.int64 and (s >= 0).all() and (s <= len(labels) * NLL_CAP * NLL_SCALE).all()
    pooled_logits = np.concatenate([p[0] for p in parts])
    pooled_labels = np.concatenate([p[1] for p in parts])
    t = temperature_from_sums(np.sum(sums, axis=0), len(pooled_labels))
    assert t in CALIBRATION_GRID and abs(np.log(t / fit_temperature(pooled_logits, pooled_labels))) < 0.07
    assert temperature_from_sums(np.zeros(len(CALIBRATION_GRID), np.int64), 0) is None
    # a site keeps the federation's temperature and fits only its threshold; with too few images, no threshold
    logits, labels = parts[2]
    cal = Calibration.fit(logits, labels, temperature=t)
    assert cal.temperature == t and cal.threshold is not None and "federation" in cal.temperature_from
    few = Calibration.fit(logits[:5], labels[:5], temperature=t)
    assert few.temperature == t and few.threshold is None


def test_a_hospital_re_calibrates_a_copy_of_the_federations_file_on_its_own_labelled_images(
        small_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    from hemafed.gui.cli import main as cli_main

    model = load_model_file(small_model)
    rng = np.random.default_rng(5)
    folder = tmp_path / "ours"
    for k, name in enumerate(model.classes[:3]):
        (folder / name).mkdir(parents=True)
        for i in range(20):
            tint = np.zeros(3, int)
            tint[k] = 120
            pixels = np.clip(rng.integers(0, 130, (40, 40, 3)) + tint, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{i}.png")
    (folder / "unsorted.png").write_bytes((folder / model.classes[0] / "0.png").read_bytes())
    (folder / model.classes[1] / "broken.png").write_bytes(b"not an image")
    federation = Calibration.federation_only(1.3, federation_classes=list(range(10, 10 + len(model.classes))))
    theirs = _with_calibration(small_model, tmp_path, federation.to_dict())
    before = theirs.read_bytes()

    ours = tmp_path / "ours.npz"
    assert cli_main(["calibrate", "--model", str(theirs), str(folder), "--out", str(ours), "--json"]) == 0
    said = json.loads(capsys.readouterr().out)
    assert said["images"] == 60 and "fewer than 250" in said["caution"]
    assert any("unsorted.png" in p and "class" in p for p in said["skipped"])
    assert any("broken.png" in p for p in said["skipped"])
    cal = load_model_file(ours).calibration
    assert cal.images == 60 and cal.threshold is not None and cal.temperature == 1.3
    assert cal.federation_classes == federation.federation_classes
    assert cal.offsets_loss_released is not None  # the guarded re-fit ran (kept or not, said in class_scores)
    assert said["class_scores"].startswith("class scores")
    assert theirs.read_bytes() == before  # the federation's file is unchanged

    # refused in words: a file that cannot say the federation's class mix, and overwriting the federation's file
    older = _with_calibration(small_model, tmp_path, Calibration.federation_only(1.3).to_dict(), "older.npz")
    assert cli_main(["calibrate", "--model", str(older), str(folder), "--out", str(tmp_path / "x.npz")]) == 1
    assert "validation images of each class" in capsys.readouterr().err
    assert cli_main(["calibrate", "--model", str(theirs), str(folder), "--out", str(theirs)]) == 1
    assert "new file" in capsys.readouterr().err
    assert theirs.read_bytes() == before
