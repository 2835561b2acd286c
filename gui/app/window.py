"""The main window: a side list of pages, the pages, a status bar; geometry remembered."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QByteArray, QSize
from PySide6.QtGui import QCloseEvent, QIcon
from PySide6.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QMainWindow,
    QStackedWidget,
    QWidget,
)

from .data_page import DataPage
from .federation_page import FederationPage
from .outbound_page import OutboundPage
from .privacy_page import PrivacyPage
from .results_page import ResultsPage
from .state import AppState


class MainWindow(QMainWindow):
    def __init__(self, state: AppState) -> None:
        super().__init__()
        self.state = state
        self.setWindowTitle("hemafed — federated blood-cell classification")
        self.data_page = DataPage(state)
        self.privacy_page = PrivacyPage(state)
        self.federation_page = FederationPage(state)
        self.results_page = ResultsPage(state)
        self.outbound_page = OutboundPage(state)
        self.pages = [self.data_page, self.privacy_page, self.federation_page, self.results_page, self.outbound_page]
        hints = ["1. choose and check this hospital's images", "2. set how much privacy to spend",
                 "3. join the federation", "4. the model, and classify images",
                 "what left this computer: every message this site sent, and the privacy report"]

        self.nav = QListWidget()
        self.nav.setObjectName("nav")
        self.nav.setIconSize(QSize(20, 20))
        self.stack = QStackedWidget()
        for page, hint in zip(self.pages, hints, strict=True):
            item = QListWidgetItem(page.title)
            item.setToolTip(hint)
            self.nav.addItem(item)
            self.stack.addWidget(page)
        self.nav.currentRowChanged.connect(self.stack.setCurrentIndex)
        self.nav.setFixedWidth(150)
        central = QWidget()
        row = QHBoxLayout(central)
        row.setContentsMargins(0, 0, 0, 0)
        row.setSpacing(0)
        row.addWidget(self.nav)
        row.addWidget(self.stack, 1)
        self.setCentralWidget(central)

        self.status_data = QLabel()
        self.status_budget = QLabel()
        self.status_fed = QLabel("not joined")
        for w in (self.status_data, self.status_budget, self.status_fed):
            self.statusBar().addPermanentWidget(w)
        state.scanChanged.connect(self._status)
        state.budgetChanged.connect(self._status)
        self.federation_page.joinedChanged.connect(
            lambda joined: self.status_fed.setText("joined" if joined else "not joined"))
        self._status()

        geometry = state.settings.get_bytes("window/geometry")
        if geometry is None or not self.restoreGeometry(QByteArray(geometry)):
            self.resize(1280, 800)
        self.nav.setCurrentRow(int(state.settings.get_float("window/page", 0)))
        self._leaving = False

    def showEvent(self, event) -> None:
        super().showEvent(event)
        # Re-check the images remembered from last time, in the background, once shown.
        if self.state.scan is None and self.data_page.job is None and self.state.source \
                and Path(self.state.source).exists() and not self._rechecked:
            self._rechecked = True
            self.data_page.start_scan(self.state.source)

    _rechecked = False

    def _status(self) -> None:
        scan = self.state.scan
        self.status_data.setText(f"{scan.report.total_valid} images" if scan else "no images checked")
        self.status_budget.setText(f"budget ε = {self.state.epsilon:g}")

    def show_page(self, name: str) -> None:
        for i, page in enumerate(self.pages):
            if page.title.lower() == name.lower():
                self.nav.setCurrentRow(i)

    def closeEvent(self, event: QCloseEvent) -> None:
        """Leave a running federation first (the driver records nothing for an update that
        never left), then stop the workers; settings are saved."""
        fed = self.federation_page
        if fed.worker is not None and not self._leaving:
            self._leaving = True
            self.statusBar().showMessage("Leaving the federation before closing…")
            fed.joinedChanged.connect(lambda joined: joined or self.close())
            fed.leave()
            event.ignore()
            return
        self.state.settings.set("window/geometry", self.saveGeometry())
        self.state.settings.set("window/page", self.nav.currentRow())
        self.state.settings.sync()
        for page in (self.data_page, self.results_page):
            page.shutdown()
        fed.shutdown()
        self.state.shutdown()
        event.accept()


def app_icon() -> QIcon:
    from importlib.resources import files

    icon = QIcon()
    for name in ("hemafed.svg", "hemafed-256.png"):
        path = files("hemafed.assets") / name
        if path.is_file():
            icon.addFile(str(path))
    return icon


