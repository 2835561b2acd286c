"""Help for the operator: the four steps, the keyboard shortcuts, and About (version, where
this site keeps its records, and what the model is not)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from PySide6.QtWidgets import QDialog, QDialogButtonBox, QTextBrowser, QVBoxLayout, QWidget

# (keys, what they do): the window registers exactly these (window.py reads this table)
SHORTCUTS: list[tuple[str, str]] = [
    ("Ctrl+1", "Data page"),
    ("Ctrl+2", "Privacy page"),
    ("Ctrl+3", "Federation page"),
    ("Ctrl+4", "Results page"),
    ("Ctrl+5", "What was sent (what left this computer)"),
    ("Ctrl+O", "choose this hospital's image folder (Data page)"),
    ("Ctrl+J", "join the federation"),
    ("Ctrl+Shift+O", "classify images with the model (Results page)"),
    ("F1", "this help"),
    ("Ctrl+Q", "quit (leaves a running federation first)"),
]

GETTING_STARTED = """
<h3>What this app does</h3>
<p>It lets this hospital help train one blood-cell classifier with other hospitals <b>without sending its
images anywhere</b>. Only model updates leave this computer, with noise added and hidden inside secure
aggregation, and every update is charged to this hospital's privacy budget before it is sent.</p>
<h3>Four steps</h3>
<ol>
<li><b>Data</b>: choose the folder of blood-cell images (one sub-folder per cell type), a CSV list or an
.npz file, and check them. Unreadable files are listed and skipped; nothing is changed on disk.</li>
<li><b>Privacy</b>: set the budget ε this hospital is willing to spend (smaller means more private). The page
shows what the federation's plan would spend and whether it fits.</li>
<li><b>Federation</b>: enter the aggregator's address (from the federation's administrator), confirm the
certificate's fingerprint with them by phone, and press Join. You review the plan once; a rejoin with the same
plan needs no click.</li>
<li><b>Results</b>: the accuracy per round, the finished model, and Classify, to try the model on images.</li>
</ol>
<h3>When something goes wrong</h3>
<p>The red banner on the Federation page says what happened and what to do next in this app. The log there
has one line per round; tick “show every stage” for more.</p>
<p><i>Research model, not a diagnostic device: its predictions must not be used to diagnose or treat
patients.</i></p>
"""


def app_version() -> str:
    try:
        return version("hemafed")
    except PackageNotFoundError:
        return "development copy"


def shortcuts_html() -> str:
    rows = "".join(f"<tr><td><b>{keys}</b></td><td>&nbsp;&nbsp;{what}</td></tr>" for keys, what in SHORTCUTS)
    return f"<h3>Keyboard shortcuts</h3><table>{rows}</table>"


def about_html(state_dir: Path) -> str:
    return (f"<h3>hemafed {app_version()}</h3>"
            "<p>Privacy-preserving federated learning for blood-cell images: differentially private training at "
            "each hospital, secure aggregation between hospitals.</p>"
            f"<p>This hospital's records (privacy ledger, keys, round log, models) are kept in<br><b>{state_dir}</b>"
            "<br>Back this folder up; never delete it: the privacy spend it records would be lost.</p>"
            "<p><i>Research software, not a diagnostic device.</i></p>")


class HelpDialog(QDialog):
    def __init__(self, html: str, title: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle(title)
        text = QTextBrowser()
        text.setOpenExternalLinks(False)
        text.setHtml(html)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addWidget(text)
        layout.addWidget(buttons)
        self.resize(620, 560)
