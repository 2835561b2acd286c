"""The thumbnail grid's model: one row per usable image, filterable by class; icons are
decoded in a worker only when the view asks for them (the rows on screen)."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image
from PySide6.QtCore import QAbstractListModel, QModelIndex, QPersistentModelIndex, Qt, QTimer
from PySide6.QtGui import QColor, QImage, QPixmap

from .state import ScanResult
from .workers import Job

THUMB = 88
BATCH = 48
CACHE_LIMIT = 4000  # pixmaps kept; scrolling through 17,000 images must not hold them all

ItemRole = Qt.ItemDataRole.UserRole + 1
ClassRole = Qt.ItemDataRole.UserRole + 2


def array_to_qimage(rgb: np.ndarray) -> QImage:
    """A deep-copied QImage of an HxWx3 uint8 array (safe to hand across threads)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, _ = rgb.shape
    return QImage(rgb.data, w, h, 3 * w, QImage.Format.Format_RGB888).copy()


def thumbnail_image(source: Path | np.ndarray, size: int = THUMB) -> QImage:
    """Decode one thumbnail (worker thread): files are drafted down by the JPEG decoder first."""
    if isinstance(source, np.ndarray):
        img = Image.fromarray(source)
        resample = Image.Resampling.NEAREST if max(img.size) < size else Image.Resampling.BILINEAR
        img = img.resize((size, size), resample)
    else:
        img = open_for_display(source, size * 2)
        img.thumbnail((size, size), Image.Resampling.BILINEAR)
    return array_to_qimage(np.asarray(img.convert("RGB")))


def open_for_display(path: Path, at_least: int) -> Image.Image:
    """An image file as 8-bit RGB, converted exactly as the scan and training convert it (16-bit, CMYK, alpha,
    grayscale: `core.data.imaging.to_rgb`; PIL's own convert("RGB") clips 16-bit values to white). JPEGs are
    drafted down to about `at_least` pixels first."""
    from hemafed.core.data.imaging import to_rgb

    with Image.open(path) as opened:
        opened.draft("RGB", (at_least, at_least))
        opened.load()
        return to_rgb(opened).image


class ThumbnailModel(QAbstractListModel):
    def __init__(self) -> None:
        super().__init__()
        self.scan: ScanResult | None = None
        self.rows: np.ndarray = np.zeros(0, np.int64)  # item index per visible row
        self.class_filter: int | None = None
        self._cache: OrderedDict[int, QPixmap] = OrderedDict()
        self._pending: dict[int, None] = {}  # insertion-ordered set of item indices to load
        self._job: Job | None = None
        self._placeholder = QPixmap(THUMB, THUMB)
        self._placeholder.fill(QColor("#e8e8e8"))

    # -- content ------------------------------------------------------------------------------

    def set_scan(self, scan: ScanResult | None) -> None:
        self.beginResetModel()
        self.scan = scan
        self._cache.clear()
        self._pending.clear()
        self.class_filter = None
        self._apply_filter()
        self.endResetModel()

    def set_class_filter(self, label: int | None) -> None:
        self.beginResetModel()
        self.class_filter = label
        self._pending.clear()
        self._apply_filter()
        self.endResetModel()

    def _apply_filter(self) -> None:
        if self.scan is None:
            self.rows = np.zeros(0, np.int64)
        elif self.class_filter is None:
            self.rows = np.arange(len(self.scan.labels))
        else:
            self.rows = np.flatnonzero(self.scan.labels == self.class_filter)

    def item_name(self, item: int) -> str:
        assert self.scan is not None
        if self.scan.files:
            return self.scan.files[item].name
        return f"image {item}"

    def item_source(self, item: int) -> Path | np.ndarray:
        assert self.scan is not None
        if self.scan.files:
            return self.scan.files[item]
        assert self.scan.images is not None
        return self.scan.images[item]

    # -- Qt model -----------------------------------------------------------------------------

    def rowCount(self, parent: QModelIndex | QPersistentModelIndex = QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(self.rows)

    def data(self, index: QModelIndex | QPersistentModelIndex, role: int = Qt.ItemDataRole.DisplayRole) -> object:
        if not index.isValid() or self.scan is None:
            return None
        item = int(self.rows[index.row()])
        if role == Qt.ItemDataRole.DisplayRole:
            return self.item_name(item)
        if role == Qt.ItemDataRole.DecorationRole:
            pixmap = self._cache.get(item)
            if pixmap is None:
                self._request(item)
                return self._placeholder
            return pixmap
        if role == Qt.ItemDataRole.ToolTipRole:
            return f"{self.item_name(item)} — {self.scan.classes[int(self.scan.labels[item])]}"
        if role == ItemRole:
            return item
        if role == ClassRole:
            return self.scan.classes[int(self.scan.labels[item])]
        return None

    # -- lazy loading -------------------------------------------------------------------------

    def _request(self, item: int) -> None:
        if item in self._pending:
            return
        self._pending[item] = None
        if self._job is None:
            QTimer.singleShot(0, self._start_batch)

    def _start_batch(self) -> None:
        if self._job is not None or not self._pending or self.scan is None:
            return
        items = list(self._pending)[-BATCH:]  # the most recently asked for: what is on screen now
        for item in items:
            del self._pending[item]
        sources = [(item, self.item_source(item)) for item in items]

        def load(job: Job) -> list[tuple[int, QImage | None]]:
            out: list[tuple[int, QImage | None]] = []
            for item, source in sources:
                if job.cancelled():
                    break
                try:
                    out.append((item, thumbnail_image(source)))
                except Exception:  # a file that changed since the scan: leave the placeholder
                    out.append((item, None))
            return out

        self._job = Job(load)
        self._job.signals.result.connect(self._loaded)
        self._job.signals.finished.connect(self._batch_done)
        self._job.start()

    def _loaded(self, results: list[tuple[int, QImage | None]]) -> None:
        broken = QPixmap(THUMB, THUMB)
        broken.fill(QColor("#f4cccc"))
        for item, image in results:
            self._cache[item] = QPixmap.fromImage(image) if image is not None else broken
            if len(self._cache) > CACHE_LIMIT:
                self._cache.popitem(last=False)
        if results and len(self.rows):
            # only the rows that got an icon (a full-range dataChanged makes the view re-ask every row)
            rows = np.searchsorted(self.rows, [item for item, _ in results])
            rows = rows[(rows < len(self.rows))]
            if len(rows):
                self.dataChanged.emit(self.index(int(rows.min())), self.index(int(rows.max())),
                                      [Qt.ItemDataRole.DecorationRole])

    def _batch_done(self) -> None:
        self._job = None
        if self._pending:
            QTimer.singleShot(0, self._start_batch)

    def stop(self) -> None:
        """Cancel loading (page closed); the running batch ends at its next image."""
        self._pending.clear()
        if self._job is not None:
            self._job.cancel()

    def busy(self) -> bool:
        return self._job is not None or bool(self._pending)
