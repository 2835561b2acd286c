"""*Export privacy report…*: the site's signed privacy report (`network.site_report`) as PDF or HTML, from the app.

The Privacy page and the *What left this computer* page both have the button. It asks where to save (the format
follows the file name), writes the report of the chosen federation (the plan accepted last by default), signs it
with this site's identity key, and says in the page what it wrote and how to check it. The PDF is laid out here, on
the GUI thread (about a second for a 500-round ledger); everything it reads is this site's own store.
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import QFileDialog, QWidget

from .state import AppState

FILTERS = "PDF document (*.pdf);;Web page (*.html)"


def write_report(state: AppState, path: Path, federation: str | None = None) -> str:
    """Write the signed report to `path` (.pdf or .html); returns what to tell the operator. Raises `HemafedError`
    (or `OSError`) with the reason when there is nothing to report or the file cannot be written."""
    from hemafed.core.trust.identity import load_identity
    from hemafed.network.site_report import export_report, gather

    from .report_pdf import html_to_pdf

    identity = load_identity(state.state_dir)
    report = gather(state.state_dir, identity, federation)
    (written,) = export_report(report, identity, [Path(path)], html_to_pdf)
    return (f"Wrote <b>{written.name}</b> (federation {report.federation_id}) in {written.parent}, signed with this "
            f"site's key {report.site_short}. Check it with <tt>hemafed report --verify {written.name}</tt>.")


def export_dialog(parent: QWidget, state: AppState, federation: str | None = None) -> tuple[bool, str] | None:
    """Ask for a file name, then write the report there; (ok, message for the page), or None when cancelled."""
    from hemafed.core.errors import HemafedError

    name = f"privacy-report-{federation or 'site'}.pdf"
    path, chosen = QFileDialog.getSaveFileName(parent, "Export privacy report", str(Path.home() / name), FILTERS)
    if not path:
        return None
    if Path(path).suffix.lower() not in (".pdf", ".html", ".htm"):
        path += ".html" if "html" in chosen else ".pdf"
    QGuiApplication.setOverrideCursor(Qt.CursorShape.WaitCursor)
    try:
        return True, write_report(state, Path(path), federation)
    except (HemafedError, OSError, ValueError) as exc:
        return False, f"The report could not be written: {exc}"
    finally:
        QGuiApplication.restoreOverrideCursor()
