"""What left this computer: every message this site sent (the outbound log, `network.outbound`), with totals per
kind and per round, and the *Export privacy report…* button.

The log is written by the site driver before each message is sent; this page only reads the site's store
(a few thousand rows for a 500-round federation: milliseconds), when shown and after every round.
"""

from __future__ import annotations

import time

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from .state import AppState

INTRO = ("<b>Every message this site has sent</b>, recorded on this computer <i>before</i> it was sent: when, in "
         "which round and stage, what kind of message, its exact size, a fingerprint (SHA-256) of its exact bytes, "
         "and what protected it. Images never leave. A model update leaves only <b>masked</b> by secure aggregation "
         "(the aggregator can open only the sum of several hospitals) and, with differential privacy, "
         "<b>noised</b>. <i>Plain</i> messages are control messages (keys, acceptance, progress) inside the "
         "encrypted connection.")


def _table(headers: list[str]) -> QTableWidget:
    table = QTableWidget(0, len(headers))
    table.setHorizontalHeaderLabels(headers)
    # sized once per fill (`_fill`): ResizeToContents re-measures every row on every item set, which made a
    # 500-round federation's 2,500 messages take minutes to show
    table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
    table.horizontalHeader().setStretchLastSection(True)
    table.verticalHeader().setVisible(False)
    table.setWordWrap(False)
    table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
    table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
    return table


def _fill(table: QTableWidget, rows: list[list[str]], right: frozenset[int] | set[int] = frozenset(),
          tips: list[str] | None = None) -> None:
    table.setUpdatesEnabled(False)
    table.setRowCount(len(rows))
    for r, row in enumerate(rows):
        for c, value in enumerate(row):
            item = QTableWidgetItem(value)
            if c in right:
                item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            if tips is not None:
                item.setToolTip(tips[r])
            table.setItem(r, c, item)
    table.resizeColumnsToContents()
    table.setUpdatesEnabled(True)


