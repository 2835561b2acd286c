"""Calibrated probabilities and "not sure": a temperature, class offsets and an abstention threshold at one hospital.

A softmax is over-confident after DP training on fixed features (it reads 99 % where it is right 90 % of the
time). Temperature scaling (Guo et al. 2017) divides the logits by one number T fitted to minimise the negative
log-likelihood on labelled images the model did not train on; it never changes which class is predicted. The
abstention threshold is the calibrated confidence below which the answer is "uncertain — refer to a person",
chosen so that a stated share of those images (the coverage target) is still answered.

The temperature is the federation's: inside every secure round each site adds to the masked vector, beside its
validation confusion counts, the sum of its validation images' NLL at each temperature of a fixed public grid
(`nll_sums`); the aggregator opens only the sum over the round's hospitals (never one hospital's) and picks the
temperature with the lowest total (`temperature_from_sums`) from the last completed round. Like the confusion
counts, these sums carry no DP noise and are not covered by ε (docs/privacy.md, "Calibration"). The threshold is
fitted by each hospital on its own validation images with that temperature and kept in its copy of the model file:
nothing about it is sent. A site without a federation temperature (a plain plan, an older aggregator) fits both
itself. Before the threshold, a hospital may re-fit one offset per class to its own images
(`core.learning.class_offsets`): unlike the temperature, the offsets can change the answer; they are kept in the
same file, and `probabilities` applies them before the temperature."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# the federation's part lives in core.rounds (the aggregator uses it too); here for one place to import from
from ..rounds.calibration_sums import nll_sums, temperature_from_sums  # noqa: F401

COVERAGE_TARGET = 0.95  # answer 95 % of images like the validation images, refer the least confident 5 %
MIN_IMAGES = 20  # fewer validation images than this: no calibration (one number from a handful is noise)
_T_RANGE = (0.05, 20.0)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true labels at `temperature`."""
    z = np.asarray(logits, np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(len(z)), np.asarray(labels, int)]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T in [0.05, 20] that minimises the NLL (golden-section search on log T; the NLL is unimodal in it)."""
    lo, hi = np.log(_T_RANGE[0]), np.log(_T_RANGE[1])
    ratio = (np.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(logits, labels, np.exp(a)), nll(logits, labels, np.exp(b))
    for _ in range(60):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(logits, labels, np.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(logits, labels, np.exp(b))
    return float(np.exp((lo + hi) / 2.0))


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> list[tuple[float, float, int]]:
    """Per confidence bin (equal width on [0, 1]): (mean confidence, accuracy, images); empty bins left out."""
    conf = probs.max(axis=1)
    right = probs.argmax(axis=1) == np.asarray(labels, int)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    out = []
    for b in range(bins):
        mask = which == b
        if mask.any():
            out.append((float(conf[mask].mean()), float(right[mask].mean()), int(mask.sum())))
    return out


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE: the image-weighted mean gap between confidence and accuracy over `bins` equal-width bins."""
    n = len(labels)
    return float(sum(count * abs(conf - acc) for conf, acc, count in reliability(probs, labels, bins)) / max(n, 1))


def abstention_threshold(confidences: np.ndarray, coverage: float = COVERAGE_TARGET) -> float:
    """The confidence at or above which a share `coverage` of these images is answered."""
    conf = np.sort(np.asarray(confidences, np.float64))
    k = int(np.floor((1.0 - coverage) * len(conf)))  # the k least confident are referred
    return float(conf[min(k, len(conf) - 1)])


def coverage_curve(probs: np.ndarray, labels: np.ndarray, points: int = 20) -> list[tuple[float, float]]:
    """(share answered, accuracy of the answered) when the least confident images are referred, from all to 5 %."""
    conf = probs.max(axis=1)
    right = (probs.argmax(axis=1) == np.asarray(labels, int))[np.argsort(-conf)]
    n = len(right)
    out = []
    for share in np.linspace(1.0, 0.05, points):
        k = max(1, round(float(share) * n))
        out.append((k / n, float(right[:k].mean())))
    return out


