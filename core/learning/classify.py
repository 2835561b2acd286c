"""Using a federation's model on new images: load the model file a site saved, prepare
images exactly as training did, predict.

The desktop app's Classify panel and `hemafed classify` both call this module, so
the two can never disagree. Preprocessing is the training path step for step:
`imaging.open_rgb` (any format `scan` accepts, converted to 8-bit RGB) →
`imaging.centre_crop_resize` to the model's input size (what `scan_source(size=...)`
keeps: a full-field microscope image gets BloodMNIST's 200/360 centre crop first) →
`models.images_to_tensor` (the shared normalisation).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.classes import normalise_class_name
from ..data.imaging import ImageRejected, centre_crop_resize, is_image_name, is_junk, open_rgb
from ..errors import HemafedError
from ..npz_lock import open_npz
from .confidence import Calibration, look_text, offsets_text, softmax
from .models import build_model, get_spec, images_to_tensor, num_parameters, set_flat_params

ProgressFn = Callable[[int, int], None]

# A model file is a few MB; anything far larger is not one of ours and is refused
# before numpy reads it.
MAX_MODEL_FILE_BYTES = 512 * 1024 * 1024


class ModelFileError(HemafedError, ValueError):
    """A model file that cannot be used, with the reason in words."""


@dataclass
class ModelFile:
    """A loaded model (in eval mode) and what its file says about it."""

    path: Path
    model: object  # torch.nn.Module; typed loosely so importing this module does not need torch
    name: str
    classes: tuple[str, ...]
    input_size: int
    round: int | None
    federation_id: str | None
    calibration: Calibration | None = None  # fitted at the hospital that saved this file (core.learning.confidence)

    def cell_stats(self):
        """The federation's statistics for the cell check (`core.learning.cell_check.CellStats`), or None."""
        from .cell_check import CellStats
        from .fedsgd import moments_layout
        from .models import split_features

        head = split_features(self.model)[1]
        if moments_layout(head) is None:
            return None
        return CellStats.from_moments(head.cell_moments.detach().double().numpy())

    def logits(self, images: np.ndarray) -> np.ndarray:
        """The model's logits (N, C) for (N, H, W, 3) uint8 images at any size, each shown in this hospital's look
        first where its calibration has one (`core.learning.look_match`)."""
        import torch

        if len(images) == 0:
            return np.zeros((0, len(self.classes)), np.float32)
        if self.calibration is not None and self.calibration.look is not None:
            from .look_match import shown_in

            images = shown_in(np.asarray(images), self.calibration.image_look())
        with torch.no_grad():
            return self.model(images_to_tensor(images, self.input_size)).numpy()  # type: ignore[operator]

    def features(self, images: np.ndarray) -> np.ndarray:
        """What the model's trainable part sees (N, D) for (N, H, W, 3) uint8 images at any size, as they come (no
        hospital look): its fixed features as evaluation computes them (`models.evaluation_features`), so
        `head(features)` gives `logits` of a file without a look."""
        import torch

        from .models import evaluation_features

        with torch.no_grad():
            return evaluation_features(self.model)(images_to_tensor(images, self.input_size)).numpy()


