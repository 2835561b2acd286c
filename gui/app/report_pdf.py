"""The privacy report as a PDF: Qt's own text layout (`QTextDocument`) printed by `QPdfWriter`, A4, with page numbers.

Used by `hemafed report` and the app's *Export privacy report…* button; the HTML comes from
`network.site_report.to_html`, the signature is added after (`network.report_signature`). Qt is the only thing this
needs that the rest of the report does not, so a headless install can still write the HTML version.
"""

from __future__ import annotations

import os
import sys

from PySide6.QtCore import QBuffer, QIODevice, QMarginsF, QRectF, QSizeF, Qt
from PySide6.QtGui import (
    QFont,
    QGuiApplication,
    QImage,
    QPageLayout,
    QPageSize,
    QPainter,
    QPdfWriter,
    QTextDocument,
)
from PySide6.QtWidgets import QApplication

RESOLUTION = 300  # dots per inch of the PDF's layout units
MARGINS_MM = QMarginsF(16, 14, 16, 16)
FOOTER_HEIGHT = int(RESOLUTION * 0.25)  # a quarter inch under the text for the footer

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
    writer.setPageLayout(_a4())
    page = writer.pageLayout().paintRectPixels(RESOLUTION)
    doc = _document(html, writer, page.width(), page.height())
    painter = QPainter(writer)
    try:
        for i in range(doc.pageCount()):
            if i:
                writer.newPage()
            _draw_page(painter, doc, i, page.width(), page.height(), footer)
    finally:
        painter.end()
    buffer.close()
    return bytes(buffer.data())


def html_to_images(html: str, footer: str = "", pages: int | None = None, width: int = 1240) -> list[QImage]:
    """The same A4 pages as `html_to_pdf` lays out (the same resolution, margins and footer), painted on images
    `width` pixels wide: the first `pages` of them (all when None). For the documentation's example pages."""
    _ensure_app()
    layout = _a4()
    full, page = layout.fullRectPixels(RESOLUTION), layout.paintRectPixels(RESOLUTION)

    def blank() -> QImage:
        image = QImage(full.width(), full.height(), QImage.Format.Format_RGB32)
        image.setDotsPerMeterX(round(RESOLUTION / 0.0254))  # so the fonts' points lay out as on the PDF's page
        image.setDotsPerMeterY(round(RESOLUTION / 0.0254))
        image.fill(Qt.GlobalColor.white)
        return image

    doc = _document(html, blank(), page.width(), page.height())
    images = []
    for i in range(min(doc.pageCount(), pages or doc.pageCount())):
        image = blank()
        painter = QPainter(image)
        painter.translate(page.x(), page.y())
        _draw_page(painter, doc, i, page.width(), page.height(), footer)
        painter.end()
        images.append(image.scaledToWidth(width, Qt.TransformationMode.SmoothTransformation))
    return images


def _a4() -> QPageLayout:
    return QPageLayout(QPageSize(QPageSize.PageSizeId.A4), QPageLayout.Orientation.Portrait, MARGINS_MM,
                       QPageLayout.Unit.Millimeter)


def _document(html: str, device, width: int, height: int) -> QTextDocument:
    doc = QTextDocument()
    font = QFont("DejaVu Sans")
    font.setPointSizeF(9.5)
    doc.setDefaultFont(font)
    doc.documentLayout().setPaintDevice(device)
    doc.setHtml(html)
    doc.setPageSize(QSizeF(width, height - FOOTER_HEIGHT))
    return doc


def _draw_page(painter: QPainter, doc: QTextDocument, i: int, width: int, height: int, footer: str) -> None:
    """Page `i` of `doc` and its footer ("page i of n"), with the painter's origin at the page's top left."""
    painter.save()
    painter.translate(0, -i * doc.pageSize().height())
    doc.drawContents(painter, QRectF(0, i * doc.pageSize().height(), width, doc.pageSize().height()))
    painter.restore()
    small = QFont("DejaVu Sans")
    small.setPointSizeF(7.5)
    painter.setFont(small)
    painter.setPen(Qt.GlobalColor.darkGray)
    band = QRectF(0, height - FOOTER_HEIGHT * 0.8, width, FOOTER_HEIGHT * 0.8)
    painter.drawText(band, int(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignBottom), footer)
    painter.drawText(band, int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignBottom),
                     f"page {i + 1} of {doc.pageCount()}")


def main(argv: list[str] | None = None) -> int:
    """`python -m hemafed.gui.app.report_pdf REPORT.html OUT_PREFIX [--pages N] [--footer TEXT] [--width PX]`: the
    report's first pages as OUT_PREFIX-1.png, -2.png, … (the documentation's example pages; the signed files are
    the report)."""
    import argparse
    from pathlib import Path

    ap = argparse.ArgumentParser(description=main.__doc__.split(":")[0])
    ap.add_argument("html", type=Path)
    ap.add_argument("prefix")
    ap.add_argument("--pages", type=int, default=2)
    ap.add_argument("--footer", default="")
    ap.add_argument("--width", type=int, default=1240, help="pixels (1240: 150 dots per inch)")
    args = ap.parse_args(argv)
    pages = html_to_images(args.html.read_text(encoding="utf-8"), args.footer, args.pages, args.width)
    for i, image in enumerate(pages, 1):
        path = f"{args.prefix}-{i}.png"
        if not image.save(path):
            raise SystemExit(f"could not write {path}")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
