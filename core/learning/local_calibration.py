"""Re-calibrate a copy of a federation's model file on one hospital's own labelled images (`hemafed calibrate`).

A hospital that did not take part in training, or whose microscope, stain or camera changed since, holds images
that look unlike the federation's. With a few hundred labelled images of its own (class-named folders, as the Data
page reads them) it fits, locally, what a participating site fits on its validation split when the federation
ends, and more: the look its images are best shown in (`core.learning.look_match`, from the images alone; kept
where the re-fit in it predicts held-out images at least as well as the re-fit on the images as they come), the
federation's whole final layer re-fitted near the released one (`core.learning.head_refit`,
guarded by five folds, against the federation's validation class mix the model file carries), or where that does not
predict held-out images better, its class offsets alone (`core.learning.class_offsets`, guarded the same way); then
its "uncertain" threshold, with the federation's temperature and cell-check threshold kept as the file has them. The
result is a new model file for this hospital; nothing is sent anywhere (docs/privacy.md, "Calibration"). The
labelled images must not be ones the model will later be judged on.
"""

from __future__ import annotations

import copy
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_bytes
from ..data.imaging import ImageRejected
from .class_offsets import MIN_IMAGES as OFFSET_IMAGES
from .classify import ModelFile, ModelFileError, collect_inputs, prepare_image
from .confidence import MIN_IMAGES, Calibration
from .look_match import MIN_IMAGES as LOOK_IMAGES
from .look_match import LookMatch, match_look, shown_in

# Below this many labelled images the re-fit's own noise shows: where the images look like the federation's it cost
# 0.25 points with 100 and 0.1 with 250 (docs/appearance-remedies.md, ninth pass); said, not refused.
ENOUGH_IMAGES = 250


def small_sample_note(images: int) -> str:
    """A caution in words when `images` labelled images are few for a re-fit ("" otherwise)."""
    if images >= ENOUGH_IMAGES:
        return ""
    return (f"only {images} labelled images: with fewer than {ENOUGH_IMAGES} a re-fit can cost a few tenths of a "
            "point where your images already look like the federation's; add more if you have them")


@dataclass(frozen=True)
class Recalibrated:
    """A hospital's calibration of a model file, and the final layer it re-fitted (if the re-fit was kept)."""

    calibration: Calibration
    weights: np.ndarray | None = None  # the file's flat weights with the re-fitted layer; None: as released


def recalibrate(model: ModelFile, images: np.ndarray, labels: np.ndarray) -> Recalibrated:
    """This hospital's calibration of `model` from its labelled `images` (N, H, W, 3 uint8 at any size) and their
    class indices: the look its images are best shown in (`core.learning.look_match`, from the images alone), then
    the re-fit on the images in that look, kept in that look only where it predicts held-out labelled images at
    least as well as the re-fit on the images as they come. Raises ModelFileError when the file lacks what a re-fit
    needs, ValueError for too few images."""
    match = matched_look(model, images)
    looked = None if match is None or match.look is None else model.features(shown_in(np.asarray(images), match.look))
    return recalibrate_features(model, model.features(images), labels, match, looked)


def matched_look(model: ModelFile, images: np.ndarray) -> LookMatch | None:
    """The look this hospital's `images` are best shown in (`core.learning.look_match`); None without the cell
    check's statistics in the file or with too few images."""
    stats = model.cell_stats()
    return None if stats is None else match_look(stats, images)


def recalibrate_features(model: ModelFile, features: np.ndarray, labels: np.ndarray, match: LookMatch | None = None,
                         looked_features: np.ndarray | None = None) -> Recalibrated:
    """`recalibrate` from the model's fixed features of the labelled images as they come (`ModelFile.features`) and,
    where `match` chose a look, of the same images in it (`looked_features`)."""
    plain = _refit(model, features, labels)
    plain = replace(plain, calibration=with_look(plain.calibration, match, shown=False))
    if match is None or match.look is None or looked_features is None:
        return plain
    looked = _refit(model, looked_features, labels)
    looked = replace(looked, calibration=with_look(looked.calibration, match, shown=True))
    a, b = held_out_loss(plain.calibration), held_out_loss(looked.calibration)
    return plain if a is not None and b is not None and a < b else looked


def with_look(cal: Calibration, match: LookMatch | None, shown: bool = True) -> Calibration:
    """`cal` recording the search `match` (None: none ran) and, with `shown`, the look it chose."""
    if match is None:
        return replace(cal, look=None, look_distance=None)
    look = match.look if shown else None
    return replace(cal, look=None if look is None else (look.haematoxylin, look.blur, look.eosin, look.brightness),
                   look_distance=(match.distance_before, match.distance_after))


def held_out_loss(cal: Calibration) -> float | None:
    """The five-fold held-out cross-entropy per image of the class scores a calibration answers with (re-fitted or
    as released); None where no re-fit ran."""
    if cal.offsets_loss_released is None:
        return None
    refitted = cal.head_refitted or cal.class_offsets is not None
    return cal.offsets_loss_refitted if refitted else cal.offsets_loss_released


