"""Scanning a hospital's image source: what is usable, what is not, and why.

`scan_source` walks a class-folder tree, a CSV manifest or a MedMNIST `.npz`,
never stops on a bad file, and (when asked) keeps the usable images preprocessed
to the model's input size so the same pass feeds training.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..npz_lock import open_npz
from .classes import BLOODMNIST_CLASSES, normalise_class_name
from .imaging import (
    ImageRejected,
    Reason,
    array_to_rgb_uint8,
    centre_crop_resize,
    is_image_name,
    is_junk,
    open_rgb,
    resize_array_batch,
)

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
UsableFn = Callable[[Path, int], None]  # (file, label index) of each image that decoded
NOT_IN_CLASS_FOLDER = "not in a class folder"


@dataclass
class Problem:
    path: str
    reason: str
    detail: str = ""


@dataclass
class Conversion:
    path: str
    conversion: str


@dataclass
class ScanReport:
    """What a scan found. JSON-serialisable through `to_dict` / `to_json`."""

    source: str
    kind: str  # "folder" | "csv" | "npz"
    classes: list[str]
    per_class: dict[str, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    converted: list[Conversion] = field(default_factory=list)
    unknown_classes: dict[str, int] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)

    @property
    def total_valid(self) -> int:
        return sum(self.per_class.values())

    def to_dict(self) -> dict:
        data = asdict(self)
        data["total_valid"] = self.total_valid
        return data

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    def summary_lines(self) -> list[str]:
        lines = [f"Source: {self.source} ({self.kind})", "", f"{'class':<16}{'images':>8}"]
        lines += [f"{name:<16}{self.per_class.get(name, 0):>8}" for name in self.classes]
        lines += [f"{'total usable':<16}{self.total_valid:>8}", ""]
        if self.problems:
            lines.append(f"Skipped {len(self.problems)} file(s):")
            lines += [f"  {p.path}: {p.reason}" + (f" ({p.detail})" if p.detail else "")
                      for p in self.problems]
        else:
            lines.append("No problem files.")
        if self.converted:
            kinds = Counter(c.conversion for c in self.converted)
            lines.append("Converted: " + ", ".join(f"{n} × {k}" for k, n in kinds.items()))
        if self.unknown_classes:
            lines.append("Not in the federation's class list (not used): "
                         + ", ".join(f"{k} ({n})" for k, n in self.unknown_classes.items()))
        if self.ignored:
            lines.append(f"Ignored {len(self.ignored)} non-image file(s) (e.g. {self.ignored[0]}).")
        return lines


@dataclass
class SiteImages:
    """Usable images of a site, preprocessed to `size`, with the scan that found them."""

    images: np.ndarray  # (N, size, size, 3) uint8
    labels: np.ndarray  # (N,) int64, index into report.classes
    report: ScanReport


def scan_source(
    source: str | Path,
    classes: Sequence[str] = BLOODMNIST_CLASSES,
    *,
    size: int | None = None,
    npz_split: str = "train",
    progress: ProgressFn | None = None,
    on_usable: UsableFn | None = None,
) -> SiteImages:
    """Scan `source` (folder, .csv manifest or .npz). With `size`, keep the usable
    images centre-cropped and resized to `size`; without, only validate them.

    `on_usable(file, label)` hears each usable file of a folder or manifest, in the
    order of `labels` (the app lists them without decoding twice). An exception raised
    by `progress` stops the scan and propagates: that is how a caller cancels."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    classes = list(classes)
    if path.is_dir():
        report = ScanReport(str(path), "folder", classes)
        entries = _folder_entries(path, classes, report)
        return _decode_entries(entries, report, size, progress, on_usable)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        report = ScanReport(str(path), "csv", classes)
        entries = _csv_entries(path, classes, report)
        return _decode_entries(entries, report, size, progress, on_usable)
    if suffix == ".npz":
        return _scan_npz(path, classes, size, npz_split)
    raise ValueError(
        f"{path}: expected a folder with one sub-folder per class, a .csv manifest or a .npz file"
    )


def _class_index(classes: Sequence[str]) -> dict[str, int]:
    return {normalise_class_name(c): i for i, c in enumerate(classes)}