def load_model_file(path: str | Path) -> ModelFile:
    """Load a model file written by the site (`network.site.save_model_file`): flat
    float32 `weights` plus a JSON `meta` (model, classes, input_size, round, federation_id)."""

    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such model file") from None
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if size > MAX_MODEL_FILE_BYTES:
        raise ModelFileError(f"{path}: {size / 1e6:.0f} MB is too large for a hemafed model file")
    try:
        with open_npz(io.BytesIO(path.read_bytes())) as data:
            if "weights" not in data or "meta" not in data:
                raise ModelFileError(f"{path}: not a hemafed model file (no 'weights'/'meta' arrays)")
            weights = np.asarray(data["weights"], dtype=np.float32)
            meta = json.loads(bytes(np.asarray(data["meta"], dtype=np.uint8)).decode("utf-8"))
    except ModelFileError:
        raise
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{path}: not a readable model file ({exc})") from exc
    try:
        name = str(meta["model"])
        classes = tuple(str(c) for c in meta["classes"])
        input_size = int(meta["input_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{path}: model file description is incomplete ({exc})") from exc
    try:
        spec = get_spec(name)
    except KeyError as exc:
        raise ModelFileError(f"{path}: {exc.args[0]}") from exc
    if spec.input_size != input_size:
        raise ModelFileError(f"{path}: model {name} takes {spec.input_size}-pixel input, the file says {input_size}")
    model = build_model(name, len(classes))
    if weights.ndim != 1 or weights.size != num_parameters(model):
        raise ModelFileError(f"{path}: {weights.size} weights do not fit {name} with {len(classes)} classes "
                             f"({num_parameters(model)} expected): saved by another version of hemafed whose model "
                             "of that name had another layout (the cell check's statistics changed size on "
                             "2026-12-03), or damaged; open it with the version that saved it, or use a model file "
                             "from a newer federation")
    try:
        set_flat_params(model, weights)
    except ValueError as exc:
        raise ModelFileError(f"{path}: {exc}") from exc
    model.eval()
    rnd = meta.get("round")
    calibration = None
    if meta.get("calibration") is not None:
        try:
            calibration = Calibration.from_dict(meta["calibration"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"{path}: the calibration in this model file is damaged ({exc})") from exc
    return ModelFile(path=path, model=model, name=name, classes=classes, input_size=input_size,
                     round=int(rnd) if isinstance(rnd, int) else None, federation_id=meta.get("federation_id"),
                     calibration=calibration)


def prepare_image(path: str | Path, size: int) -> tuple[np.ndarray, tuple[int, int], str | None]:
    """One image file as the model's input (size×size×3 uint8), its original (width, height)
    and the conversion applied, if any. Raises `ImageRejected` with the reason."""
    opened = open_rgb(path)
    try:
        return centre_crop_resize(opened.image, size), opened.image.size, opened.conversion
    finally:
        opened.image.close()


@dataclass(frozen=True)
class InputFile:
    path: Path
    true_class: str | None  # the class-named folder the file sits in, if any


def collect_inputs(paths: Iterable[str | Path], classes: Sequence[str]) -> tuple[list[InputFile], list[str]]:
    """Expand files and folders into image files; a file inside a folder named like one of
    `classes` gets that class as its true class. Returns (inputs, problems in words)."""
    by_name = {normalise_class_name(c): c for c in classes}
    inputs: list[InputFile] = []
    problems: list[str] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                rel_parts = file.relative_to(path).parts
                if any(part.startswith(".") for part in rel_parts) or is_junk(file):
                    continue
                if not is_image_name(file):
                    problems.append(f"{file}: unsupported file type {file.suffix or '(none)'}")
                    continue
                inputs.append(InputFile(file, by_name.get(normalise_class_name(file.parent.name))))
        elif path.is_file():
            if not is_image_name(path):
                problems.append(f"{path}: unsupported file type {path.suffix or '(none)'}")
                continue
            inputs.append(InputFile(path, by_name.get(normalise_class_name(path.parent.name))))
        else:
            problems.append(f"{path}: no such file or folder")
    return inputs, problems


@dataclass
class Prediction:
    path: str
    predicted: str | None
    probabilities: dict[str, float] = field(default_factory=dict)
    true_class: str | None = None
    original_size: tuple[int, int] | None = None
    conversion: str | None = None
    error: str | None = None
    # with a calibrated model: `probabilities` are the calibrated ones, these the model's own
    raw_probabilities: dict[str, float] | None = None
    uncertain: bool | None = None  # None: the model file carries no calibration, so no threshold either
    # None: the model file has no cell check (or no threshold for it); True: "not recognised", no class given
    out_of_distribution: bool | None = None
    reason: str | None = None

    def to_dict(self) -> dict:
        out: dict = {"path": self.path}
        if self.error:
            out["error"] = self.error
            return out
        out["predicted"] = None if self.out_of_distribution else self.predicted
        if self.out_of_distribution:
            out["closest_class"] = self.predicted  # the classifier's pick, not an answer
        if self.raw_probabilities is not None:
            out["probabilities"] = self.raw_probabilities
            out["calibrated_probabilities"] = self.probabilities
            if self.uncertain is not None:
                out["uncertain"] = self.uncertain
        else:
            out["probabilities"] = self.probabilities
        if self.out_of_distribution is not None:
            out["out_of_distribution"] = self.out_of_distribution
        if self.reason:
            out["reason"] = self.reason
        if self.true_class is not None:
            out["true_class"] = self.true_class
        if self.original_size is not None:
            out["original_size"] = list(self.original_size)
        if self.conversion:
            out["conversion"] = self.conversion
        return out


def percent(p: float) -> str:
    """A model's probability as a percentage with one decimal that never reads 100 % or 0 %: a softmax is never
    certain, and "100 %" tells an operator it is."""
    value = round(100.0 * float(p), 1)
    if value >= 100.0:
        return ">99.9%"
    if value <= 0.0:
        return "<0.1%"
    return f"{value:.1f}%"


@dataclass
class ClassifyReport:
    model: str
    predictions: list[Prediction]
    problems: list[str]
    # whether the model file's hospital re-fitted the federation's class scores to its own images (None: the file
    # carries no calibration)
    class_scores: str | None = None
    # the answers include that hospital's class offsets or its re-fitted final layer
    class_offsets_applied: bool = False
    # the look every image was shown in first, in words (core.learning.look_match; None: as they came)
    look: str | None = None

    def accuracy_per_class(self) -> dict[str, dict[str, float | int]]:
        """For files whose folder names their class: images, correct and accuracy per class."""
        out: dict[str, dict[str, float | int]] = {}
        for p in self.predictions:
            if p.true_class is None or p.error:
                continue
            row = out.setdefault(p.true_class, {"images": 0, "correct": 0})
            row["images"] += 1
            row["correct"] += int(p.predicted == p.true_class)
        for row in out.values():
            row["accuracy"] = row["correct"] / row["images"]
        return dict(sorted(out.items()))

    def write_csv(self, path: str | Path, classes: Sequence[str]) -> None:
        """One row per file: its class folder (if any), the prediction, the probability of each class (fractions,
        full precision, for a spreadsheet; calibrated when the model file carries a calibration), whether the
        answer is "uncertain" (empty without a calibration), whether the image is "not recognised" as a single
        blood cell (empty without the cell check; then "predicted" is empty too) and why a file could not be read."""
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "class folder", "predicted", "probability of predicted", "matches folder",
                             *(f"p({c})" for c in classes), "uncertain", "not recognised", "problem"])
            for p in self.predictions:
                unlike = "" if p.out_of_distribution is None else ("yes" if p.out_of_distribution else "no")
                if p.out_of_distribution:
                    writer.writerow([p.path, p.true_class or "", "", "", "", *([""] * len(classes)), "yes", unlike,
                                     ""])
                    continue
                probs = [p.probabilities.get(c, "") for c in classes] if not p.error else [""] * len(classes)
                match = "" if p.error or p.true_class is None else ("yes" if p.predicted == p.true_class else "no")
                top = p.probabilities.get(p.predicted, "") if p.predicted and not p.error else ""
                unsure = "" if p.uncertain is None else ("yes" if p.uncertain else "no")
                writer.writerow([p.path, p.true_class or "", "" if p.error else p.predicted, top, match, *probs,
                                 unsure, unlike, p.error or ""])

    def to_dict(self) -> dict:
        out: dict = {"model": self.model, "files": [p.to_dict() for p in self.predictions]}
        if self.class_scores is not None:
            out["class_scores"] = self.class_scores
        if self.look is not None:
            out["look"] = self.look
        if self.problems:
            out["problems"] = self.problems
        per_class = self.accuracy_per_class()
        if per_class:
            out["accuracy_per_class"] = per_class
            total = sum(int(r["images"]) for r in per_class.values())
            out["accuracy"] = sum(int(r["correct"]) for r in per_class.values()) / total
        return out