class OutboundPage(QWidget):
    title = "What was sent"  # the side list is narrow; the page heading says it in full

    def __init__(self, state: AppState) -> None:
        super().__init__()
        self.state = state
        heading = QLabel("What left this computer")
        heading.setObjectName("heading")
        intro = QLabel(INTRO)
        intro.setWordWrap(True)
        intro.setObjectName("help")
        self.federation = QComboBox()
        self.federation.setMinimumWidth(200)
        self.federation.currentIndexChanged.connect(lambda _i: self.refresh())
        refresh = QPushButton("Refresh")
        refresh.clicked.connect(self.reload)
        self.export_btn = QPushButton("Export privacy report…")
        self.export_btn.clicked.connect(self.export_report)
        top = QHBoxLayout()
        top.addWidget(QLabel("federation"))
        top.addWidget(self.federation)
        top.addWidget(refresh)
        top.addStretch(1)
        top.addWidget(self.export_btn)
        self.summary = QLabel()
        self.summary.setWordWrap(True)
        self.summary.setObjectName("verdict")
        self.export_note = QLabel()
        self.export_note.setWordWrap(True)
        self.export_note.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.export_note.setVisible(False)

        self.kinds = _table(["kind", "protection", "messages", "bytes", "what it carries"])
        self.kinds.setWordWrap(True)
        self.rounds = _table(["round", "messages", "bytes", "protections"])
        self.messages = _table(["time", "round", "stage", "kind", "bytes", "protection", "SHA-256 of the bytes"])
        kinds_box, rounds_box, all_box = (QGroupBox("Totals per kind"), QGroupBox("Totals per round"),
                                          QGroupBox("Every message, oldest first"))
        for box, table in ((kinds_box, self.kinds), (rounds_box, self.rounds), (all_box, self.messages)):
            QVBoxLayout(box).addWidget(table)
        totals = QSplitter(Qt.Orientation.Horizontal)
        totals.addWidget(kinds_box)
        totals.addWidget(rounds_box)
        totals.setStretchFactor(0, 2)
        totals.setStretchFactor(1, 1)
        body = QSplitter(Qt.Orientation.Vertical)
        body.addWidget(totals)
        body.addWidget(all_box)
        body.setStretchFactor(0, 1)
        body.setStretchFactor(1, 1)

        layout = QVBoxLayout(self)
        layout.addWidget(heading)
        layout.addWidget(intro)
        layout.addLayout(top)
        layout.addWidget(self.summary)
        layout.addWidget(self.export_note)
        layout.addWidget(body, 1)
        state.roundsChanged.connect(self.reload)
        state.ledgersChanged.connect(self.reload)
        self.records: list = []
        self.reload()

    def showEvent(self, event) -> None:
        super().showEvent(event)
        self.reload()

    def reload(self) -> None:
        """Re-read the federations that sent something, keep the one chosen, show its log."""
        from hemafed.core.errors import HemafedError
        from hemafed.core.privacy.store import SiteStore

        try:
            everything = SiteStore(self.state.state_dir).outbound()
        except HemafedError as exc:
            self.records = []
            self.summary.setText(f"The site's store cannot be read: {exc}")
            return
        current = self.federation.currentText()
        names = list(dict.fromkeys(r.federation_id for r in everything))
        self.federation.blockSignals(True)
        self.federation.clear()
        self.federation.addItems(names)
        if current in names:
            self.federation.setCurrentText(current)
        elif names:
            self.federation.setCurrentIndex(len(names) - 1)  # the latest federation
        self.federation.blockSignals(False)
        self._all = everything
        self.refresh()

    def refresh(self) -> None:
        from hemafed.network import outbound as O

        name = self.federation.currentText()
        records = [r for r in getattr(self, "_all", []) if r.federation_id == name]
        self.records = records
        if not records:
            self.summary.setText("Nothing sent yet: this site has not joined a federation.")
            for table in (self.kinds, self.rounds, self.messages):
                table.setRowCount(0)
            return
        updates = [r for r in records if r.kind in O.UPDATE_KINDS]
        unmasked = [r for r in updates if r.protection not in (O.NOISED_MASKED, O.MASKED)]
        total = sum(r.bytes for r in records)
        verdict = (f"{len(updates)} carried a model update, every one masked"
                   + (" and noised" if updates and all(r.protection == O.NOISED_MASKED for r in updates) else "")
                   if updates and not unmasked else
                   f"<b>{len(unmasked)} model updates left without masking</b> (secure aggregation was off)"
                   if unmasked else "none carried a model update")
        self.summary.setProperty("ok", not unmasked)
        self.summary.setText(f"<b>{len(records)} messages, {total:,} bytes</b> sent to the aggregator of "
                             f"<b>{name}</b> from {time.strftime('%d %b %Y %H:%M', time.localtime(records[0].time))} "
                             f"to {time.strftime('%d %b %Y %H:%M', time.localtime(records[-1].time))}; {verdict}.")
        self.summary.style().unpolish(self.summary)
        self.summary.style().polish(self.summary)
        kinds = O.totals(records, lambda r: (r.kind, r.protection))
        _fill(self.kinds, [[k, p, str(t.messages), f"{t.bytes:,}", O.describe(k)] for (k, p), t in kinds.items()],
              right={2, 3}, tips=[O.describe(k) for k, _p in kinds])
        per_round = O.totals(records, lambda r: r.round)
        protections: dict[int, set[str]] = {}
        for r in records:
            protections.setdefault(r.round, set()).add(r.protection)
        _fill(self.rounds, [["joining" if k == 0 else str(k), str(t.messages), f"{t.bytes:,}",
                             ", ".join(sorted(protections[k]))] for k, t in per_round.items()], right={1, 2})
        _fill(self.messages, [[time.strftime("%d %b %H:%M:%S", time.localtime(r.time)), str(r.round), r.stage,
                               r.kind, f"{r.bytes:,}", r.protection, r.sha256] for r in records], right={1, 4},
              tips=[O.describe(r.kind) for r in records])

    def export_report(self) -> None:
        from .report_export import export_dialog

        answer = export_dialog(self, self.state, self.federation.currentText() or None)
        if answer is not None:
            self.show_export(*answer)

    def show_export(self, ok: bool, message: str) -> None:
        self.export_note.setObjectName("help" if ok else "error")
        self.export_note.setText(message)
        self.export_note.setVisible(True)
        self.export_note.style().unpolish(self.export_note)
        self.export_note.style().polish(self.export_note)
