"""Small matplotlib charts embedded in the pages (bar, line, confusion matrix).

Each chart redraws from data it is given; it never computes anything itself."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from PySide6.QtWidgets import QSizePolicy

FONT_SIZE = 9


class Chart(FigureCanvasQTAgg):
    def __init__(self, height: float = 2.6, min_height: int = 180) -> None:
        self.figure = Figure(figsize=(5, height), layout="constrained")
        super().__init__(self.figure)
        self.setMinimumHeight(min_height)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.ax = self.figure.add_subplot()
        self.empty("")

    def _reset(self) -> None:
        self.figure.clear()
        self.ax = self.figure.add_subplot()
        self.ax.tick_params(labelsize=FONT_SIZE)

    def empty(self, message: str) -> None:
        self._reset()
        self.ax.set_axis_off()
        if message:
            self.ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=FONT_SIZE + 1, color="#666",
                         wrap=True, transform=self.ax.transAxes)
        self.draw_idle()

    def bars(self, labels: Sequence[str], values: Sequence[float], *, title: str = "", ylabel: str = "") -> None:
        self._reset()
        bars = self.ax.bar(range(len(values)), values, color="#3b6ea8")
        self.ax.bar_label(bars, fontsize=FONT_SIZE - 1)
        self.ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=FONT_SIZE)
        self.ax.set_ylabel(ylabel, fontsize=FONT_SIZE)
        self.ax.set_title(title, fontsize=FONT_SIZE + 1)
        self.ax.margins(y=0.15)
        self.ax.spines[["top", "right"]].set_visible(False)
        self.draw_idle()

    def line(self, x: Sequence[float], y: Sequence[float], *, title: str = "", xlabel: str = "", ylabel: str = "",
             hline: float | None = None, hline_label: str = "", ylim: tuple[float, float] | None = None,
             fmt: str = "{:.2f}") -> None:
        self._reset()
        self.ax.plot(x, y, marker="o", color="#3b6ea8")
        if len(x) <= 12:
            for xi, yi in zip(x, y, strict=True):
                self.ax.annotate(fmt.format(yi), (xi, yi), textcoords="offset points", xytext=(0, 6),
                                 ha="center", fontsize=FONT_SIZE - 1)
        if hline is not None:
            self.ax.axhline(hline, color="#b03a2e", linestyle="--", linewidth=1)
            self.ax.annotate(hline_label, (0.01, hline), xycoords=("axes fraction", "data"),
                             textcoords="offset points", xytext=(0, 4), fontsize=FONT_SIZE - 1, color="#b03a2e")
        self.ax.set_xlabel(xlabel, fontsize=FONT_SIZE)
        self.ax.set_ylabel(ylabel, fontsize=FONT_SIZE)
        self.ax.set_title(title, fontsize=FONT_SIZE + 1)
        if len(x):
            self.ax.set_xticks(list(x) if len(x) <= 20 else np.linspace(min(x), max(x), 10).round())
        if ylim:
            self.ax.set_ylim(*ylim)
        else:
            self.ax.margins(y=0.2)
        self.ax.spines[["top", "right"]].set_visible(False)
        self.draw_idle()

    def confusion(self, matrix: np.ndarray, classes: Sequence[str], *, title: str = "") -> None:
        self._reset()
        matrix = np.asarray(matrix)
        self.ax.imshow(matrix, cmap="Blues")
        threshold = matrix.max() / 2 if matrix.size and matrix.max() else 1
        for (i, j), value in np.ndenumerate(matrix):
            self.ax.text(j, i, str(int(value)), ha="center", va="center", fontsize=FONT_SIZE - 1,
                         color="white" if value > threshold else "black")
        self.ax.set_xticks(range(len(classes)), classes, rotation=40, ha="right", fontsize=FONT_SIZE - 1)
        self.ax.set_yticks(range(len(classes)), classes, fontsize=FONT_SIZE - 1)
        self.ax.set_xlabel("predicted", fontsize=FONT_SIZE)
        self.ax.set_ylabel("true class", fontsize=FONT_SIZE)
        self.ax.set_title(title, fontsize=FONT_SIZE + 1)
        self.draw_idle()
