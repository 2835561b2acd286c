"""Results page: accuracy per round, the confusion matrix on this site's own validation
split, the model file, this site's privacy statement, and Classify (open or drop images;
the same code as `hemafed classify`)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from PySide6.QtCore import QSize, Qt, Signal
from PySide6.QtGui import QColor, QDragEnterEvent, QDropEvent, QIcon, QPixmap
from PySide6.QtWidgets import (
    QAbstractItemView,
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QProgressBar,
    QPushButton,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from .charts import Chart
from .state import AppState
from .workers import Job

NOT_DIAGNOSTIC = ("⚠ Research model, not a diagnostic device. Its predictions must not be used to diagnose or "
                  "treat patients.")


def site_validation_confusion(model_path: Path, source: str, val_fraction: float, seed: int):
    """(model file, confusion matrix on this site's validation split): the split the driver uses, answered as the
    file answers (with its class offsets or re-fitted final layer, when it has them)."""
    from hemafed.core.data.partition import stratified_split
    from hemafed.core.data.scan import scan_source
    from hemafed.core.learning.classify import load_model_file
    from hemafed.core.learning.site_trainer import confusion_counts

    model = load_model_file(model_path)
    if not source or not Path(source).exists():
        return model, None
    site = scan_source(source, model.classes, size=model.input_size)
    if len(site.labels) == 0:
        return model, None
    _, val = stratified_split(site.labels, val_fraction, seed=seed)
    logits = model.logits(site.images[val])
    answers = (model.calibration.adjusted(logits) if model.calibration is not None else logits).argmax(1)
    return model, confusion_counts(site.labels[val], answers, len(model.classes))


ADAPT_TIP = ("Re-fit a copy of this model to labelled images of your own (folders named after the classes), for "
             "images that look unlike the federation's (another stain, lamp or microscope): the stain strength, "
             "lamp and focus your images are shown in (the ones closest to the federation's look), its class scores "
             "(the final layer, kept near the federation's) and its 'uncertain' threshold. Nothing is sent; the "
             "model file you opened stays as it is.")
CANNOT_ADAPT_TIP = ("This model file cannot be adapted: it does not carry the federation's calibration and class "
                    "counts (saved before 2026-12-05, by a plan without secure aggregation, or not by a federation).")

COLUMNS = ["", "image", "class folder", "predicted class", "probability", "next most likely"]
THUMB_COL, NAME_COL, FOLDER_COL, PRED_COL, PROB_COL, NEXT_COL = range(len(COLUMNS))
CLASSIFY_THUMB = 40
PredictionRole = Qt.ItemDataRole.UserRole + 1
SortRole = Qt.ItemDataRole.UserRole + 2


class SortItem(QTableWidgetItem):
    """A cell that sorts by the value it was given (a probability sorts as a number, not as text)."""

    def __lt__(self, other: QTableWidgetItem) -> bool:
        mine, theirs = self.data(SortRole), other.data(SortRole)
        if mine is None or theirs is None:
            return super().__lt__(other)
        return mine < theirs


def _item(text: str, sort: object | None = None, tooltip: str = "") -> SortItem:
    item = SortItem(text)
    item.setData(SortRole, text.lower() if sort is None else sort)
    if tooltip:
        item.setToolTip(tooltip)
    return item


class ClassifyPanel(QWidget):
    """Open or drop images; see the predicted class and the probabilities, sort, export."""

    classified = Signal(object)  # ClassifyReport

    def __init__(self, results: ResultsPage) -> None:
        super().__init__()
        self.results = results
        self.job: Job | None = None
        self.report = None
        self.classes: list[str] = []
        self.setAcceptDrops(True)
        note = QLabel(NOT_DIAGNOSTIC)
        note.setObjectName("warning")
        note.setWordWrap(True)
        self.open_btn = QPushButton("Open images…")
        self.open_btn.clicked.connect(self._open_dialog)
        self.folder_btn = QPushButton("Open folder…")
        self.folder_btn.clicked.connect(self._open_folder)
        self.export_btn = QPushButton("Export CSV…")
        self.export_btn.setToolTip("One row per image: the prediction and the probability of every class")
        self.export_btn.setEnabled(False)
        self.export_btn.clicked.connect(self._export_dialog)
        self.status = QLabel("Open or drop image files (JPEG, PNG, TIFF, BMP; full-size microscope images are "
                             "fine) or a folder. Images in a folder named after a class are checked against it.")
        self.status.setWordWrap(True)
        row = QHBoxLayout()
        row.addWidget(self.open_btn)
        row.addWidget(self.folder_btn)
        row.addWidget(self.status, 1)
        row.addWidget(self.export_btn)
        self.progress = QProgressBar()
        self.progress.setFormat("classifying %v of %m images")
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.clicked.connect(self.cancel)
        prow = QHBoxLayout()
        prow.setContentsMargins(0, 0, 0, 0)
        prow.addWidget(self.progress, 1)
        prow.addWidget(self.cancel_btn)
        self.progress_row = QWidget()
        self.progress_row.setLayout(prow)
        self.progress_row.setVisible(False)

        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.horizontalHeaderItem(PROB_COL).setToolTip(
            "How sure the model is of its prediction. A model is never certain: it never shows 100 %.")
        self.table.horizontalHeaderItem(FOLDER_COL).setToolTip(
            "The class named by the folder the image is in, when the folder is named after a class")
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(THUMB_COL, QHeaderView.ResizeMode.Fixed)
        header.resizeSection(THUMB_COL, CLASSIFY_THUMB + 8)
        header.setSectionResizeMode(NAME_COL, QHeaderView.ResizeMode.Stretch)
        for c in (FOLDER_COL, PRED_COL, PROB_COL):
            header.setSectionResizeMode(c, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(NEXT_COL, QHeaderView.ResizeMode.Stretch)
        self.table.verticalHeader().setVisible(False)
        self.table.verticalHeader().setDefaultSectionSize(CLASSIFY_THUMB + 4)
        self.table.setIconSize(QSize(CLASSIFY_THUMB, CLASSIFY_THUMB))
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.itemSelectionChanged.connect(self._show_probabilities)
        self.probs = Chart(height=2.0, min_height=150)
        layout = QVBoxLayout(self)
        layout.addWidget(note)
        layout.addLayout(row)
        layout.addWidget(self.progress_row)
        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(self.table)
        split.addWidget(self.probs)
        split.setStretchFactor(0, 3)
        split.setStretchFactor(1, 2)
        layout.addWidget(split, 1)

    def dragEnterEvent(self, event: QDragEnterEvent) -> None:
        if event.mimeData().hasUrls():
            event.acceptProposedAction()

    def dropEvent(self, event: QDropEvent) -> None:
        paths = [u.toLocalFile() for u in event.mimeData().urls() if u.isLocalFile()]
        if paths:
            self.classify(paths)

    def _open_dialog(self) -> None:
        paths, _ = QFileDialog.getOpenFileNames(self, "Images to classify", "",
                                                "Images (*.jpg *.jpeg *.png *.tif *.tiff *.bmp)")
        if paths:
            self.classify(paths)

    def _open_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Folder of images to classify")
        if path:
            self.classify([path])

    def classify(self, paths: list[str]) -> bool:
        model_path = self.results.state.model_path
        if model_path is None:
            self.status.setText("<b>No model yet.</b> Join a federation until it finishes, or open a model file "
                                "on the “Model and accuracy” tab.")
            return False
        if self.job is not None:
            return False
        self.status.setText("Finding the images…")
        self.open_btn.setEnabled(False)
        self.folder_btn.setEnabled(False)
        self.progress.setRange(0, 0)
        self.progress_row.setVisible(True)
        self.cancel_btn.setEnabled(True)

        def work(job: Job):
            from hemafed.core.learning.classify import classify_paths

            from .thumbnails import thumbnail_image

            model = self.results.loaded_model(model_path)
            report = classify_paths(model, paths, progress=job.progress, cancelled=job.cancelled)
            thumbs = {}
            for p in report.predictions:  # the table's small pictures, decoded here, not on the GUI thread
                if job.cancelled():
                    break
                # an image that classified but cannot be drawn gets a row without a picture
                with contextlib.suppress(Exception):
                    if not p.error:
                        thumbs[p.path] = thumbnail_image(Path(p.path), CLASSIFY_THUMB)
            return model.classes, report, thumbs

        self.job = Job(work)
        self.job.signals.progress.connect(self._progress)
        self.job.signals.result.connect(lambda result: self.show_report(result[1], result[0], result[2]))
        self.job.signals.errored.connect(lambda m: self.status.setText(
            f"<b>Cannot classify:</b> {m}. Check that the model file is a hemafed model (open it again on the "
            "“Model and accuracy” tab)."))
        self.job.signals.cancelled.connect(lambda: self.status.setText("Cancelled; the table shows the previous "
                                                                       "results, if any."))
        self.job.signals.finished.connect(self._done)
        self.job.start()
        return True

    def _progress(self, done: int, total: int) -> None:
        self.progress.setRange(0, max(total, 1))
        self.progress.setValue(done)
        self.status.setText(f"Classifying {total} images…")

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()
            self.cancel_btn.setEnabled(False)

    def _done(self) -> None:
        self.job = None
        self.progress_row.setVisible(False)
        self.open_btn.setEnabled(True)
        self.folder_btn.setEnabled(True)

    def show_report(self, report, classes: list[str] | None = None, thumbs: dict | None = None) -> None:
        from hemafed.core.learning.classify import percent

        self.report, thumbs = report, thumbs or {}
        self.classes = list(classes) if classes else sorted({c for p in report.predictions for c in p.probabilities})
        preds = report.predictions
        self.table.setSortingEnabled(False)  # rows are filled in order, then sorted as the operator chose
        self.table.setRowCount(len(preds))
        for r, p in enumerate(preds):
            thumb = _item("", sort=r)
            if p.path in thumbs:
                thumb.setIcon(QIcon(QPixmap.fromImage(thumbs[p.path])))
            name = _item(Path(p.path).name, tooltip=p.path)
            name.setData(PredictionRole, r)
            folder = _item(p.true_class or "—", sort=p.true_class or "~")
            if p.error:
                values = [thumb, name, folder, _item("cannot be read", sort="~"), _item("", sort=-1.0),
                          _item(p.error)]
            else:
                ranked = sorted(p.probabilities.items(), key=lambda kv: -kv[1])
                predicted = _item(p.predicted or "")
                if p.out_of_distribution:
                    # not an image of a single blood cell: no class is an answer
                    predicted.setText("not recognised (not a single blood cell?)")
                    predicted.setForeground(QColor("#8a1c1c"))
                    predicted.setToolTip(p.reason or "")
                elif p.uncertain:
                    # the class stays visible but is not given as the answer: a person decides
                    predicted.setText(f"uncertain (maybe {p.predicted})")
                    predicted.setForeground(QColor("#8a5a00"))
                    predicted.setToolTip(p.reason or "")
                elif p.true_class is not None and p.predicted != p.true_class:
                    predicted.setText(f"{p.predicted}  ≠ folder")
                    predicted.setForeground(QColor("#b03a2e"))
                    predicted.setToolTip(f"The model says {p.predicted}; the folder says {p.true_class}.")
                if p.out_of_distribution:  # no class is an answer, so no class's probability either
                    values = [thumb, name, folder, predicted, _item("—", sort=-0.5),
                              _item("closest class: " + (p.predicted or "—"), tooltip=p.reason or "")]
                else:
                    values = [thumb, name, folder, predicted, _item(percent(ranked[0][1]), sort=ranked[0][1]),
                              _item(", ".join(f"{c} {percent(v)}" for c, v in ranked[1:3]))]
            for c, item in enumerate(values):
                self.table.setItem(r, c, item)
        self.table.setSortingEnabled(True)
        ok = [p for p in preds if not p.error]
        parts = [f"{len(ok)} image(s) classified"]
        if len(ok) < len(preds):
            parts.append(f"{len(preds) - len(ok)} could not be read (see the last column)")
        per_class = report.accuracy_per_class()
        if per_class:
            total = sum(int(v["images"]) for v in per_class.values())
            correct = sum(int(v["correct"]) for v in per_class.values())
            parts.append(f"{correct} of {total} match the class folder they are in ({correct / total:.0%})")
        if any(p.out_of_distribution is not None for p in ok):
            unlike = sum(1 for p in ok if p.out_of_distribution)
            parts.append(f"{unlike} not recognised as a single blood cell")
        if any(p.uncertain is not None for p in ok):
            unsure = sum(1 for p in ok if p.uncertain and not p.out_of_distribution)
            parts.append(f"{unsure} uncertain: refer to a person (calibrated probabilities)")
        elif any(p.raw_probabilities is not None for p in ok):
            parts.append("calibrated probabilities (this model file has no 'uncertain' threshold)")
        elif ok:
            parts.append("probabilities as the model gives them (this model file is not calibrated)")
        if ok and report.class_offsets_applied:
            parts.append("class scores adjusted to this hospital's images")
        if ok and report.look:
            parts.append("images shown in the federation's look (this hospital's adaptation)")
        self.status.setText(" · ".join(parts) + ". Click a column title to sort.")
        self.export_btn.setEnabled(bool(preds))
        if ok:
            self.table.selectRow(self._row_of(preds.index(ok[0])))
        self.classified.emit(report)

    def _row_of(self, index: int) -> int:
        """The table row showing `report.predictions[index]` (rows move when sorted)."""
        for row in range(self.table.rowCount()):
            if self.table.item(row, NAME_COL).data(PredictionRole) == index:
                return row
        return -1

    def prediction_at(self, row: int):
        return self.report.predictions[self.table.item(row, NAME_COL).data(PredictionRole)]

    def export_csv(self, path: str | Path) -> None:
        self.report.write_csv(path, self.classes)
        self.status.setText(f"Saved {len(self.report.predictions)} rows to {path}.")

    def _export_dialog(self) -> None:
        if self.report is None:
            return
        path, _ = QFileDialog.getSaveFileName(self, "Export the predictions", "predictions.csv", "CSV (*.csv)")
        if not path:
            return
        try:
            self.export_csv(path)
        except OSError as exc:
            self.status.setText(f"<b>Cannot save {path}:</b> {exc.strerror or exc}. Choose another folder.")

    def _show_probabilities(self) -> None:
        rows = self.table.selectionModel().selectedRows()
        if not rows or self.report is None:
            return
        p = self.prediction_at(rows[0].row())
        if p.error:
            self.probs.empty(f"{Path(p.path).name}: {p.error}")
            return
        if p.out_of_distribution:
            self.probs.empty(f"{Path(p.path).name}: not recognised as an image of a single blood cell, so no class "
                             "is given. Its colour, stain and texture are unlike the federation's images.")
            return
        self.probs.bars(list(p.probabilities), [round(v * 100, 1) for v in p.probabilities.values()],
                        title=f"{Path(p.path).name}: probability per class (%)", ylabel="%")


class ResultsPage(QWidget):
    title = "Results"

    def __init__(self, state: AppState) -> None:
        super().__init__()
        self.state = state
        self.job: Job | None = None
        self._model_cache: tuple[Path, float, object] | None = None
        self.confusion = None
        self._adapted_path: Path | None = None  # the copy "Adapt to our images…" wrote, opened when its job ends
        self.adapt_note = ""  # what that copy was fitted on, shown once beside it

        self.accuracy_chart = Chart(height=2.2)
        self.accuracy_chart.empty("No rounds yet: accuracy per round appears here during a federation.")
        self.confusion_chart = Chart(height=2.6, min_height=220)
        self.confusion_chart.empty("The confusion matrix on this site's validation images appears when a model "
                                   "is available.")
        self.model_label = QLabel("No model yet.")
        self.model_label.setWordWrap(True)
        self.model_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        open_model = QPushButton("Open model file…")
        open_model.clicked.connect(self._open_model)
        self.adapt_btn = QPushButton("Adapt to our images…")
        self.adapt_btn.setToolTip(ADAPT_TIP)
        self.adapt_btn.clicked.connect(self._adapt_dialog)
        self.adapt_btn.setEnabled(False)
        mrow = QHBoxLayout()
        mrow.addWidget(self.model_label, 1)
        buttons = QVBoxLayout()
        buttons.addWidget(open_model)
        buttons.addWidget(self.adapt_btn)
        buttons.addStretch(1)
        mrow.addLayout(buttons)
        self.statement = QTextBrowser()
        self.statement.setOpenExternalLinks(False)

        charts = QWidget()
        cv = QVBoxLayout(charts)
        cv.setContentsMargins(0, 0, 0, 0)
        acc_box = QGroupBox("Accuracy per round (all sites' validation images)")
        QVBoxLayout(acc_box).addWidget(self.accuracy_chart)
        conf_box = QGroupBox("This site's validation images")
        QVBoxLayout(conf_box).addWidget(self.confusion_chart)
        cv.addWidget(acc_box, 1)
        cv.addWidget(conf_box, 1)

        overview = QWidget()
        ov = QVBoxLayout(overview)
        ov.addLayout(mrow)
        split = QSplitter()
        split.addWidget(charts)
        stmt_box = QGroupBox("This site's privacy statement")
        QVBoxLayout(stmt_box).addWidget(self.statement)
        split.addWidget(stmt_box)
        split.setStretchFactor(0, 3)
        split.setStretchFactor(1, 2)
        ov.addWidget(split, 1)

        self.classify_panel = ClassifyPanel(self)
        self.tabs = QTabWidget()
        self.tabs.addTab(overview, "Model and accuracy")
        self.tabs.addTab(self.classify_panel, "Classify images")
        layout = QVBoxLayout(self)
        layout.addWidget(self.tabs)

        state.roundsChanged.connect(self.refresh_rounds)
        state.modelChanged.connect(self.refresh_model)
        state.ledgersChanged.connect(self.refresh_statement)
        state.planChanged.connect(self.refresh_statement)
        self.refresh_statement()
        self.refresh_rounds()

    def loaded_model(self, path: Path):
        """The model file, loaded once per file version (called from workers)."""
        from hemafed.core.learning.classify import load_model_file

        mtime = path.stat().st_mtime
        cached = self._model_cache
        if cached is not None and cached[0] == path and cached[1] == mtime:
            return cached[2]
        model = load_model_file(path)
        self._model_cache = (path, mtime, model)
        return model

    def _open_model(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "A hemafed model file", str(self.state.state_dir),
                                              "Model files (*.npz)")
        if path:
            self.state.set_model(Path(path))

    def _adapt_dialog(self) -> None:
        model = self.state.model_path
        if model is None:
            return
        folder = QFileDialog.getExistingDirectory(self, "Labelled images of your own (one folder per class)",
                                                  str(model.parent))
        if not folder:
            return
        out, _ = QFileDialog.getSaveFileName(self, "Save the adapted copy as", str(model.with_name(
            model.stem + "-ours.npz")), "Model files (*.npz)")
        if out:
            self.adapt(Path(folder), Path(out))

    def adapt(self, folder: Path, out: Path) -> bool:
        """Re-calibrate a copy of the open model on the labelled images under `folder`, save it as `out` and open
        it (on a worker; the label says what was fitted, or why not)."""
        from hemafed.core.learning.local_calibration import labelled_images, recalibrate, save_recalibrated

        path = self.state.model_path
        if path is None or self.job is not None:
            return False
        self.adapt_btn.setEnabled(False)
        self.model_label.setText(f"Adapting <b>{path.name}</b> to the labelled images in <b>{folder}</b>…")

        def work(job: Job):
            model = self.loaded_model(path)
            images, labels, skipped = labelled_images(model, [folder])
            result = recalibrate(model, images, labels)  # ModelFileError, ValueError: said in the label
            return save_recalibrated(model, result, out), len(labels), skipped

        self.job = Job(work)
        self.job.signals.result.connect(self._adapted)
        self.job.signals.errored.connect(lambda m: self.model_label.setText(
            f"<b>Could not adapt the model:</b> {m}<br>The model file is unchanged."))
        self.job.signals.finished.connect(self._adapt_done)
        self.job.start()
        return True

    def _adapt_done(self) -> None:
        self.job = None
        self.adapt_btn.setEnabled(self.state.model_path is not None)
        if self._adapted_path is not None:
            path, self._adapted_path = self._adapted_path, None
            self.state.set_model(path)  # refresh_model runs now that no job holds the page

    def _adapted(self, result) -> None:
        from hemafed.core.learning.local_calibration import small_sample_note

        path, images, skipped = result
        self._adapted_path = path

        caution = small_sample_note(images)
        self.adapt_note = (f"Adapted on {images} labelled images of your own"
                           + (f" ({len(skipped)} files skipped: not in a class folder, or unreadable)" if skipped
                              else "") + f"; saved as {path.name}. Keep this copy at your hospital: it is "
                           "fitted to your labelled images."
                           + (f" <i>Caution: {caution}.</i>" if caution else ""))

    def refresh_rounds(self) -> None:
        rows = [r for r in self.state.rounds if r.accuracy is not None]
        if not rows:
            self.accuracy_chart.empty("No rounds yet: accuracy per round appears here during a federation.")
            return
        last = rows[-1]
        self.accuracy_chart.line([r.round for r in rows], [r.accuracy * 100 for r in rows], xlabel="round",
                                 ylabel="accuracy (%)", ylim=(0, 105), fmt="{:.0f}",
                                 title=(f"federation {self.state.rounds_federation}: "
                                        if self.state.rounds_federation else "")
                                       + f"{last.accuracy:.1%} at round {last.round}")

    def refresh_model(self) -> None:
        path = self.state.model_path
        if path is None or self.job is not None:
            return
        self.model_label.setText(f"Model file: <b>{path}</b> (loading…)")
        plan = self.state.plan
        source = self.state.source

        def work(job: Job):
            model, confusion = site_validation_confusion(path, source, plan.val_fraction, plan.seed)
            self._model_cache = (path, path.stat().st_mtime, model)
            return model, confusion

        self.job = Job(work)
        self.job.signals.result.connect(self._model_ready)
        self.job.signals.errored.connect(lambda m: self.model_label.setText(f"<b>Cannot use the model file:</b> {m}"))
        self.job.signals.finished.connect(self._model_done)
        self.job.start()

    def _model_done(self) -> None:
        self.job = None

    def _model_ready(self, result) -> None:
        model, confusion = result
        self.confusion = confusion
        rnd = f", after round {model.round}" if model.round is not None else ""
        from hemafed.core.learning.confidence import look_text, offsets_text

        cal = model.calibration
        scores = offsets_text(cal)
        looked = look_text(cal)
        scores = scores[0].upper() + scores[1:] + (f"; {looked}" if looked else "")
        self.model_label.setText(f"Model file: <b>{model.path}</b><br>{model.name}, {len(model.classes)} classes, "
                                 f"federation {model.federation_id}{rnd}. Use it on the Classify images tab.<br>"
                                 + (f"{self.adapt_note}<br>" if self.adapt_note else "")
                                 + (f"{scores}." if cal is not None else "This model file is not calibrated."))
        self.adapt_note = ""
        adaptable = cal is not None and cal.federation_classes is not None
        self.adapt_btn.setEnabled(adaptable)
        self.adapt_btn.setToolTip(ADAPT_TIP if adaptable else CANNOT_ADAPT_TIP)
        if confusion is None:
            self.confusion_chart.empty("No validation images: check the images on the Data page.")
        else:
            acc = confusion.trace() / max(confusion.sum(), 1)
            self.confusion_chart.confusion(confusion, model.classes,
                                           title=f"{int(confusion.sum())} images, {acc:.1%} correct")

    def refresh_statement(self) -> None:
        from hemafed.network.privacy_statement import privacy_statement

        plan = self.state.plan
        ledger = self.state.ledger_for(plan.federation_id) if self.state.plan_received else None
        if ledger is None or "error" in ledger:
            self.statement.setMarkdown("No federation rounds trained at this site yet. The statement appears "
                                       "after this site has trained.\n\nPlanned budget: ε = "
                                       f"{self.state.epsilon:g}.")
            return
        entries = self.state.ledger_entries(plan.federation_id)
        sigma = f"{entries[-1].sigma:.3f}" if entries else "—"
        last = entries[-1] if entries else None
        distributed = last is not None and last.dp_mode == "distributed"
        mode = ("distributed DP (a share of the noise, inside secure aggregation)" if distributed
                else "local DP-SGD" if plan.dp else "no DP")
        head = (f"**This site, federation {plan.federation_id}:** {ledger['rounds']} round(s) trained, "
                f"ε spent = {ledger['spent_epsilon']:.4g} of its budget {ledger['budget_epsilon']:g} at "
                f"δ = {ledger['delta']:.2g} (accountant: {ledger['accountant'].upper()}); per-image clip "
                f"{plan.clip_norm:g}, noise σ = {sigma}; mode: "
                f"{mode} + {'secure aggregation' if plan.secagg else 'plain updates'}.")
        body = privacy_statement(dp=plan.dp, secagg=plan.secagg, epsilon=ledger["spent_epsilon"],
                                 delta=ledger["delta"], threshold=plan.threshold,
                                 accountant=ledger["accountant"].upper(),
                                 dp_mode="distributed" if distributed else "local",
                                 colluders=last.colluders if distributed else plan.dp_colluders)
        self.statement.setMarkdown(head + "\n\n" + body)

    def shutdown(self) -> None:
        for job in (self.job, self.classify_panel.job):
            if job is not None:
                job.cancel()
