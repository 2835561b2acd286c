"""Data page: choose the site's images, scan them in a worker (progress + Cancel), then
browse them by class, see the per-class counts, the train/validation split the site
will use, and every file that cannot be used (exportable as CSV)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PySide6.QtCore import QModelIndex, QSize, Qt
from PySide6.QtGui import QPixmap
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QListView,
    QProgressBar,
    QPushButton,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from .charts import Chart
from .state import AppState, ScanResult
from .thumbnails import ItemRole, ThumbnailModel, array_to_qimage, open_for_display
from .workers import Job

PREVIEW = 240


def run_scan(source: str, job: Job, model_path: Path | None = None) -> ScanResult:
    """The scan as the worker runs it: validate every file, note each usable one; with a model file that has the
    cell check (a previous federation's), point out the usable images it does not recognise as a single cell."""
    from hemafed.core.data.scan import scan_source

    check = _cell_check(model_path) if model_path is not None else None
    files: list[Path] = []
    labels: list[int] = []

    def usable(file: Path, label: int) -> None:
        files.append(file)
        labels.append(label)

    path = Path(source)
    npz = not path.is_dir() and path.suffix.lower() == ".npz"
    # with the check, a folder's or list's images are kept at the model's size as the scan decodes them (once)
    size = check[0] if check is not None and not npz else None
    site = scan_source(source, size=size, progress=job.progress, on_usable=usable)
    if site.report.kind == "npz":
        result = ScanResult(site.report, site.labels, images=site.images)
    else:
        result = ScanResult(site.report, np.asarray(labels, np.int64), files=files)
    if check is not None:
        size, stats, threshold = check
        if site.report.kind == "npz":
            names = [f"image {i}" for i in range(len(site.images))]
            images = np.asarray(site.images)
            if len(images) and images.shape[1] != size:
                from hemafed.core.data.imaging import resize_array_batch

                images = resize_array_batch(images, size)
        else:
            names, images = [str(f) for f in files], site.images
        result.unlike = [(n, float(v)) for n, v in zip(names, stats.scores(images), strict=True) if v > threshold]
    return result


def _cell_check(model_path: Path):
    """(input size, `CellStats`, threshold) of a model file with the cell check; None when it has none or cannot be
    read."""
    from hemafed.core.learning.classify import ModelFileError, load_model_file

    try:
        model = load_model_file(model_path)
    except ModelFileError:
        return None
    cal, stats = model.calibration, model.cell_stats()
    if stats is None or cal is None or cal.not_a_cell_threshold is None:
        return None
    return model.input_size, stats, cal.not_a_cell_threshold


class DataPage(QWidget):
    title = "Data"

    def __init__(self, state: AppState) -> None:
        super().__init__()
        self.state = state
        self.job: Job | None = None
        self.preview_job: Job | None = None

        intro = QLabel("Choose the images this hospital contributes: a folder with one sub-folder per cell class, "
                       "a CSV list (path,label) or a MedMNIST .npz file. Nothing leaves this computer.")
        intro.setWordWrap(True)
        self.path_edit = QLineEdit(state.source)
        self.path_edit.setPlaceholderText("folder, .csv or .npz")
        folder_btn = QPushButton("Choose folder…")
        folder_btn.clicked.connect(self._choose_folder)
        file_btn = QPushButton("Choose CSV or .npz…")
        file_btn.clicked.connect(self._choose_file)
        self.scan_btn = QPushButton("Check images")
        self.scan_btn.setObjectName("primary")
        self.scan_btn.clicked.connect(lambda: self.start_scan(self.path_edit.text().strip()))
        row = QHBoxLayout()
        row.addWidget(self.path_edit, 1)
        for b in (folder_btn, file_btn, self.scan_btn):
            row.addWidget(b)

        self.progress = QProgressBar()
        self.progress.setFormat("checking %v of %m files")
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.clicked.connect(self.cancel_scan)
        prow = QHBoxLayout()
        prow.addWidget(self.progress, 1)
        prow.addWidget(self.cancel_btn)
        self.progress_row = QWidget()
        self.progress_row.setLayout(prow)
        self.progress_row.setVisible(False)
        self.summary = QLabel("No images checked yet.")
        self.summary.setObjectName("summary")
        self.summary.setWordWrap(True)

        # thumbnails
        self.filter = QComboBox()
        self.filter.currentIndexChanged.connect(self._filter_changed)
        self.model = ThumbnailModel()
        self.grid = QListView()
        self.grid.setViewMode(QListView.ViewMode.IconMode)
        self.grid.setIconSize(QSize(88, 88))
        self.grid.setGridSize(QSize(112, 122))
        self.grid.setUniformItemSizes(True)
        # lay out 17,000 items a batch at a time between events, not in one go
        self.grid.setLayoutMode(QListView.LayoutMode.Batched)
        self.grid.setBatchSize(500)
        self.grid.setResizeMode(QListView.ResizeMode.Adjust)
        self.grid.setMovement(QListView.Movement.Static)
        self.grid.setWordWrap(False)
        self.grid.setTextElideMode(Qt.TextElideMode.ElideMiddle)
        self.grid.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.grid.setModel(self.model)
        self.grid.clicked.connect(self.show_preview)
        left = QWidget()
        lv = QVBoxLayout(left)
        lv.setContentsMargins(0, 0, 0, 0)
        frow = QHBoxLayout()
        frow.addWidget(QLabel("Show:"))
        frow.addWidget(self.filter, 1)
        lv.addLayout(frow)
        lv.addWidget(self.grid, 1)

        # preview
        self.preview_image = QLabel("Click an image to see it large.")
        self.preview_image.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.preview_image.setFixedSize(PREVIEW, PREVIEW)
        self.preview_image.setObjectName("preview")
        self.preview_info = QLabel("")
        self.preview_info.setWordWrap(True)
        self.preview_info.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        preview_box = QGroupBox("Preview")
        pv = QHBoxLayout(preview_box)
        pv.addWidget(self.preview_image)
        pv.addWidget(self.preview_info, 1)

        # counts, split, problems
        self.chart = Chart(height=2.4)
        self.split_table = QTableWidget(0, 4)
        self.split_table.setHorizontalHeaderLabels(["class", "training", "validation", "total"])
        self.split_table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.split_table.verticalHeader().setVisible(False)
        self.split_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.split_note = QLabel("")
        self.split_note.setWordWrap(True)
        split_w = QWidget()
        sv = QVBoxLayout(split_w)
        sv.addWidget(self.split_note)
        sv.addWidget(self.split_table)
        self.problems = QTableWidget(0, 3)
        self.problems.setHorizontalHeaderLabels(["file", "problem", "detail"])
        self.problems.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.problems.horizontalHeader().setSectionResizeMode(1, QHeaderView.ResizeMode.ResizeToContents)
        self.problems.horizontalHeader().setSectionResizeMode(2, QHeaderView.ResizeMode.Stretch)
        self.problems.verticalHeader().setVisible(False)
        self.problems.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.export_btn = QPushButton("Export list (CSV)…")
        self.export_btn.clicked.connect(self._export_dialog)
        self.export_btn.setEnabled(False)
        prob_w = QWidget()
        pw = QVBoxLayout(prob_w)
        pw.addWidget(self.problems)
        erow = QHBoxLayout()
        erow.addStretch(1)
        erow.addWidget(self.export_btn)
        pw.addLayout(erow)
        self.tabs = QTabWidget()
        self.tabs.addTab(self.chart, "Per class")
        self.tabs.addTab(split_w, "Train / validation")
        self.tabs.addTab(prob_w, "Problems")

        right = QWidget()
        rv = QVBoxLayout(right)
        rv.setContentsMargins(0, 0, 0, 0)
        rv.addWidget(preview_box)
        rv.addWidget(self.tabs, 1)
        splitter = QSplitter()
        splitter.addWidget(left)
        splitter.addWidget(right)
        splitter.setStretchFactor(0, 3)
        splitter.setStretchFactor(1, 2)

        layout = QVBoxLayout(self)
        layout.addWidget(intro)
        layout.addLayout(row)
        layout.addWidget(self.progress_row)
        layout.addWidget(self.summary)
        layout.addWidget(splitter, 1)
        state.planChanged.connect(self._show_split)

    # -- choosing and scanning ------------------------------------------------------------------

    def _choose_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Folder of images (one sub-folder per class)",
                                                self.path_edit.text())
        if path:
            self.path_edit.setText(path)
            self.start_scan(path)

    def _choose_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "CSV list or .npz file", self.path_edit.text(),
                                              "Image lists (*.csv *.npz)")
        if path:
            self.path_edit.setText(path)
            self.start_scan(path)

    def start_scan(self, source: str) -> None:
        if self.job is not None:
            return
        if not source:
            self.summary.setText("Choose a folder, CSV or .npz first.")
            return
        if not Path(source).exists():
            self.summary.setText(f"<b>{source} does not exist.</b> Check the drive is connected, or choose "
                                 "the folder again.")
            return
        self.path_edit.setText(source)
        self.summary.setText(f"Checking {source} …")
        self.progress.setRange(0, 0)
        self.progress_row.setVisible(True)
        self.scan_btn.setEnabled(False)
        model_path = self.state.model_path
        self.job = Job(lambda job: run_scan(source, job, model_path))
        self.job.signals.progress.connect(self._progress)
        self.job.signals.result.connect(self._scanned)
        self.job.signals.errored.connect(self._scan_failed)
        self.job.signals.cancelled.connect(lambda: self.summary.setText("Check cancelled; nothing was changed."))
        self.job.signals.finished.connect(self._scan_finished)
        self.job.start()

    def cancel_scan(self) -> None:
        if self.job is not None:
            self.job.cancel()
            self.cancel_btn.setEnabled(False)

    def _progress(self, i: int, n: int) -> None:
        self.progress.setRange(0, max(n, 1))
        self.progress.setValue(i)

    def _scan_failed(self, message: str) -> None:
        self.summary.setText(f"<b>Cannot read these images:</b> {message}")

    def _scan_finished(self) -> None:
        self.job = None
        self.progress_row.setVisible(False)
        self.cancel_btn.setEnabled(True)
        self.scan_btn.setEnabled(True)

    def _scanned(self, scan: ScanResult) -> None:
        self.state.set_scan(scan)
        report = scan.report
        self.model.set_scan(scan)
        self.filter.blockSignals(True)
        self.filter.clear()
        self.filter.addItem(f"all classes ({report.total_valid})", None)
        for i, name in enumerate(report.classes):
            self.filter.addItem(f"{name} ({report.per_class.get(name, 0)})", i)
        self.filter.blockSignals(False)
        n_problems = len(report.problems)
        parts = [f"<b>{report.total_valid} usable images</b> in {sum(1 for v in report.per_class.values() if v)} "
                 f"classes"]
        parts.append(f"<b>{n_problems} file(s) cannot be used</b> (see Problems)" if n_problems
                     else "no problem files")
        if report.converted:
            parts.append(f"{len(report.converted)} converted")
        if scan.unlike:
            parts.append(f"<b>{len(scan.unlike)} look unlike the federation's images</b> (not a single blood cell? "
                         "see Problems; they are still used)")
        if report.unknown_classes:
            parts.append("not used, folder name is not a cell class: " + ", ".join(
                f"{k} ({v})" for k, v in report.unknown_classes.items()) + " — rename it to one of the class names "
                "listed under Problems")
        self.summary.setText(" · ".join(parts))
        self.chart.bars(report.classes, [report.per_class.get(c, 0) for c in report.classes],
                        ylabel="images")
        self._fill_problems(scan)
        self._show_split()
        self.tabs.setTabText(2, f"Problems ({n_problems + len(scan.unlike)})")
        if n_problems or scan.unlike:
            self.tabs.setCurrentIndex(2)

    def _fill_problems(self, scan: ScanResult) -> None:
        rows = self.problem_rows(scan)
        self.problems.setRowCount(len(rows))
        for r, values in enumerate(rows):
            for c, value in enumerate(values):
                self.problems.setItem(r, c, QTableWidgetItem(value))
        self.export_btn.setEnabled(bool(rows))

    @staticmethod
    def problem_rows(scan: ScanResult) -> list[tuple[str, str, str]]:
        report = scan.report
        rows = [(p.path, p.reason, p.detail) for p in report.problems]
        rows += [(c.path, "converted (used)", c.conversion) for c in report.converted]
        accepted = ", ".join(report.classes)
        rows += [(name, "unknown class folder (not used)",
                  f"{n} image(s); rename the folder to one of: {accepted} (or leave it out)")
                 for name, n in report.unknown_classes.items()]
        rows += [(name, "looks unlike the federation's images (used)",
                  f"not recognised as a single blood cell by the last model's check (score {score:.0f}); look at "
                  "it and remove it from the folder if it is not one") for name, score in scan.unlike]
        return rows

    def export_problems(self, path: str | Path) -> int:
        assert self.state.scan is not None
        rows = self.problem_rows(self.state.scan)
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["file", "problem", "detail"])
            writer.writerows(rows)
        return len(rows)

    def _export_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export the problems list", "hemafed-problems.csv", "CSV (*.csv)")
        if path:
            n = self.export_problems(path)
            self.summary.setText(f"Exported {n} row(s) to {path}.")

    def _show_split(self) -> None:
        scan = self.state.scan
        split = self.state.split()
        if scan is None or split is None:
            self.split_table.setRowCount(0)
            self.split_note.setText("")
            return
        train, val = split
        classes = scan.classes
        tr = np.bincount(scan.labels[train], minlength=len(classes))
        va = np.bincount(scan.labels[val], minlength=len(classes))
        self.split_table.setRowCount(len(classes) + 1)
        for r, name in enumerate([*classes, "total"]):
            values = (name, *(str(int(v)) for v in ((tr[r], va[r], tr[r] + va[r]) if r < len(classes)
                                                    else (tr.sum(), va.sum(), tr.sum() + va.sum()))))
            for c, value in enumerate(values):
                item = QTableWidgetItem(value)
                if c:
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                self.split_table.setItem(r, c, item)
        plan = self.state.plan
        total = len(train) + len(val)
        self.split_note.setText(
            f"The site trains on {len(train)} images and keeps {len(val)} of {total} "
            f"({len(val) / max(total, 1):.0%}) to measure the model: the plan asks for {plan.val_fraction:.0%} of "
            "each class, rounded class by class (the table shows each). The split is fixed by the federation's "
            f"plan (seed {plan.seed}), so it is the same every round.")

    # -- browsing --------------------------------------------------------------------------------

    def _filter_changed(self, _index: int) -> None:
        self.model.set_class_filter(self.filter.currentData())

    def show_preview(self, index: QModelIndex) -> None:
        item = index.data(ItemRole)
        scan = self.state.scan
        if item is None or scan is None:
            return
        source = self.model.item_source(item)
        name = self.model.item_name(item)
        label = scan.classes[int(scan.labels[item])]

        def load(job: Job):
            from PIL import Image

            if isinstance(source, np.ndarray):
                h, w = source.shape[:2]
                return array_to_qimage(source), f"{name}<br>class: {label}<br>{w} × {h} pixels (from the .npz)"
            size = source.stat().st_size
            with Image.open(source) as img:
                w, h = img.size
            rgb = open_for_display(source, PREVIEW * 2)
            rgb.thumbnail((PREVIEW * 2, PREVIEW * 2))
            info = (f"<b>{source.name}</b><br>class: {label}<br>{w} × {h} pixels<br>"
                    f"{size / 1024:.1f} KB<br><small>{source.parent}</small>")
            return array_to_qimage(np.asarray(rgb)), info

        self.preview_job = Job(load)
        self.preview_job.signals.result.connect(self._preview_loaded)
        self.preview_job.start()

    def _preview_loaded(self, result) -> None:
        image, info = result
        mode = (Qt.TransformationMode.FastTransformation if image.width() < PREVIEW  # keep 28-px pixels crisp
                else Qt.TransformationMode.SmoothTransformation)
        pix = QPixmap.fromImage(image).scaled(PREVIEW, PREVIEW, Qt.AspectRatioMode.KeepAspectRatio, mode)
        self.preview_image.setPixmap(pix)
        self.preview_info.setText(info)

    def shutdown(self) -> None:
        self.model.stop()
        if self.job is not None:
            self.job.cancel()