def classify_paths(model: ModelFile, paths: Iterable[str | Path], *, batch_size: int = 64,
                   progress: ProgressFn | None = None,
                   cancelled: Callable[[], bool] | None = None) -> ClassifyReport:
    """Predict every image under `paths`; a bad file is reported, never fatal. `cancelled`
    is polled between images (the app's Cancel)."""
    inputs, problems = collect_inputs(paths, model.classes)
    predictions: list[Prediction] = []
    batch: list[tuple[Prediction, np.ndarray]] = []

    cal = model.calibration
    check = model.cell_stats() if cal is not None and cal.not_a_cell_threshold is not None else None

    def flush() -> None:
        images = np.stack([img for _, img in batch])
        logits = model.logits(images)
        unlike = check.scores(images) if check is not None else None
        raw = softmax(logits)
        shown = cal.probabilities(logits) if cal is not None else raw
        for (pred, _), row, raw_row in zip(batch, shown, raw, strict=True):
            pred.probabilities = {c: float(v) for c, v in zip(model.classes, row, strict=True)}
            pred.predicted = model.classes[int(np.argmax(row))]
            if cal is not None:
                pred.raw_probabilities = {c: float(v) for c, v in zip(model.classes, raw_row, strict=True)}
                pred.uncertain = None if cal.threshold is None else bool(row.max() < cal.threshold)
                if pred.uncertain:
                    pred.reason = (f"uncertain — refer to a person: {percent(row.max())} is below "
                                   f"{percent(cal.threshold)}, the confidence at which this hospital's model "
                                   f"answers {cal.coverage_target:.0%} of its validation images")
        if unlike is not None:
            for (pred, _), score in zip(batch, unlike, strict=True):
                pred.out_of_distribution = bool(score > cal.not_a_cell_threshold)
                if pred.out_of_distribution:
                    pred.uncertain = True
                    pred.reason = (f"not recognised as an image of a single blood cell: its colour, stain and "
                                   f"texture are unlike the federation's images (score {score:.0f} above "
                                   f"{cal.not_a_cell_threshold:.0f}, which {cal.not_a_cell_false_alarms:.1%} of "
                                   f"{cal.not_a_cell_from or 'the validation images'} exceed) — no class is given")
        batch.clear()

    for i, item in enumerate(inputs):
        if cancelled is not None and cancelled():
            break
        if progress:
            progress(i, len(inputs))
        pred = Prediction(str(item.path), None, true_class=item.true_class)
        predictions.append(pred)
        try:
            image, original, conversion = prepare_image(item.path, model.input_size)
        except ImageRejected as exc:
            pred.error = f"{exc.reason}" + (f" ({exc.detail})" if exc.detail else "")
            continue
        pred.original_size, pred.conversion = original, conversion
        batch.append((pred, image))
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    if progress:
        progress(len(inputs), len(inputs))
    return ClassifyReport(model=model.name, predictions=predictions, problems=problems,
                          class_scores=None if cal is None else offsets_text(cal),
                          class_offsets_applied=cal is not None and (cal.class_offsets is not None
                                                                     or cal.head_refitted),
                          look=None if cal is None or cal.look is None else look_text(cal))
