"""A hospital's class offsets (core.learning.class_offsets): re-fitted on its own validation images they take back
what a look costs, they learn the look and not the hospital's class mix, the guard keeps the released biases where
nothing moved, a model file carries them and classify answers with them."""

from __future__ import annotations

import numpy as np
import pytest

from hemafed.core.learning.class_offsets import MIN_IMAGES, mix_shift, refit_offsets
from hemafed.core.learning.confidence import Calibration, nll, offsets_text, softmax

CLASSES = 8
LOOK = np.array([1.6, -1.2, 0.0, 0.8, -0.4, 0.0, -0.8, 0.0])  # what a look does to the class scores


def _hospital(n: int, seed: int, shift: np.ndarray | None = None,
              mix: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from `mix` (uniform by default); the released head's logits for them are those of the true
    class model (8 classes, overlapping), plus `shift` where the hospital's look moves every image alike."""
    rng = np.random.default_rng(seed)
    mix = np.full(CLASSES, 1 / CLASSES) if mix is None else np.asarray(mix) / np.sum(mix)
    labels = rng.choice(CLASSES, size=n, p=mix)
    logits = rng.normal(0.0, 1.0, (n, CLASSES))
    logits[np.arange(n), labels] += 2.2
    return logits + (0.0 if shift is None else shift), labels


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean())


def test_offsets_fitted_on_a_shifted_hospital_take_back_its_loss_on_new_images() -> None:
    fit = refit_offsets(*_hospital(300, 0, LOOK), federation_mix=np.full(CLASSES, 100))
    assert fit.kept and fit.held_out_loss_refitted < fit.held_out_loss_released
    new_logits, new_labels = _hospital(4000, 1, LOOK)
    adjusted = new_logits + np.asarray(fit.offsets)
    assert _accuracy(adjusted, new_labels) > _accuracy(new_logits, new_labels) + 0.03
    assert nll(adjusted, new_labels) < nll(new_logits, new_labels) - 0.05
    # they undo the look (up to a constant, which no softmax sees)
    assert np.corrcoef(np.asarray(fit.offsets), -LOOK)[0, 1] > 0.9


def test_the_guard_keeps_the_released_biases_where_the_look_did_not_move() -> None:
    kept = [refit_offsets(*_hospital(150, seed), federation_mix=np.full(CLASSES, 10)).kept for seed in range(6)]
    assert kept.count(True) <= 1


def test_offsets_learn_the_look_and_not_the_hospitals_class_mix() -> None:
    """A hospital that sees mostly two classes, with no look of its own: given the federation's mix, the re-fit
    leaves the scores about alone; told its own mix were the federation's, it moves them towards its two classes."""
    skewed = np.array([40, 40, 2, 2, 2, 2, 2, 2])
    logits, labels = _hospital(400, 2, mix=skewed)
    plain = refit_offsets(logits, labels, federation_mix=np.bincount(labels, minlength=CLASSES))
    assert plain.kept and min(plain.offsets[0], plain.offsets[1]) > max(plain.offsets[2:]) + 0.5
    given = refit_offsets(logits, labels, federation_mix=np.full(CLASSES, 50))
    assert not given.kept or np.ptp(given.offsets) < 0.8
    # with its look too, it finds the look, the rare classes' offsets included
    for seed in range(3, 6):
        shifted = refit_offsets(*_hospital(400, seed, LOOK, mix=skewed), federation_mix=np.full(CLASSES, 50))
        assert shifted.kept and np.corrcoef(np.asarray(shifted.offsets), -LOOK)[0, 1] > 0.9
        new_logits, new_labels = _hospital(3000, seed + 10, LOOK)
        assert _accuracy(new_logits + np.asarray(shifted.offsets), new_labels) > _accuracy(new_logits,
                                                                                           new_labels) + 0.1


def test_the_mix_shift_is_the_log_ratio_of_the_two_mixes_and_stays_finite() -> None:
    labels = np.array([0] * 30 + [1] * 10)
    shift = mix_shift(labels, np.array([10, 10, 20]))
    assert np.isfinite(shift).all()
    assert shift[0] - shift[1] == pytest.approx(np.log(30.5 / 10.5))  # the federation holds both alike
    assert shift[2] < shift[1] - 3  # none here, the most there


def test_too_few_images_are_not_re_fitted() -> None:
    fit = refit_offsets(*_hospital(MIN_IMAGES - 1, 4, LOOK), federation_mix=np.full(CLASSES, 9))
    assert not fit.kept and fit.held_out_loss_released is None


def test_the_calibration_carries_the_offsets_and_applies_them_before_the_temperature() -> None:
    logits, labels = _hospital(400, 5, LOOK)
    cal = Calibration.fit(logits, labels, temperature=1.5, federation_mix=np.full(CLASSES, 9))
    assert cal is not None and cal.class_offsets is not None
    assert "re-fitted to this hospital's images" in offsets_text(cal)
    assert cal.nll_after < cal.nll_before
    new_logits, new_labels = _hospital(3000, 6, LOOK)
    probs = cal.probabilities(new_logits)
    assert probs == pytest.approx(softmax(new_logits + np.asarray(cal.class_offsets), 1.5))
    assert _accuracy(probs, new_labels) > _accuracy(new_logits, new_labels) + 0.03
    # the threshold is set on the adjusted probabilities: it still answers 95 % of the validation images
    assert 0.95 <= (cal.probabilities(logits).max(1) >= cal.threshold).mean() <= 0.95 + 2 / 400
    assert Calibration.from_dict(cal.to_dict()) == cal
    bad = cal.to_dict() | {"class_offsets": [float("nan")] * CLASSES}
    with pytest.raises(ValueError, match="offsets"):
        Calibration.from_dict(bad)
    plain = Calibration.fit(logits, labels, temperature=1.5)
    assert plain.class_offsets is None and "not re-fitted" in offsets_text(plain)