def _refit(model: ModelFile, features: np.ndarray, labels: np.ndarray) -> Recalibrated:
    import torch

    from .head_refit import refit_head
    from .models import CenteredLinear, get_flat_params, split_features

    cal = model.calibration
    if cal is None or cal.federation_classes is None:
        raise ModelFileError(f"{model.path}: this model file does not say how many validation images of each class "
                             "the federation held (saved before 2026-12-05, or by a plan without secure "
                             "aggregation), so its class scores cannot be re-fitted")
    if len(cal.federation_classes) != len(model.classes):
        raise ModelFileError(f"{model.path}: its federation class counts do not match its {len(model.classes)} "
                             "classes")
    labels = np.asarray(labels, int)
    mix = np.asarray(cal.federation_classes)
    head = split_features(model.model)[1]
    with torch.no_grad():
        x = torch.as_tensor(np.asarray(features, np.float32))
        logits = head(x).double().numpy()
        fit = None
        if isinstance(head, CenteredLinear) and len(labels) >= MIN_IMAGES:
            fit = refit_head(head.centred_inputs(x).double().numpy(), head.linear.weight.double().numpy(),
                             head.linear.bias.double().numpy(), labels, mix, cal.temperature)
    if fit is not None and fit.kept:
        # the threshold from the held-out logits: each image scored by a layer that was not fitted to it
        fitted = Calibration.fit(fit.held_out_logits, labels, temperature=cal.temperature)
        fitted = replace(fitted, head_refitted=True, offsets_loss_released=fit.held_out_loss_released,
                         offsets_loss_refitted=fit.held_out_loss_refitted,
                         federation_classes=cal.federation_classes)
        layer = copy.deepcopy(head)
        with torch.no_grad():
            layer.linear.weight.copy_(torch.as_tensor(fit.weight))
            layer.linear.bias.copy_(torch.as_tensor(fit.bias))
        weights = get_flat_params(layer)
    else:
        fitted = Calibration.fit(logits, labels, temperature=cal.temperature, federation_mix=mix)
        weights = None
        if fitted is not None and cal.head_refitted:  # a copy re-fitted before keeps that layer, and says so
            fitted = replace(fitted, head_refitted=True)
    if fitted is None or fitted.threshold is None:
        raise ValueError(f"{len(labels)} labelled images are too few to re-calibrate (at least {MIN_IMAGES}; the "
                         f"class offsets need {OFFSET_IMAGES})")
    fitted = replace(fitted, temperature_from=cal.temperature_from, not_a_cell_threshold=cal.not_a_cell_threshold,
                     not_a_cell_false_alarms=cal.not_a_cell_false_alarms, not_a_cell_from=cal.not_a_cell_from)
    return Recalibrated(fitted, weights)


def labelled_images(model: ModelFile, paths: Iterable[str | Path]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The images under `paths` that sit in a folder named like one of the model's classes, as the model's input,
    with their class indices; everything skipped is listed in words (unlabelled files, unreadable images)."""
    return _read_images(model, paths, labelled=True)


def any_images(model: ModelFile, paths: Iterable[str | Path]) -> tuple[np.ndarray, list[str]]:
    """Every readable image under `paths`, labelled or not, as the model's input; unreadable ones listed."""
    images, _, problems = _read_images(model, paths, labelled=False)
    return images, problems


def _read_images(model: ModelFile, paths: Iterable[str | Path],
                 labelled: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    inputs, problems = collect_inputs(paths, model.classes)
    images, labels = [], []
    for item in inputs:
        if labelled and item.true_class is None:
            problems.append(f"{item.path}: not in a folder named after a class, skipped")
            continue
        try:
            image, _, _ = prepare_image(item.path, model.input_size)
        except ImageRejected as exc:
            problems.append(f"{item.path}: {exc.reason}" + (f" ({exc.detail})" if exc.detail else ""))
            continue
        images.append(image)
        labels.append(-1 if item.true_class is None else model.classes.index(item.true_class))
    size = model.input_size
    return (np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8), np.asarray(labels, int),
            problems)


def look_only(model: ModelFile, images: np.ndarray) -> Recalibrated:
    """`model`'s calibration as it is, with the look this hospital's `images` (unlabelled) are best shown in
    (`core.learning.look_match`); the weights as released. Raises ModelFileError without the cell check's statistics
    or a calibration in the file, ValueError with too few images."""
    cal = model.calibration
    if cal is None or model.cell_stats() is None:
        raise ModelFileError(f"{model.path}: this model file carries no calibration or no cell-check statistics, so "
                             "the federation's look is not known")
    if cal.head_refitted or cal.class_offsets is not None:
        raise ModelFileError(f"{model.path}: its class scores were re-fitted to labelled images as they were shown "
                             "then, and another look would not match them; start from the federation's file (the "
                             "aggregator's), or re-calibrate with labelled images, which chooses the look too")
    match = matched_look(model, images)
    if match is None:
        raise ValueError(f"{len(images)} images are too few to choose a look by (at least {LOOK_IMAGES})")
    return Recalibrated(with_look(cal, match))


def save_recalibrated(model: ModelFile, result: Recalibrated, out: str | Path) -> Path:
    """A copy of `model`'s file with this hospital's calibration and re-fitted layer (written atomically; the
    original is kept)."""
    out = Path(out)
    if out.resolve() == Path(model.path).resolve():
        raise ModelFileError(f"{out}: write the re-calibrated model to a new file; the federation's stays as it is")
    with np.load(model.path) as data:
        weights = np.asarray(data["weights"]) if result.weights is None else np.asarray(result.weights, np.float32)
        meta = json.loads(bytes(np.asarray(data["meta"], np.uint8)).decode("utf-8"))
    meta["calibration"] = result.calibration.to_dict()
    meta["recalibrated_from"] = str(model.path)
    buf = io.BytesIO()
    np.savez(buf, weights=weights, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
    atomic_write_bytes(out, buf.getvalue(), mode=0o600)
    return out
