"""Review plan: what the aggregator asks of this site, in words, before round 1."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QFrame,
    QLabel,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)

from hemafed.network.plan_review import plan_rows, sees_text

__all__ = ["PlanDialog", "plan_rows", "sees_text"]


class PlanDialog(QDialog):
    def __init__(self, event, epsilon_budget: float, parent=None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Review the federation's plan")
        self.setMinimumWidth(760)
        plan, privacy = event.plan, event.privacy
        layout = QVBoxLayout(self)
        head = QLabel("The aggregator asks this site to train the model below. Nothing is trained and nothing is "
                      "sent until you accept.")
        head.setWordWrap(True)
        layout.addWidget(head)
        # Word-wrapped rows in a plain form get squeezed (and clipped) when the dialog is not
        # tall enough; in a resizable scroll area each row keeps the height its text needs.
        rows = QWidget()
        form = QFormLayout(rows)
        form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.DontWrapRows)
        for key, value in plan_rows(plan, privacy, epsilon_budget, tuple(event.epsilon_per_round)):
            label = QLabel(value)
            label.setWordWrap(True)
            label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            form.addRow(f"{key}:", label)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        scroll.setWidget(rows)
        layout.addWidget(scroll, 1)
        self.resize(820, 760)
        sees = QLabel(sees_text(plan))
        sees.setWordWrap(True)
        sees.setObjectName("help")
        layout.addWidget(sees)
        if event.problems:
            problems = QLabel("<b>This plan is outside what this site accepts, so it will be declined:</b><br>"
                              + "<br>".join(f"• {p}" for p in event.problems))
            problems.setWordWrap(True)
            problems.setObjectName("error")
            layout.addWidget(problems)
        self.buttons = QDialogButtonBox()
        self.accept_btn = self.buttons.addButton("Accept and join", QDialogButtonBox.ButtonRole.AcceptRole)
        self.decline_btn = self.buttons.addButton("Decline", QDialogButtonBox.ButtonRole.RejectRole)
        self.accept_btn.setEnabled(not event.problems)
        self.buttons.accepted.connect(self.accept)
        self.buttons.rejected.connect(self.reject)
        layout.addWidget(self.buttons)
