"""Small matplotlib charts embedded in the pages (bar, line, confusion matrix).

Each chart redraws from data it is given; it never computes anything itself."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PySide6.QtCore import Qt
from PySide6.QtGui import QImage, QPixmap, QResizeEvent
from PySide6.QtWidgets import QLabel, QSizePolicy

from .workers import Job

FONT_SIZE = 9
DPI = 100


def render(draw: Callable[[Figure], None], width: int, height: int, ratio: float = 1.0) -> QImage:
    """Draw a figure with Agg into a QImage (runs in a worker: a figure this size takes
    100-250 ms to lay out and draw, too long for the GUI thread)."""
    fig = Figure(figsize=(max(width, 50) / DPI, max(height, 50) / DPI), dpi=DPI * ratio, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    draw(fig)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    h, w, _ = rgba.shape
    image = QImage(rgba.data, w, h, 4 * w, QImage.Format.Format_RGBA8888).copy()
    image.setDevicePixelRatio(ratio)
    return image


class Chart(QLabel):
    """A chart drawn off the GUI thread (the mandelbrot pattern of the Qt examples: the
    worker makes a QImage, the widget a pixmap). Redrawn when its data or size changes."""

    def __init__(self, height: float = 2.6, min_height: int = 180) -> None:
        super().__init__()
        self.setMinimumHeight(min_height)
        self.setMinimumWidth(200)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self._draw: Callable[[Figure], None] | None = None
        self._job: Job | None = None
        self._dirty = False
        self._generation = 0  # a render started for older data is dropped when it lands
        self.renders = 0
        self.empty("")

    def busy(self) -> bool:
        return self._job is not None or (self._dirty and self.isVisible())

    def _show(self, draw: Callable[[Figure], None]) -> None:
        self._draw = draw
        self._generation += 1
        self._schedule()

    def _schedule(self) -> None:
        if self._draw is None or not self.isVisible():
            self._dirty = self._draw is not None
            return
        if self._job is not None:
            self._dirty = True
            return
        self._dirty = False
        draw, w, h, ratio, gen = self._draw, self.width(), self.height(), self.devicePixelRatioF(), self._generation
        self._job = Job(lambda job: (gen, render(draw, w, h, ratio)))
        self._job.signals.result.connect(self._rendered)
        self._job.signals.finished.connect(self._done)
        self._job.start()

    def _rendered(self, result: tuple[int, QImage]) -> None:
        gen, image = result
        if gen == self._generation and self._draw is not None:
            self.renders += 1
            self.setPixmap(QPixmap.fromImage(image))

    def _done(self) -> None:
        self._job = None
        if self._dirty:
            self._schedule()

    def resizeEvent(self, event: QResizeEvent) -> None:
        super().resizeEvent(event)
        if self._draw is not None:
            self._schedule()

    def showEvent(self, event) -> None:
        super().showEvent(event)
        if self._dirty:
            self._schedule()

    @staticmethod
    def _axes(fig: Figure):
        ax = fig.add_subplot()
        ax.tick_params(labelsize=FONT_SIZE)
        return ax

    def empty(self, message: str) -> None:
        self._draw = None
        self._generation += 1
        self.setPixmap(QPixmap())
        self.setWordWrap(True)
        self.setText(f"<span style='color:#666'>{message}</span>")

    def bars(self, labels: Sequence[str], values: Sequence[float], *, title: str = "", ylabel: str = "") -> None:
        labels, values = list(labels), list(values)

        def draw(fig: Figure) -> None:
            ax = self._axes(fig)
            bars = ax.bar(range(len(values)), values, color="#3b6ea8")
            ax.bar_label(bars, fontsize=FONT_SIZE - 1)
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=FONT_SIZE)
            ax.set_ylabel(ylabel, fontsize=FONT_SIZE)
            ax.set_title(title, fontsize=FONT_SIZE + 1)
            ax.margins(y=0.15)
            ax.spines[["top", "right"]].set_visible(False)

        self._show(draw)

    def line(self, x: Sequence[float], y: Sequence[float], *, title: str = "", xlabel: str = "", ylabel: str = "",
             hline: float | None = None, hline_label: str = "", ylim: tuple[float, float] | None = None,
             fmt: str = "{:.2f}") -> None:
        x, y = list(x), list(y)

        def draw(fig: Figure) -> None:
            ax = self._axes(fig)
            # markers only while they stay apart: 1,000 rounds of markers merge into a blob
            ax.plot(x, y, marker="o" if len(x) <= 40 else None, markersize=4, linewidth=1.4 if len(x) <= 200 else 1.0,
                    color="#3b6ea8")
            if len(x) > 12:  # too many points to label each: label the latest
                ax.annotate(fmt.format(y[-1]), (x[-1], y[-1]), textcoords="offset points", xytext=(0, 6),
                            ha="right", fontsize=FONT_SIZE - 1)
            if len(x) <= 12:
                for xi, yi in zip(x, y, strict=True):
                    ax.annotate(fmt.format(yi), (xi, yi), textcoords="offset points", xytext=(0, 6),
                                ha="center", fontsize=FONT_SIZE - 1)
            if hline is not None:
                ax.axhline(hline, color="#b03a2e", linestyle="--", linewidth=1)
                ax.annotate(hline_label, (0.01, hline), xycoords=("axes fraction", "data"),
                            textcoords="offset points", xytext=(0, 4), fontsize=FONT_SIZE - 1, color="#b03a2e")
            ax.set_xlabel(xlabel, fontsize=FONT_SIZE)
            ax.set_ylabel(ylabel, fontsize=FONT_SIZE)
            ax.set_title(title, fontsize=FONT_SIZE + 1)
            if len(x) <= 20:
                ax.set_xticks(list(x))
            else:
                ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))
            if ylim:
                ax.set_ylim(*ylim)
            else:
                ax.margins(y=0.2)
            ax.spines[["top", "right"]].set_visible(False)

        self._show(draw)

    def confusion(self, matrix: np.ndarray, classes: Sequence[str], *, title: str = "") -> None:
        matrix, classes = np.asarray(matrix).copy(), list(classes)

        def draw(fig: Figure) -> None:
            ax = self._axes(fig)
            ax.imshow(matrix, cmap="Blues")
            threshold = matrix.max() / 2 if matrix.size and matrix.max() else 1
            for (i, j), value in np.ndenumerate(matrix):
                ax.text(j, i, str(int(value)), ha="center", va="center", fontsize=FONT_SIZE - 1,
                        color="white" if value > threshold else "black")
            ax.set_xticks(range(len(classes)), classes, rotation=40, ha="right", fontsize=FONT_SIZE - 1)
            ax.set_yticks(range(len(classes)), classes, fontsize=FONT_SIZE - 1)
            ax.set_xlabel("predicted", fontsize=FONT_SIZE)
            ax.set_ylabel("true class", fontsize=FONT_SIZE)
            ax.set_title(title, fontsize=FONT_SIZE + 1)

        self._show(draw)
