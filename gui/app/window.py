"""The main window: a side list of pages, the pages, a status bar; geometry remembered."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QByteArray, QSize, Qt
from PySide6.QtGui import QAction, QCloseEvent, QGuiApplication, QIcon, QKeySequence
from PySide6.QtWidgets import (
    QFrame,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QMainWindow,
    QScrollArea,
    QStackedWidget,
    QWidget,
)

from .data_page import DataPage
from .federation_page import FederationPage
from .help import GETTING_STARTED, SHORTCUTS, HelpDialog, about_html, shortcuts_html
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
            # a page scrolls rather than forcing its width on the window: at 150 % scaling or on a small
            # laptop screen the whole window must still fit
            area = QScrollArea()
            area.setWidgetResizable(True)
            area.setFrameShape(QFrame.Shape.NoFrame)
            area.setWidget(page)
            self.stack.addWidget(area)
        self.nav.currentRowChanged.connect(self.stack.setCurrentIndex)
        # as wide as the longest page name in the font the nav draws with (a fixed width clipped "What was sent")
        self.nav.ensurePolished()  # the style sheet sets the nav's font
        metrics = self.nav.fontMetrics()
        longest = max(metrics.horizontalAdvance(self.nav.item(i).text()) for i in range(self.nav.count()))
        self.nav.setFixedWidth(max(150, longest + 48))
        self.nav.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
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
        # the same value the Federation page draws its panel and banner from
        self.federation_page.statusChanged.connect(lambda status: self.status_fed.setText(status.headline()))
        self._status()

        self._menus()
        geometry = state.settings.get_bytes("window/geometry")
        if geometry is None or not self.restoreGeometry(QByteArray(geometry)):
            self.resize(1280, 800)
        self.fit_to_screen()
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

    def fit_to_screen(self) -> None:
        """Keep the window inside the screen it opens on: a geometry saved at another scaling or on a larger
        monitor would otherwise open partly off screen."""
        screen = self.screen() or QGuiApplication.primaryScreen()
        if screen is None:
            return
        room = screen.availableGeometry()
        if self.isMaximized() or room.isEmpty():
            return
        frame = self.frameGeometry()
        extra_w, extra_h = frame.width() - self.width(), frame.height() - self.height()
        w = min(self.width(), room.width() - extra_w)
        h = min(self.height(), room.height() - extra_h)
        if (w, h) != (self.width(), self.height()):
            self.resize(max(w, self.minimumWidth()), max(h, self.minimumHeight()))
        frame = self.frameGeometry()
        if not room.contains(frame):
            x = min(max(frame.x(), room.x()), room.right() - frame.width() + 1)
            y = min(max(frame.y(), room.y()), room.bottom() - frame.height() + 1)
            self.move(max(x, room.x()), max(y, room.y()))

    def _menus(self) -> None:
        """The Help menu and the keyboard shortcuts (help.SHORTCUTS lists exactly these)."""
        actions = {
            "Ctrl+1": lambda: self.nav.setCurrentRow(0),
            "Ctrl+2": lambda: self.nav.setCurrentRow(1),
            "Ctrl+3": lambda: self.nav.setCurrentRow(2),
            "Ctrl+4": lambda: self.nav.setCurrentRow(3),
            "Ctrl+5": lambda: self.nav.setCurrentRow(4),
            "Ctrl+O": self._choose_images,
            "Ctrl+J": self._join,
            "Ctrl+Shift+O": self._classify,
            "F1": self.show_help,
            "Ctrl+Q": self.close,
        }
        words = dict(SHORTCUTS)
        self.shortcut_actions: dict[str, QAction] = {}
        for keys, slot in actions.items():
            action = QAction(words[keys], self)
            action.setShortcut(QKeySequence(keys))
            action.triggered.connect(slot)
            self.addAction(action)  # active anywhere in the window, menu or not
            self.shortcut_actions[keys] = action
        menu = self.menuBar().addMenu("&Help")
        menu.addAction(self.shortcut_actions["F1"])
        menu.addAction("Keyboard shortcuts", lambda: self._dialog(shortcuts_html(), "Keyboard shortcuts"))
        menu.addSeparator()
        menu.addAction("About hemafed", lambda: self._dialog(about_html(self.state.state_dir), "About hemafed"))
        self.shortcut_actions["F1"].setText("Getting started")

    def _dialog(self, html: str, title: str) -> HelpDialog:
        dialog = HelpDialog(html, title, self)
        dialog.setModal(False)
        dialog.show()
        self.help_dialog = dialog
        return dialog

    def show_help(self) -> HelpDialog:
        return self._dialog(GETTING_STARTED + shortcuts_html(), "hemafed — getting started")

    def _choose_images(self) -> None:
        self.nav.setCurrentRow(0)
        self.data_page._choose_folder()

    def _join(self) -> None:
        self.nav.setCurrentRow(2)
        if self.federation_page.join_btn.isEnabled():
            self.federation_page.join_btn.click()

    def _classify(self) -> None:
        self.nav.setCurrentRow(3)
        self.results_page.tabs.setCurrentWidget(self.results_page.classify_panel)
        self.results_page.classify_panel._open_dialog()

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


