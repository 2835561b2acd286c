"""Results page: accuracy per round, the confusion matrix on this site's own validation
split, the model file, this site's privacy statement, and Classify (open or drop images;
the same code as `hemafed classify`)."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QDragEnterEvent, QDropEvent
from PySide6.QtWidgets import (
    QAbstractItemView,
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
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
    """(model file, confusion matrix on this site's validation split): the split the driver uses."""
    from hemafed.core.data.partition import stratified_split
    from hemafed.core.data.scan import scan_source
    from hemafed.core.learning.classify import load_model_file
    from hemafed.core.learning.dp_train import evaluate

    model = load_model_file(model_path)
    if not source or not Path(source).exists():
        return model, None
    site = scan_source(source, model.classes, size=model.input_size)
    if len(site.labels) == 0:
        return model, None
    _, val = stratified_split(site.labels, val_fraction, seed=seed)
    return model, evaluate(model.model, site.images[val], site.labels[val], len(model.classes))


class ClassifyPanel(QWidget):
    """Open or drop images; see the predicted class and the probabilities."""

    classified = Signal(object)  # ClassifyReport

    def __init__(self, results: ResultsPage) -> None:
        super().__init__()
        self.results = results
        self.job: Job | None = None
        self.report = None
        self.setAcceptDrops(True)
        note = QLabel(NOT_DIAGNOSTIC)
        note.setObjectName("warning")
        note.setWordWrap(True)
        self.open_btn = QPushButton("Open images…")
        self.open_btn.clicked.connect(self._open_dialog)
        self.folder_btn = QPushButton("Open folder…")
        self.folder_btn.clicked.connect(self._open_folder)
        self.status = QLabel("Open or drop image files (JPEG, PNG, TIFF, BMP; full-size microscope images are "
                             "fine) or a folder.")
        self.status.setWordWrap(True)
        row = QHBoxLayout()
        row.addWidget(self.open_btn)
        row.addWidget(self.folder_btn)
        row.addWidget(self.status, 1)
        self.table = QTableWidget(0, 4)
        self.table.setHorizontalHeaderLabels(["image", "predicted class", "confidence", "next most likely"])
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        for c in (1, 2):
            header.setSectionResizeMode(c, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(3, QHeaderView.ResizeMode.Stretch)
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.itemSelectionChanged.connect(self._show_probabilities)
        self.probs = Chart(height=2.0, min_height=150)
        layout = QVBoxLayout(self)
        layout.addWidget(note)
        layout.addLayout(row)
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
                                "above.")
            return False
        if self.job is not None:
            return False
        self.status.setText(f"Classifying {len(paths)} item(s)…")
        self.open_btn.setEnabled(False)
        self.folder_btn.setEnabled(False)

        def work(job: Job):
            from hemafed.core.learning.classify import classify_paths

            model = self.results.loaded_model(model_path)
            return classify_paths(model, paths, progress=job.progress, cancelled=job.cancelled)

        self.job = Job(work)
        self.job.signals.result.connect(self.show_report)
        self.job.signals.errored.connect(lambda m: self.status.setText(f"<b>Cannot classify:</b> {m}"))
        self.job.signals.finished.connect(self._done)
        self.job.start()
        return True

    def _done(self) -> None:
        self.job = None
        self.open_btn.setEnabled(True)
        self.folder_btn.setEnabled(True)

    def show_report(self, report) -> None:
        self.report = report
        preds = report.predictions
        self.table.setRowCount(len(preds))
        for r, p in enumerate(preds):
            name = QTableWidgetItem(Path(p.path).name)
            name.setToolTip(p.path)
            if p.error:
                values = [name, QTableWidgetItem("cannot be read"), QTableWidgetItem(""), QTableWidgetItem(p.error)]
            else:
                ranked = sorted(p.probabilities.items(), key=lambda kv: -kv[1])
                values = [name, QTableWidgetItem(p.predicted or ""), QTableWidgetItem(f"{ranked[0][1]:.0%}"),
                          QTableWidgetItem(", ".join(f"{c} {v:.0%}" for c, v in ranked[1:3]))]
            for c, item in enumerate(values):
                self.table.setItem(r, c, item)
        ok = [p for p in preds if not p.error]
        parts = [f"{len(ok)} image(s) classified"]
        if len(ok) < len(preds):
            parts.append(f"{len(preds) - len(ok)} could not be read")
        per_class = report.accuracy_per_class()
        if per_class:
            total = sum(int(v["images"]) for v in per_class.values())
            correct = sum(int(v["correct"]) for v in per_class.values())
            parts.append(f"{correct} of {total} match the class folder they are in ({correct / total:.0%})")
        self.status.setText(" · ".join(parts) + ".")
        if ok:
            self.table.selectRow(preds.index(ok[0]))
        self.classified.emit(report)

    def _show_probabilities(self) -> None:
        rows = self.table.selectionModel().selectedRows()
        if not rows or self.report is None:
            return
        p = self.report.predictions[rows[0].row()]
        if p.error:
            self.probs.empty(f"{Path(p.path).name}: {p.error}")
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
        mrow = QHBoxLayout()
        mrow.addWidget(self.model_label, 1)
        mrow.addWidget(open_model)
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

    def refresh_rounds(self) -> None:
        rows = [r for r in self.state.rounds if r.accuracy is not None]
        if not rows:
            return
        self.accuracy_chart.line([r.round for r in rows], [r.accuracy * 100 for r in rows], xlabel="round",
                                 ylabel="accuracy (%)", ylim=(0, 105), fmt="{:.0f}")

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
        self.model_label.setText(f"Model file: <b>{model.path}</b><br>{model.name}, {len(model.classes)} classes, "
                                 f"federation {model.federation_id}{rnd}. Use it on the Classify images tab.")
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
