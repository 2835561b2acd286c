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

# The plan's fields in the operator's words, for "what changed since you accepted it".
FIELD_WORDS = {
    "rounds": "rounds", "model": "model", "noise_multiplier": "noise (σ)", "sample_rate": "images sampled per round "
    "(q)", "dp_mode": "how noise is added", "threshold": "fewest hospitals whose sum is opened (t)",
    "dp_colluders": "hospitals assumed to pool their noise (c)", "delta": "δ", "clip_norm": "per-image clip",
    "local_epochs": "local epochs", "batch_size": "batch size", "lr": "learning rate", "server_lr": "server step",
    "secagg": "secure aggregation", "dp": "differential privacy", "classes": "cell classes", "min_sites": "fewest "
    "hospitals per round", "max_sites": "most hospitals", "algorithm": "training scheme",
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


def plan_rows(plan, privacy, epsilon_budget: float, epsilon_per_round: tuple[float, ...]) -> list[tuple[str, str]]:
    from hemafed.core.learning.models import MODELS  # torch: only once a plan arrives, never at start-up

    model = MODELS.get(plan.model)
    fedsgd = plan.algorithm == "fedsgd"
    after = ""  # ε after the plan has its own row
    rows = [
        ("federation", plan.federation_id),
        ("model", f"{plan.model}" + (f" — {model.description}" if model else "")),
        ("cell classes", ", ".join(plan.classes)),
        ("rounds", str(plan.rounds)),
    ]
    if fedsgd:
        rows.append(("training per round",
                     f"<b>one DP-SGD step</b> (DP-FedSGD): each round this site picks a random sample of its "
                     f"images (each image with probability q = {plan.sample_rate:g}) and sends one clipped, "
                     "noised sum of their gradients; no local epochs"
                     + (". <b>Round 1</b> instead sends one clipped, noised sum of the sampled images' "
                        "<b>features</b>, from which the federation learns their average (the model subtracts "
                        "it); it is protected and counted exactly like a training round"
                        if model and model.centred else "")))
    else:
        rows.append(("training per round", f"<b>{plan.local_epochs} local epoch(s)</b> (FedAvg), batch size "
                                           f"{plan.batch_size}, learning rate {plan.lr:g}"))
    if epsilon_per_round and plan.dp:
        rows.append(("ε after the plan", f"<b>{epsilon_per_round[-1]:.3g}</b> of this site's budget "
                                         f"{epsilon_budget:g} after the last round (ε is spent by every round "
                                         "and never comes back; smaller is stronger protection)"))
    rows.append(("per-image gradient clip", f"{plan.clip_norm:g} (no single image can move the model by more)"))
    if not plan.dp or privacy is None:
        rows.append(("differential privacy", "OFF — updates carry no privacy guarantee"))
    elif fedsgd and plan.dp_mode == "distributed":
        c = plan.dp_colluders
        rows += [
            ("differential privacy", "<b>distributed</b>: each hospital adds only a share of the noise, inside "
             f"secure aggregation; the sum the aggregator can open (of at least {plan.threshold} hospitals) carries "
             "the full "
             f"noise σ = {plan.noise_multiplier:.3g}, the same for every hospital{after}."),
            ("protected against", "the aggregator, the other hospitals and anyone using the model, "
             "<b>assuming</b> the aggregator follows the protocol (it never opens one hospital's contribution) "
             f"and at most {c} hospital(s) pool their noise shares with it. If more do, the noise protecting "
             "the others is smaller. A hospital that wants to rely on nobody can require local DP "
             "(it then refuses this plan)."),
            ("t, c", f"t = {plan.threshold}: the fewest hospitals whose sum is ever opened; c = {c}: hospitals "
                     "assumed able to pool their noise shares"),
            ("σ, q", f"noise multiplier σ = {plan.noise_multiplier:.3g} (set by the federation for all "
                     f"hospitals); sampling rate q = {plan.sample_rate:g}; δ = {privacy.delta:.2g}"),
        ]
    elif fedsgd:
        rows.append(("differential privacy", f"<b>local</b>: this site adds the full noise σ = "
                     f"{plan.noise_multiplier:.3g} itself before anything leaves; it trusts no one{after}."))
        rows.append(("σ, q", f"σ = {plan.noise_multiplier:.3g} (the federation's), q = {plan.sample_rate:g}, "
                             f"δ = {privacy.delta:.2g}"))
    else:
        rows.append(("differential privacy", f"<b>local</b>: this site adds noise σ = {privacy.sigma:.3f} itself, "
                     f"fitted to its budget ε = {epsilon_budget:g} at δ = {privacy.delta:.2g}{after}"))
    rows += [
        ("δ", f"{plan.delta:g} (this site uses min(δ, 1/number of images))"),
        ("secure aggregation", f"on, threshold t = {plan.threshold} of at least {plan.min_sites} sites"
         if plan.secagg else "OFF — the aggregator sees this site's update"),
        ("validation split", f"{plan.val_fraction:.0%} of each class kept here to measure the model"),
    ]
    return rows


def sees_text(plan) -> str:
    if plan.secagg and plan.algorithm == "fedsgd":
        from hemafed.core.learning.models import MODELS

        model = MODELS.get(plan.model)
        sees = (f"each round only the <b>sum</b> over at least {plan.threshold} hospitals of their clipped, noised "
                "gradient sums "
                + ("(in round 1, feature sums) " if model and model.centred else "")
                + "and validation counts, and which sites are connected")
    elif plan.secagg:
        sees = ("only the <b>sum</b> of the sites' masked, noised updates and validation counts of each round, "
                "and which sites are connected")
    else:
        sees = "<b>this site's own update</b> (noised if DP is on) and its validation counts"
    never = ("images, labels, file names, one hospital's own update, or this site's number of images"
             if plan.secagg else "images, labels or file names (it does see this site's sample count)")
    return f"<b>The aggregator will see:</b> {sees}.<br><b>It will never see:</b> {never}."


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
