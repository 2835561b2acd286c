"""The privacy report as a PDF: Qt's own text layout (`QTextDocument`) printed by `QPdfWriter`, A4, with page numbers.

Used by `hemafed report` and the app's *Export privacy report…* button; the HTML comes from
`network.site_report.to_html`, the signature is added after (`network.report_signature`). Qt is the only thing this
needs that the rest of the report does not, so a headless install can still write the HTML version.
"""

from __future__ import annotations

import os
import sys

from PySide6.QtCore import QBuffer, QIODevice, QMarginsF, QRectF, QSizeF, Qt
from PySide6.QtGui import QFont, QGuiApplication, QPageLayout, QPageSize, QPainter, QPdfWriter, QTextDocument
from PySide6.QtWidgets import QApplication

RESOLUTION = 300  # dots per inch of the PDF's layout units
MARGINS_MM = QMarginsF(16, 14, 16, 16)

_app: QApplication | None = None


def _ensure_app() -> None:
    """An application object for the font database (the app has one; the command line makes an offscreen one). A
    QApplication, not a bare QGuiApplication: in a process that shows widgets later (a test run, a script that
    exports then opens the window) there can only ever be one, and widgets need this kind."""
    global _app
    if QGuiApplication.instance() is not None:
        return
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    _app = QApplication(["hemafed-report"])


def html_to_pdf(html: str, title: str, footer: str = "") -> bytes:
    """The bytes of an A4 PDF of `html` (Qt's rich-text subset), `footer` and "page i of n" on every page."""
    _ensure_app()
    buffer = QBuffer()  # its own byte array (a temporary one passed in would be freed under it)
    buffer.open(QIODevice.OpenModeFlag.WriteOnly)
    writer = QPdfWriter(buffer)
    writer.setTitle(title)
    writer.setCreator("hemafed")
    writer.setResolution(RESOLUTION)
    writer.setPageLayout(QPageLayout(QPageSize(QPageSize.PageSizeId.A4), QPageLayout.Orientation.Portrait,
                                     MARGINS_MM, QPageLayout.Unit.Millimeter))
    page = writer.pageLayout().paintRectPixels(RESOLUTION)
    footer_h = int(RESOLUTION * 0.25)  # a quarter inch under the text for the footer
    doc = QTextDocument()
    font = QFont("DejaVu Sans")
    font.setPointSizeF(9.5)
    doc.setDefaultFont(font)
    doc.documentLayout().setPaintDevice(writer)
    doc.setHtml(html)
    doc.setPageSize(QSizeF(page.width(), page.height() - footer_h))
    n = doc.pageCount()
    painter = QPainter(writer)
    small = QFont("DejaVu Sans")
    small.setPointSizeF(7.5)
    try:
        for i in range(n):
            if i:
                writer.newPage()
            painter.save()
            painter.translate(0, -i * doc.pageSize().height())
            doc.drawContents(painter, QRectF(0, i * doc.pageSize().height(), page.width(), doc.pageSize().height()))
            painter.restore()
            painter.setFont(small)
            painter.setPen(Qt.GlobalColor.darkGray)
            band = QRectF(0, page.height() - footer_h * 0.8, page.width(), footer_h * 0.8)
            painter.drawText(band, int(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignBottom), footer)
            painter.drawText(band, int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignBottom),
                             f"page {i + 1} of {n}")
    finally:
        painter.end()
    buffer.close()
    return bytes(buffer.data())
