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
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from hemafed.network.plan_review import plan_rows, sees_text  # shared with the site's record of the acceptance

# The plan's fields in the operator's words, for "what changed since you accepted it".
FIELD_WORDS = {
    "rounds": "rounds", "model": "model", "noise_multiplier": "noise (σ)", "sample_rate": "images sampled per round "
    "(q)", "dp_mode": "how noise is added", "threshold": "fewest hospitals whose sum is opened (t)",
    "dp_colluders": "hospitals assumed to pool their noise (c)", "delta": "δ", "clip_norm": "per-image clip",
    "local_epochs": "local epochs", "batch_size": "batch size", "lr": "learning rate", "server_lr": "server step",
    "secagg": "secure aggregation", "dp": "differential privacy", "classes": "cell classes", "min_sites": "fewest "
    "hospitals per round", "max_sites": "most hospitals", "algorithm": "training scheme",
    "center_rounds": "rounds that estimate the features' average",
}


def summary_text(plan, epsilon_budget: float, epsilon_per_round: tuple[float, ...]) -> str:
    """What accepting means for this hospital, in plain words (the details follow, on demand)."""
    if plan.algorithm == "fedsgd":
        each = ("each round it sends one <b>noised, masked summary</b> of a random sample of its images (no images, "
                "no labels, never this hospital's own result in the clear)")
    else:
        each = (f"each round it trains for {plan.local_epochs} pass(es) over its images and sends the noised, "
                "masked change to the model")
    spend = (f" Over the whole plan it spends privacy <b>ε = {epsilon_per_round[-1]:.3g}</b> of its budget "
             f"{epsilon_budget:g} (smaller is stronger protection; what is spent never comes back)."
             if plan.dp and epsilon_per_round else "" if plan.dp else
             " <b>This plan adds no privacy protection (differential privacy is off).</b>")
    who = (" The aggregator only ever opens the sum over at least "
           f"{plan.threshold} hospitals." if plan.secagg else " The aggregator sees this hospital's update.")
    return (f"If you accept, this hospital takes part in <b>{plan.rounds} rounds</b> of training one blood-cell "
            f"classifier with the other hospitals: {each}.{spend}{who}")


__all__ = ["FIELD_WORDS", "PlanDialog", "plan_rows", "sees_text", "summary_text"]


class PlanDialog(QDialog):
    def __init__(self, event, epsilon_budget: float, parent=None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Review the federation's plan")
        self.setMinimumWidth(760)
        plan, privacy = event.plan, event.privacy
        layout = QVBoxLayout(self)
        head = QLabel(summary_text(plan, epsilon_budget, tuple(event.epsilon_per_round))
                      + "<br><br>Nothing is trained and nothing is sent until you accept.")
        head.setWordWrap(True)
        layout.addWidget(head)
        changes = tuple(getattr(event, "changes", ()))
        if changes:
            lines = [f"• {FIELD_WORDS.get(name, name)}: {before} → {after}" for name, before, after in changes]
            self.changes = QLabel("<b>This plan changed since this site accepted the previous one:</b><br>"
                                  + "<br>".join(lines))
            self.changes.setWordWrap(True)
            self.changes.setObjectName("note")
            layout.addWidget(self.changes)
        self.details_btn = QToolButton()
        self.details_btn.setText("Details: model, noise, sampling, thresholds")
        self.details_btn.setCheckable(True)
        self.details_btn.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.details_btn.setArrowType(Qt.ArrowType.RightArrow)
        layout.addWidget(self.details_btn)
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
        scroll.setVisible(False)

        def toggle(on: bool) -> None:
            scroll.setVisible(on)
            self.details_btn.setArrowType(Qt.ArrowType.DownArrow if on else Qt.ArrowType.RightArrow)
            # the open details get the room their rows need (up to most of the screen); closed, the dialog is as
            # tall as its text, so no empty band sits between the summary and the buttons
            screen = self.screen().availableGeometry().height() if self.screen() is not None else 800
            self.resize(self.width(), min(int(screen * 0.85), 720) if on else self._text_height(self.width()))

        self.details_btn.toggled.connect(toggle)
        self.details = scroll
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
        self.resize(820, self._text_height(820))

    def _text_height(self, width: int) -> int:
        """The height the wrapped text needs at `width` (a word-wrapped label's size hint assumes another width)."""
        layout = self.layout()
        return layout.totalHeightForWidth(width) if layout.hasHeightForWidth() else self.sizeHint().height()
