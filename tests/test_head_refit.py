"""A hospital re-fits the federation's final layer on its own labelled images (core.learning.head_refit,
`hemafed calibrate`): the guard keeps a re-fit only where it predicts held-out images better, and the saved copy
answers with it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from model_files import federation_file

from hemafed.core.learning.class_offsets import MIN_IMAGES
from hemafed.core.learning.head_refit import refit_head

CLASSES = 4


def _looked(n: int, seed: int, strength: float) -> tuple[np.ndarray, np.ndarray]:
    """Centred inputs whose class sits in the first 4 coordinates; a look scales those by `strength` and turns
    coordinates 4–7 into a second copy of the class signal (a stain that changes which features speak)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n)
    z = rng.normal(0, 1, (n, 16))
    z[np.arange(n), labels] += 3 * strength
    z[np.arange(n), 4 + labels] += 3 * (1 - strength)
    return z, labels


def _released() -> tuple[np.ndarray, np.ndarray]:
    weight = np.zeros((CLASSES, 16))
    weight[np.arange(CLASSES), np.arange(CLASSES)] = 2.0  # the federation learned the first 4 coordinates only
    return weight, np.zeros(CLASSES)


def _accuracy(z: np.ndarray, labels: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> float:
    return float(((z @ weight.T + bias).argmax(1) == labels).mean())


def test_the_refit_recovers_a_look_no_offset_undoes_and_its_held_out_logits_are_out_of_fold() -> None:
    weight, bias = _released()
    mix = np.full(CLASSES, 100)
    z, labels = _looked(300, 1, strength=0.3)
    fit = refit_head(z, weight, bias, labels, mix)
    assert fit.kept and fit.held_out_loss_refitted < fit.held_out_loss_released
    fresh_z, fresh_labels = _looked(2000, 2, strength=0.3)
    before, after = _accuracy(fresh_z, fresh_labels, weight, bias), _accuracy(fresh_z, fresh_labels, fit.weight,
                                                                              fit.bias)
    assert after > before + 0.1
    in_sample = z @ fit.weight.T + fit.bias
    # each image's held-out logits come from a layer that did not see it: not the in-sample ones
    assert fit.held_out_logits.shape == in_sample.shape and not np.allclose(fit.held_out_logits, in_sample)
    assert abs(float(fit.bias.sum() - bias.sum())) < 1e-9  # the bias change sums to zero, as the offsets do


def test_the_guard_keeps_the_released_layer_where_the_images_look_like_the_federations() -> None:
    weight, bias = _released()
    z, labels = _looked(300, 3, strength=1.0)  # the federation's own look: nothing to correct
    fit = refit_head(z, weight * 3, bias, labels, np.full(CLASSES, 100))  # and a layer already confident
    assert not fit.kept and fit.weight is None and fit.held_out_loss_released is not None
    few = refit_head(z[:MIN_IMAGES - 1], weight, bias, labels[:MIN_IMAGES - 1], np.full(CLASSES, 100))
    assert not few.kept and few.held_out_loss_released is None  # too few images to decide: no re-fit


def test_hemafed_calibrate_saves_the_refitted_layer_and_classify_answers_with_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """End to end on a real centred model (`scatter_synth_inv_cc_28`): a file whose layer is random re-fits on 80
    labelled images of two kinds; the copy carries the new layer (centre and cell-check moments untouched), says so,
    and classifies with it; the federation's file is unchanged."""
    from PIL import Image

    from hemafed.core.learning.classify import classify_paths, load_model_file
    from hemafed.core.learning.confidence import Calibration
    from hemafed.core.learning.models import build_model, split_features
    from hemafed.gui.cli import main as cli_main

    net = build_model("scatter_synth_inv_cc_28", 8, seed=4)
    head = split_features(net)[1]
    head.center.data.normal_(0, 0.1)
    head.cell_moments.data.fill_(0.5)
    theirs = federation_file(tmp_path / "final.npz", head, "scatter_synth_inv_cc_28",
                             Calibration.federation_only(1.0, federation_classes=[50] * 8), "refit")
    with np.load(theirs) as data:
        weights = data["weights"]
    before = theirs.read_bytes()

    model = load_model_file(theirs)
    rng = np.random.default_rng(8)
    folder = tmp_path / "ours"
    for k, name in enumerate(model.classes[:2]):  # dark discs against light squares: easy to tell apart
        (folder / name).mkdir(parents=True)
        for i in range(40):
            pixels = np.full((28, 28, 3), 200 if k else 60, np.uint8) + rng.integers(0, 40, (28, 28, 3), dtype=np.uint8)
            yy, xx = np.mgrid[:28, :28]
            disc = (yy - 14) ** 2 + (xx - 14) ** 2 < (6 + i % 5) ** 2
            pixels[disc] = 255 - pixels[disc] if k == 0 else pixels[disc] // 3
            Image.fromarray(pixels).save(folder / name / f"{i}.png")

    ours = tmp_path / "ours.npz"
    assert cli_main(["calibrate", "--model", str(theirs), str(folder), "--out", str(ours), "--json"]) == 0
    said = json.loads(capsys.readouterr().out)
    assert "every weight of the model's final layer" in said["class_scores"]
    cal = load_model_file(ours).calibration
    assert cal.head_refitted and cal.class_offsets is None and cal.threshold is not None
    assert cal.offsets_loss_refitted < cal.offsets_loss_released
    with np.load(ours) as new:
        changed = new["weights"] != weights
    kept = np.concatenate([np.full(p.numel(), not name.startswith("linear.")) for name, p in head.named_parameters()])
    assert changed[~kept].any() and not changed[kept].any()  # W and b re-fitted; the centre and moments as released
    released = classify_paths(load_model_file(theirs), [folder])
    adapted = classify_paths(load_model_file(ours), [folder])
    right = [sum(p.predicted == p.true_class for p in r.predictions) for r in (released, adapted)]
    assert right[1] > right[0] and adapted.class_offsets_applied and not released.class_offsets_applied
    assert theirs.read_bytes() == before
    # re-calibrating the adapted copy again keeps saying its layer is this hospital's, whether or not it moves again
    again = tmp_path / "again.npz"
    assert cli_main(["calibrate", "--model", str(ours), str(folder), "--out", str(again), "--json"]) == 0
    said = json.loads(capsys.readouterr().out)
    assert load_model_file(again).calibration.head_refitted and "final layer" in said["class_scores"]