def _folder_entries(root: Path, classes: Sequence[str], report: ScanReport) -> list[tuple[Path, int]]:
    index = _class_index(classes)
    entries: list[tuple[Path, int]] = []
    for child in sorted(root.iterdir()):
        if child.is_file():
            if is_junk(child):
                report.ignored.append(_rel(child, root))
            elif is_image_name(child):
                report.problems.append(Problem(_rel(child, root), NOT_IN_CLASS_FOLDER))
            else:
                report.problems.append(Problem(_rel(child, root), Reason.UNSUPPORTED, child.suffix))
            continue
        label = index.get(normalise_class_name(child.name))
        files = sorted(p for p in child.rglob("*") if p.is_file())
        if label is None:
            usable = sum(1 for f in files if is_image_name(f))
            if usable or not child.name.startswith("."):
                report.unknown_classes[child.name] = usable
            continue
        for file in files:
            if any(part.startswith(".") for part in file.relative_to(child).parts[:-1]):
                continue
            if is_image_name(file):
                entries.append((file, label))
            elif is_junk(file):
                report.ignored.append(_rel(file, root))
            else:
                report.problems.append(Problem(_rel(file, root), Reason.UNSUPPORTED, file.suffix))
    return entries


def _csv_entries(manifest: Path, classes: Sequence[str], report: ScanReport) -> list[tuple[Path, int]]:
    index = _class_index(classes)
    base = manifest.parent
    entries: list[tuple[Path, int]] = []
    with manifest.open(newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.reader(fh))
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
        rows = rows[1:]
    for lineno, row in enumerate(rows, start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) < 2:
            report.problems.append(Problem(f"{manifest.name}:{lineno}", "malformed manifest row"))
            continue
        rel, raw_label = row[0].strip(), row[1].strip()
        label = _parse_label(raw_label, index, len(classes))
        if label is None:
            report.unknown_classes[raw_label] = report.unknown_classes.get(raw_label, 0) + 1
            continue
        file = (base / rel) if not Path(rel).is_absolute() else Path(rel)
        if not is_image_name(file):
            report.problems.append(Problem(rel, Reason.UNSUPPORTED, file.suffix))
            continue
        entries.append((file, label))
    return entries


def _parse_label(raw: str, index: dict[str, int], n_classes: int) -> int | None:
    if raw.isdigit():
        value = int(raw)
        return value if value < n_classes else None
    return index.get(normalise_class_name(raw))


def _decode_entries(
    entries: list[tuple[Path, int]],
    report: ScanReport,
    size: int | None,
    progress: ProgressFn | None,
    on_usable: UsableFn | None = None,
) -> SiteImages:
    root = Path(report.source) if report.kind == "folder" else Path(report.source).parent
    counts: Counter[int] = Counter()
    images: list[np.ndarray] = []
    labels: list[int] = []
    for i, (file, label) in enumerate(entries):
        if progress:
            progress(i, len(entries))
        try:
            opened = open_rgb(file)
        except ImageRejected as exc:
            report.problems.append(Problem(_rel(file, root), exc.reason, exc.detail))
            continue
        if opened.conversion:
            report.converted.append(Conversion(_rel(file, root), opened.conversion))
        counts[label] += 1
        if on_usable is not None:
            on_usable(file, label)
        if size is not None:
            images.append(centre_crop_resize(opened.image, size))
            labels.append(label)
        opened.image.close()
    if progress:
        progress(len(entries), len(entries))
    report.per_class = {name: counts.get(i, 0) for i, name in enumerate(report.classes)}
    side = size or 0
    arr = np.stack(images) if images else np.zeros((0, side, side, 3), np.uint8)
    return SiteImages(arr, np.asarray(labels, dtype=np.int64), report)


def _scan_npz(path: Path, classes: Sequence[str], size: int | None, split: str) -> SiteImages:
    report = ScanReport(str(path), "npz", list(classes))
    try:
        with open_npz(path) as data:
            key_img, key_lab = f"{split}_images", f"{split}_labels"
            if key_img not in data or key_lab not in data:
                raise ValueError(
                    f"{path.name} has no '{key_img}'/'{key_lab}' arrays (found: {sorted(data.files)})"
                )
            images = array_to_rgb_uint8(np.asarray(data[key_img]))
            labels = np.asarray(data[key_lab]).reshape(-1).astype(np.int64)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    if len(images) != len(labels):
        raise ValueError(f"{path.name}: {len(images)} images but {len(labels)} labels")
    bad = (labels < 0) | (labels >= len(classes))
    for i in np.flatnonzero(bad)[:100]:
        report.problems.append(Problem(f"{split}[{i}]", "label out of range", str(labels[i])))
    if bad.any():
        extra = Counter(int(v) for v in labels[bad])
        report.unknown_classes = {str(k): v for k, v in sorted(extra.items())}
    keep = ~bad
    images, labels = images[keep], labels[keep]
    counts = np.bincount(labels, minlength=len(classes))
    report.per_class = {name: int(counts[i]) for i, name in enumerate(classes)}
    if size is not None:
        images = resize_array_batch(images, size)
    return SiteImages(images, labels, report)


def _rel(file: Path, root: Path) -> str:
    try:
        return str(file.relative_to(root))
    except ValueError:
        return str(file)