@dataclass(frozen=True)
class Calibration:
    """What a model file carries about its probabilities, fitted at one hospital (`fit`)."""

    temperature: float
    threshold: float | None  # calibrated confidence below which an answer is "uncertain" (None: not fitted)
    coverage_target: float
    images: int  # validation images the figures below come from (this hospital's)
    ece_before: float | None
    ece_after: float | None
    nll_before: float | None
    nll_after: float | None
    temperature_from: str = "this hospital's validation images"
    # the cell check (core.learning.cell_check): the score above which an image is "not recognised", set on this
    # hospital's validation images to flag `not_a_cell_false_alarms` of them (None: no cell check or too few)
    not_a_cell_threshold: float | None = None
    not_a_cell_false_alarms: float | None = None
    not_a_cell_from: str | None = None  # whose validation images set it
    # this hospital's re-fitted class offsets (core.learning.class_offsets), added to the logits before the
    # temperature; None: the federation's biases as released (not re-fitted, or the guard kept them)
    class_offsets: tuple[float, ...] | None = None
    # the re-fit's five-fold held-out cross-entropy per image (federation's scores → re-fitted), when it ran
    offsets_loss_released: float | None = None
    offsets_loss_refitted: float | None = None
    # the federation's validation images per class (what the offsets are fitted against; the aggregator sends
    # them with the final model), kept so that a hospital can re-fit a copy of this file later
    # (core.learning.local_calibration, `hemafed calibrate`)
    federation_classes: tuple[int, ...] | None = None
    # this hospital re-fitted the federation's whole final layer (core.learning.head_refit, `hemafed calibrate`): the
    # file's weights are then its own, and the re-fit's held-out losses are in offsets_loss_released / _refitted
    head_refitted: bool = False
    # this hospital's images are shown to the model in this look first (core.learning.look_match, `hemafed
    # calibrate`): (haematoxylin strength, focus blur σ in pixels at 28 px, eosin strength, lamp level); files
    # written before eosin and lamp were searched carry the first two; None: as they come
    look: tuple[float, ...] | None = None
    # the squared distance of their mean measurements to the federation's, as they come → in that look
    look_distance: tuple[float, float] | None = None

    def image_look(self):
        """The look (`core.data.appearance.HospitalLook`) this hospital's images are shown in, or None."""
        if self.look is None:
            return None
        from ..data.appearance import HospitalLook

        h, blur, eosin, lamp = (*self.look, 1.0, 1.0)[:4]
        return HospitalLook(haematoxylin=h, eosin=eosin, brightness=lamp, blur=blur)

    def adjusted(self, logits: np.ndarray) -> np.ndarray:
        """The logits with this hospital's class offsets (unchanged without them)."""
        logits = np.asarray(logits, np.float64)
        return logits if self.class_offsets is None else logits + np.asarray(self.class_offsets, np.float64)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities: the offsets, then the temperature."""
        return softmax(self.adjusted(logits), self.temperature)

    @classmethod
    def fit(cls, logits: np.ndarray, labels: np.ndarray, coverage: float = COVERAGE_TARGET, *,
            temperature: float | None = None, federation_mix: np.ndarray | None = None) -> Calibration | None:
        """The threshold (and, without the federation's `temperature`, the temperature) from these images; given
        the federation's validation images per class (`federation_mix`), first this hospital's guarded class
        offsets (`core.learning.class_offsets`). With a federation temperature and too few images: that
        temperature, nothing else. Otherwise None when there are fewer than `MIN_IMAGES` images."""
        from .class_offsets import refit_offsets as refit

        logits, labels = np.asarray(logits, np.float64), np.asarray(labels, int)
        source = "the federation's validation images (summed over the hospitals of its last round)"
        classes = None if federation_mix is None else tuple(int(v) for v in federation_mix)
        if len(labels) < MIN_IMAGES:
            if temperature is None:
                return None
            return cls(temperature=float(temperature), threshold=None, coverage_target=coverage, images=len(labels),
                       ece_before=None, ece_after=None, nll_before=None, nll_after=None, temperature_from=source,
                       federation_classes=classes)
        t = fit_temperature(logits, labels) if temperature is None else float(temperature)
        offsets = refit(logits, labels, federation_mix, t) if federation_mix is not None else None
        adjusted = logits if offsets is None or not offsets.kept else logits + np.asarray(offsets.offsets)
        before, after = softmax(logits), softmax(adjusted, t)
        return cls(temperature=t, threshold=abstention_threshold(after.max(axis=1), coverage),
                   coverage_target=coverage, images=len(labels),
                   ece_before=expected_calibration_error(before, labels),
                   ece_after=expected_calibration_error(after, labels),
                   nll_before=nll(logits, labels), nll_after=nll(adjusted, labels, t),
                   temperature_from=source if temperature is not None else cls.temperature_from,
                   class_offsets=None if offsets is None else offsets.offsets,
                   offsets_loss_released=None if offsets is None else offsets.held_out_loss_released,
                   offsets_loss_refitted=None if offsets is None else offsets.held_out_loss_refitted,
                   federation_classes=classes)

    @classmethod
    def federation_only(cls, temperature: float, coverage: float = COVERAGE_TARGET,
                        cell_threshold: float | None = None, cell_false_alarms: float | None = None,
                        federation_classes: list[int] | None = None) -> Calibration:
        """The aggregator's model file: the federation's temperature, cell-check threshold and validation images
        per class; no "uncertain" threshold or class offsets (those are each hospital's)."""
        return cls(temperature=float(temperature), threshold=None, coverage_target=coverage, images=0,
                   ece_before=None, ece_after=None, nll_before=None, nll_after=None,
                   temperature_from="the federation's validation images (summed over the hospitals of its last "
                                    "round)", not_a_cell_threshold=cell_threshold,
                   not_a_cell_false_alarms=None if cell_threshold is None else cell_false_alarms,
                   not_a_cell_from=None if cell_threshold is None else "the federation's validation images",
                   federation_classes=None if federation_classes is None else tuple(int(v) for v in federation_classes))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        t = float(d["temperature"])
        threshold = None if d.get("threshold") is None else float(d["threshold"])
        if not (_T_RANGE[0] <= t <= _T_RANGE[1]) or not (threshold is None or 0.0 <= threshold <= 1.0):
            raise ValueError(f"calibration out of range (T = {t}, threshold = {threshold})")
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        offsets = fields.get("class_offsets")
        if offsets is not None:
            values = np.asarray(offsets, np.float64)
            if values.ndim != 1 or not np.all(np.isfinite(values)) or np.abs(values).max(initial=0.0) > 50.0:
                raise ValueError("calibration's class offsets are not a list of numbers within ±50")
            fields["class_offsets"] = tuple(float(v) for v in values)
        for key, limits, sizes in (("look", ((0.5, 2.0), (0.0, 2.0), (0.5, 2.0), (0.5, 2.0)), (2, 4)),
                                   ("look_distance", ((0.0, 1e6), (0.0, 1e6)), (2,))):
            values = fields.get(key)
            if values is None:
                continue
            if not (isinstance(values, list | tuple) and len(values) in sizes
                    and all(isinstance(v, int | float) and not isinstance(v, bool) and lo <= v <= hi
                            for v, (lo, hi) in zip(values, limits, strict=False))):
                raise ValueError(f"calibration's {key.replace('_', ' ')} is not {' or '.join(map(str, sizes))} "
                                 "numbers in range")
            fields[key] = tuple(float(v) for v in values)
        if not isinstance(fields.get("head_refitted", False), bool):
            raise ValueError("calibration's head_refitted is not true or false")
        counts = fields.get("federation_classes")
        if counts is not None:
            if not (isinstance(counts, list | tuple) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                     for v in counts)):
                raise ValueError("calibration's federation class counts are not counts")
            fields["federation_classes"] = tuple(counts)
        return cls(**fields)


def look_text(cal: Calibration | None) -> str:
    """In words: the look this hospital's images are shown in before the model sees them ("" when none was
    searched for)."""
    if cal is None or cal.look_distance is None:
        return ""
    before, after = cal.look_distance
    if cal.look is None and after < before:
        return (f"images shown as they come: in the look closest to the federation's (distance of their mean "
                f"measurements {before:.1f} → {after:.1f}) the re-fitted model predicted held-out labelled images "
                "worse")
    if cal.look is None:
        return (f"images shown as they come: they already look like the federation's (distance of their mean "
                f"measurements {before:.1f})")
    look = cal.image_look()
    parts = ([f"the haematoxylin at {look.haematoxylin:.0%} of its strength"] if look.haematoxylin != 1.0 else []) + (
        [f"the eosin at {look.eosin:.0%}"] if look.eosin != 1.0 else []) + (
        [f"the lamp {look.brightness - 1:.0%} brighter"] if look.brightness > 1.0 else []) + (
        [f"the lamp {1 - look.brightness:.0%} dimmer"] if look.brightness < 1.0 else []) + (
        [f"a focus blur of {look.blur:g} px (at 28 px)"] if look.blur else [])
    if len(parts) > 1:
        parts = [", ".join(parts[:-1]), parts[-1]]
    return (f"images shown with {' and '.join(parts)} first: closest to the federation's look (distance of their "
            f"mean measurements {before:.1f} → {after:.1f})")


def offsets_text(cal: Calibration | None) -> str:
    """In words: whether this hospital's model file adjusts the federation's class scores, and why."""
    if cal is None or cal.offsets_loss_released is None:
        return "class scores as the federation released them (not re-fitted here)"
    loss = f"loss {cal.offsets_loss_released:.3f} → {cal.offsets_loss_refitted:.3f}"
    if cal.head_refitted and not cal.offsets_loss_refitted < cal.offsets_loss_released:
        return (f"class scores as re-fitted earlier at this hospital (every weight of the model's final layer); "
                f"re-fitted again to its {cal.images} labelled images, they did not predict held-out ones better "
                f"({loss})")
    if cal.head_refitted:
        return (f"class scores re-fitted to this hospital's images, every weight of the model's final layer (it "
                f"predicted held-out ones among its {cal.images} labelled images better: {loss})")
    if cal.class_offsets is None:
        return (f"class scores as the federation released them: re-fitted to this hospital's {cal.images} labelled "
                f"images, they did not predict held-out ones better ({loss})")
    return (f"class scores re-fitted to this hospital's images (they predicted held-out ones among its {cal.images} "
            f"labelled images better: {loss})")
