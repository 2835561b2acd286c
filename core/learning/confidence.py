"""Calibrated probabilities and "not sure": a temperature and an abstention threshold fitted at one hospital.

A softmax is over-confident after DP training on fixed features (it reads 99 % where it is right 90 % of the
time). Temperature scaling (Guo et al. 2017) divides the logits by one number T fitted to minimise the negative
log-likelihood on labelled images the model did not train on; it never changes which class is predicted. The
abstention threshold is the calibrated confidence below which the answer is "uncertain — refer to a human",
chosen so that a stated share of those images (the coverage target) is still answered.

Both are fitted by each hospital on its own validation images with the federation's final model, and kept in that
hospital's copy of the model file: nothing is sent, no ε is spent (docs/privacy.md, "Calibration")."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

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
    threshold: float  # calibrated confidence below which an answer is "uncertain"
    coverage_target: float
    images: int  # validation images it was fitted on
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float
    fitted_by: str = "this hospital's validation images"

    @classmethod
    def fit(cls, logits: np.ndarray, labels: np.ndarray, coverage: float = COVERAGE_TARGET) -> Calibration | None:
        """None when there are fewer than `MIN_IMAGES` images."""
        logits, labels = np.asarray(logits, np.float64), np.asarray(labels, int)
        if len(labels) < MIN_IMAGES:
            return None
        t = fit_temperature(logits, labels)
        before, after = softmax(logits), softmax(logits, t)
        return cls(temperature=t, threshold=abstention_threshold(after.max(axis=1), coverage),
                   coverage_target=coverage, images=len(labels),
                   ece_before=expected_calibration_error(before, labels),
                   ece_after=expected_calibration_error(after, labels),
                   nll_before=nll(logits, labels), nll_after=nll(logits, labels, t))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        t, threshold = float(d["temperature"]), float(d["threshold"])
        if not (_T_RANGE[0] <= t <= _T_RANGE[1]) or not (0.0 <= threshold <= 1.0):
            raise ValueError(f"calibration out of range (T = {t}, threshold = {threshold})")
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
