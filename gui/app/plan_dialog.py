"""Review plan: what the aggregator asks of this site, in words, before round 1."""

from __future__ import annotations

from PySide6.QtWidgets import QDialog, QDialogButtonBox, QFormLayout, QLabel, QVBoxLayout


def plan_rows(plan, privacy, epsilon_budget: float, epsilon_per_round: tuple[float, ...]) -> list[tuple[str, str]]:
    from hemafed.core.models import MODELS  # torch: only once a plan arrives, never at start-up

    model = MODELS.get(plan.model)
    rows = [
        ("federation", plan.federation_id),
        ("model", f"{plan.model}" + (f" — {model.description}" if model else "")),
        ("cell classes", ", ".join(plan.classes)),
        ("rounds", str(plan.rounds)),
        ("local training per round", f"{plan.local_epochs} epoch(s), batch size {plan.batch_size}, "
                                     f"learning rate {plan.lr:g}"),
        ("per-image gradient clip", f"{plan.clip_norm:g}"),
        ("differential privacy", (f"on: noise σ = {privacy.sigma:.3f} fitted to this site's budget "
                                  f"ε = {epsilon_budget:g} at δ = {privacy.delta:.2g}"
                                  + (f"; ε after the last round {epsilon_per_round[-1]:.3g}"
                                     if epsilon_per_round else ""))
         if plan.dp and privacy is not None else "OFF — updates carry no privacy guarantee"),
        ("δ", f"{plan.delta:g} (this site uses min(δ, 1/number of images))"),
        ("secure aggregation", f"on, threshold t = {plan.threshold} of at least {plan.min_sites} sites"
         if plan.secagg else "OFF — the aggregator sees this site's update"),
        ("validation split", f"{plan.val_fraction:.0%} of each class kept here to measure the model"),
    ]
    return rows


def sees_text(plan) -> str:
    if plan.secagg:
        sees = ("only the <b>sum</b> of the sites' masked, noised updates and validation counts of each round, "
                "and which sites are connected")
    else:
        sees = "<b>this site's own update</b> (noised if DP is on) and its validation counts"
    return (f"<b>The aggregator will see:</b> {sees}.<br><b>It will never see:</b> images, labels, file names, "
            "or this site's number of images" + ("" if plan.secagg else " (it sees the sample count)") + ".")


class PlanDialog(QDialog):
    def __init__(self, event, epsilon_budget: float, parent=None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Review the federation's plan")
        self.setMinimumWidth(640)
        plan, privacy = event.plan, event.privacy
        layout = QVBoxLayout(self)
        head = QLabel("The aggregator asks this site to train the model below. Nothing is trained and nothing is "
                      "sent until you accept.")
        head.setWordWrap(True)
        layout.addWidget(head)
        form = QFormLayout()
        for key, value in plan_rows(plan, privacy, epsilon_budget, tuple(event.epsilon_per_round)):
            label = QLabel(value)
            label.setWordWrap(True)
            form.addRow(f"{key}:", label)
        layout.addLayout(form)
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
