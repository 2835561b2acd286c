"""Privacy page: the ε budget and δ, in plain words; for the federation's plan, the noise
σ, ε after each round and how many rounds the budget allows; the ledger of what this
site has already spent."""

from __future__ import annotations

import math
import time

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QMessageBox,
    QPushButton,
    QSlider,
    QSpinBox,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from .charts import Chart
from .projection import NOISY_SIGMA
from .state import AppState

EPS_MIN, EPS_MAX = 0.1, 100.0
SLIDER_STEPS = 300  # log scale: 100 steps per factor of 10
DELTAS = (1e-4, 1e-5, 1e-6, 1e-7)

HELP = ("<b>ε (epsilon) limits how much the shared model can reveal about any one image of this "
        "hospital.</b> Smaller ε = stronger protection, but a noisier, less accurate model. "
        "ε is spent by every round this site trains and never comes back: when the next round would pass "
        "the budget, this site stops taking part. Typical budgets are 1 (strong) to 10 (moderate). "
        "<br><b>δ</b> is the small chance the ε guarantee does not hold; it must stay far below 1 divided by "
        "the number of images. The federation's plan sets it; this site refuses plans above the value chosen here.")


CHARGED_ANYWAY = ("This round did not complete ({why}), but its ε is counted: this site computed its update "
                  "with fresh noise and recorded it before it could leave. Whether or not it reached the model, "
                  "counting it is the safe choice: the spend is never under-reported.")
RAN_AGAIN = ("The aggregator ran this round again (after a restart): each run drew fresh noise over this site's "
             "images, so each is a spend of its own.")


def protection_words(entry) -> str:
    """A ledger entry's protection in a few words (the full sentence is the cell's tooltip)."""
    if getattr(entry, "dp_mode", "local") == "distributed":
        return f"distributed (t={entry.threshold}, c={entry.colluders})"
    return "local (all noise here)"


def eps_to_slider(eps: float) -> int:
    return round((math.log10(eps) - math.log10(EPS_MIN)) * 100)


def slider_to_eps(value: int) -> float:
    return round(10 ** (math.log10(EPS_MIN) + value / 100), 2)


class PrivacyPage(QWidget):
    title = "Privacy"

    def __init__(self, state: AppState) -> None:
        super().__init__()
        self.state = state

        self.slider = QSlider(Qt.Orientation.Horizontal)
        self.slider.setRange(0, SLIDER_STEPS)
        self.spin = QDoubleSpinBox()
        self.spin.setRange(EPS_MIN, EPS_MAX)
        self.spin.setDecimals(2)
        self.spin.setSingleStep(0.5)
        self.spin.setKeyboardTracking(False)
        self.delta = QComboBox()
        for d in DELTAS:
            self.delta.addItem(f"{d:g}", d)
        self._sync_controls()
        self.slider.valueChanged.connect(lambda v: self.spin.setValue(slider_to_eps(v)))
        self.spin.valueChanged.connect(self._spin_changed)
        self.delta.currentIndexChanged.connect(lambda _i: self._apply())

        ticks = QHBoxLayout()
        for label in ("0.1 strongest", "1", "10", "100 weakest"):
            t = QLabel(label)
            t.setObjectName("hint")
            ticks.addWidget(t)
            ticks.addStretch(1)
        ticks.takeAt(ticks.count() - 1)
        budget_box = QGroupBox("Privacy budget")
        grid = QGridLayout(budget_box)
        grid.addWidget(QLabel("ε budget"), 0, 0)
        grid.addWidget(self.slider, 0, 1)
        grid.addWidget(self.spin, 0, 2)
        grid.addLayout(ticks, 1, 1)
        grid.addWidget(QLabel("largest δ accepted"), 2, 0)
        grid.addWidget(self.delta, 2, 2)
        help_label = QLabel(HELP)
        help_label.setWordWrap(True)
        help_label.setObjectName("help")
        grid.addWidget(help_label, 3, 0, 1, 3)
        grid.setColumnStretch(1, 1)

        # what this site accepts of a federation's plan (saved where `hemafed site` reads them too)
        bounds = state.bounds
        self.require_local = QCheckBox("add all the noise here (local DP)")
        self.require_local.setToolTip("Refuse plans that share the noise with the other hospitals. Distributed DP "
                                      "(the default recipe) relies on the aggregator following the protocol and "
                                      "on the other hospitals' noise shares; local DP trusts no one but needs "
                                      "much more noise, so the model is less accurate.")
        self.require_local.setChecked(bounds.require_local_dp)
        self.max_rounds = QSpinBox()
        self.max_rounds.setRange(1, 100_000)
        self.max_rounds.setValue(bounds.max_rounds)
        self.require_local.toggled.connect(lambda _on: self._apply_bounds())
        self.max_rounds.editingFinished.connect(self._apply_bounds)
        bounds_box = QGroupBox("What this site accepts of a plan")
        bf = QFormLayout(bounds_box)
        bf.addRow(self.require_local)
        bf.addRow("most rounds", self.max_rounds)
        self.bounds_note = QLabel("Ticked: plans that share the noise with other hospitals are refused. "
                                  "Differential privacy and secure aggregation are always required. Saved in "
                                  f"{state.bounds_path()} (the headless site reads the same file).")
        self.bounds_note.setWordWrap(True)
        self.bounds_note.setObjectName("hint")
        bf.addRow(self.bounds_note)

        self.plan_title = QLabel()
        self.plan_title.setWordWrap(True)
        self.sigma_label = QLabel("—")
        self.rounds_label = QLabel("—")
        self.allowed_label = QLabel("—")
        self.allowed_label.setWordWrap(True)
        self.data_label = QLabel("—")
        self.data_label.setWordWrap(True)
        self.verdict = QLabel()
        self.verdict.setWordWrap(True)
        self.verdict.setObjectName("verdict")
        self.change_budget_btn = QPushButton()
        self.change_budget_btn.setVisible(False)
        self.change_budget_btn.clicked.connect(self._change_federation_budget)
        form = QFormLayout()
        form.addRow("noise added (σ)", self.sigma_label)
        self.sigma_label.setToolTip("The noise each training step adds, as a multiple of the most one image can "
                                    "change it (the clip). More noise: stronger protection, slower learning.")
        form.addRow("rounds in the plan", self.rounds_label)
        form.addRow("rounds the budget allows", self.allowed_label)
        form.addRow("training images", self.data_label)
        plan_box = QGroupBox("What this budget means for the plan")
        pv = QVBoxLayout(plan_box)
        pv.addWidget(self.plan_title)
        pv.addLayout(form)
        pv.addWidget(self.verdict)
        pv.addWidget(self.change_budget_btn, 0, Qt.AlignmentFlag.AlignLeft)
        self.chart = Chart(height=2.3)
        pv.addWidget(self.chart, 1)

        self.ledger_table = QTableWidget(0, 6)
        self.ledger_table.setHorizontalHeaderLabels(["federation", "rounds", "ε spent", "ε left", "budget", "δ"])
        self.history = QTableWidget(0, 6)
        self.history.setHorizontalHeaderLabels(["round", "ε after", "σ", "steps", "protection", "recorded"])
        for table in (self.ledger_table, self.history):
            table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
            table.horizontalHeader().setStretchLastSection(True)
            table.verticalHeader().setVisible(False)
            table.setWordWrap(False)
            table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
            table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        # The protection words take the room that is left (elided, the full sentence is the cell's
        # tooltip), so the date recorded stays whole at 1280×800 instead of under a scroll bar.
        history_header = self.history.horizontalHeader()
        history_header.setStretchLastSection(False)
        history_header.setSectionResizeMode(4, QHeaderView.ResizeMode.Stretch)
        self.ledger_table.itemSelectionChanged.connect(self._show_history)
        self.ledger_note = QLabel()
        self.ledger_note.setWordWrap(True)
        ledger_box = QGroupBox("Privacy already spent (the ledger)")
        lv = QVBoxLayout(ledger_box)
        lv.addWidget(self.ledger_note)
        lv.addWidget(self.ledger_table, 1)
        lv.addWidget(QLabel("History of the selected federation:"))
        lv.addWidget(self.history, 1)
        self.export_btn = QPushButton("Export privacy report…")
        self.export_btn.setToolTip("the selected federation's signed report for the ethics board (PDF or HTML): the "
                                   "plan as accepted, the guarantee, every round, what left this computer, the audit")
        self.export_btn.clicked.connect(self.export_report)
        self.export_note = QLabel()
        self.export_note.setWordWrap(True)
        self.export_note.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.export_note.setVisible(False)
        export_row = QHBoxLayout()
        export_row.addWidget(self.export_btn)
        export_row.addWidget(self.export_note, 1)
        lv.addLayout(export_row)

        left = QWidget()
        left_l = QVBoxLayout(left)
        left_l.setContentsMargins(0, 0, 0, 0)
        left_l.addWidget(budget_box)
        left_l.addWidget(bounds_box)
        left_l.addWidget(ledger_box, 1)
        splitter = QSplitter()
        splitter.addWidget(left)
        splitter.addWidget(plan_box)
        splitter.setStretchFactor(0, 1)
        splitter.setStretchFactor(1, 1)
        layout = QVBoxLayout(self)
        layout.addWidget(splitter)

        state.projectionChanged.connect(self.refresh_projection)
        state.ledgersChanged.connect(self.refresh_ledgers)
        state.budgetChanged.connect(self._sync_controls)
        self.refresh_projection()
        self.refresh_ledgers()

    # -- controls -----------------------------------------------------------------------------

    def _sync_controls(self) -> None:
        for w in (self.slider, self.spin, self.delta):
            w.blockSignals(True)
        self.spin.setValue(self.state.epsilon)
        self.slider.setValue(eps_to_slider(max(self.state.epsilon, EPS_MIN)))
        index = self.delta.findData(self.state.max_delta)
        if index < 0:
            self.delta.addItem(f"{self.state.max_delta:g}", self.state.max_delta)
            index = self.delta.count() - 1
        self.delta.setCurrentIndex(index)
        for w in (self.slider, self.spin, self.delta):
            w.blockSignals(False)

    def _spin_changed(self, value: float) -> None:
        self.slider.blockSignals(True)
        self.slider.setValue(eps_to_slider(value))
        self.slider.blockSignals(False)
        self._apply()

    def _apply(self) -> None:
        self.state.set_budget(self.spin.value(), self.delta.currentData())

    def set_budget(self, epsilon: float) -> None:
        """Programmatic budget change (as if typed into the box)."""
        self.spin.setValue(epsilon)

    def _apply_bounds(self) -> None:
        self.state.set_bounds(require_local_dp=self.require_local.isChecked(), max_rounds=self.max_rounds.value())

    def _change_federation_budget(self, _checked: bool = False, *, confirm: bool = True) -> bool:
        """Set the budget in this federation's ledger to the page's budget, after saying what it means."""
        ledger = self.state.ledger_for(self.state.plan.federation_id)
        if ledger is None or "error" in ledger:
            return False
        new, old, spent = self.state.epsilon, ledger["budget_epsilon"], ledger["spent_epsilon"]
        if confirm:
            answer = QMessageBox.question(
                self, "Change this federation's budget",
                f"Federation {ledger['federation_id']}: its privacy budget is ε = {old:g}, of which this site has "
                f"spent ε = {spent:.3g}.\n\nSet it to ε = {new:g}? "
                + ("A larger budget lets this site take part in more rounds: more about its patients' images may "
                   "show in the shared model (ε is the limit). " if new > old else
                   "A smaller budget ends this site's part sooner. ")
                + "Spent privacy never comes back, and the ledger keeps a record of this change.",
                QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No, QMessageBox.StandardButton.No)
            if answer != QMessageBox.StandardButton.Yes:
                return False
        return self.state.change_federation_budget(ledger["federation_id"], new,
                                                   reason=f"changed in the app from ε = {old:g}")

    # -- projection ---------------------------------------------------------------------------

    def refresh_projection(self) -> None:
        state, proj, plan = self.state, self.state.projection, self.state.plan
        source = (f"the plan received from the aggregator (federation <b>{plan.federation_id}</b>)"
                  if state.plan_received else "the federation's <b>default plan</b> (no aggregator joined yet: "
                  "the real plan is shown here when it arrives)")
        if plan.algorithm == "fedsgd":
            mode = ("distributed DP: each hospital adds a share of the noise inside secure aggregation"
                    if plan.dp_mode == "distributed" else "local DP: this site adds the full noise")
            self.plan_title.setText(f"For {source}: model {plan.model}, {plan.rounds} rounds of one DP-SGD step "
                                    f"(sampling rate q = {plan.sample_rate:g}); {mode}.")
        else:
            self.plan_title.setText(f"For {source}: model {plan.model}, {plan.rounds} rounds of "
                                    f"{plan.local_epochs} local epoch(s), batch {plan.batch_size}.")
        self.rounds_label.setText(str(plan.rounds))
        if proj is None:
            for label in (self.sigma_label, self.allowed_label, self.data_label):
                label.setText("…")
            self.verdict.setText("Computing…")
            self.chart.empty("computing…")
            return
        self.data_label.setText(f"about {proj.n_train} (an estimate: check your images on the Data page)"
                                if proj.n_estimated else f"{proj.n_train} (after keeping the validation split)")
        already = (f" ({proj.rounds_done} already done in this federation, ε {proj.spent:.3g} spent)"
                   if proj.rounds_done else "")
        if not proj.refusal and not proj.epsilon_per_round:  # every round of this plan is in the ledger
            self.sigma_label.setText(f"{proj.sigma:.3f}" if proj.sigma is not None else "—")
            self.allowed_label.setText(f"none: all {plan.rounds} are done")
            self.verdict.setProperty("ok", True)
            self.verdict.setText(f"This plan is finished at this site: it spent ε = {proj.spent:.3g} of its budget "
                                 f"{proj.budget:g} at δ = {proj.delta:.2g}. Nothing more will be spent for it.")
            self.chart.empty("no rounds left in this plan")
        elif proj.refusal:
            self.sigma_label.setText("—")
            self.allowed_label.setText(f"<b>{proj.rounds_allowed}</b>{already}")
            self.verdict.setProperty("ok", False)
            self.verdict.setText(f"<b>This site will not join:</b> {proj.refusal}.")
            self.chart.empty("no projection: the plan does not fit this budget")
        else:
            assert proj.sigma is not None
            noisy = (f" This is a lot of noise (σ above {NOISY_SIGMA:g}); expect a markedly less accurate model."
                     if proj.sigma > NOISY_SIGMA else "")
            self.sigma_label.setText(f"{proj.sigma:.3f}" + (" (the federation's, the same for every hospital)"
                                                             if plan.algorithm == "fedsgd" else ""))
            self.allowed_label.setText(f"all {proj.rounds_allowed} still to come{already}")
            self.verdict.setProperty("ok", True)
            self.verdict.setText(f"The plan fits: after its last round this site will have spent "
                                 f"ε = {proj.epsilon_per_round[-1]:.3g} of {proj.budget:g} at "
                                 f"δ = {proj.delta:.2g}.{noisy}")
            first = proj.rounds_done + 1
            self.chart.line(list(range(first, first + len(proj.epsilon_per_round))), proj.epsilon_per_round,
                            title="ε this site will have spent after each round to come", xlabel="round",
                            ylabel="ε",
                            hline=proj.budget, hline_label=f"budget ε = {proj.budget:g}",
                            ylim=(0, proj.budget * 1.15))
        ledger = state.ledger_for(plan.federation_id)
        differs = ledger is not None and "error" not in ledger and ledger["budget_epsilon"] != state.epsilon
        self.change_budget_btn.setVisible(differs)
        if differs:
            self.change_budget_btn.setText(f"Change this federation's budget from ε = {ledger['budget_epsilon']:g} "
                                           f"to {state.epsilon:g}…")
        self.verdict.style().unpolish(self.verdict)
        self.verdict.style().polish(self.verdict)

    # -- the report -----------------------------------------------------------------------------

    def selected_federation(self) -> str | None:
        rows = self.ledger_table.selectionModel().selectedRows()
        if not rows or rows[0].row() >= len(self.state.ledgers):
            return None
        return self.state.ledgers[rows[0].row()].get("federation_id")

    def export_report(self) -> None:
        from .report_export import export_dialog

        answer = export_dialog(self, self.state, self.selected_federation())
        if answer is not None:
            self.show_export(*answer)

    def show_export(self, ok: bool, message: str) -> None:
        self.export_note.setProperty("ok", ok)
        self.export_note.setObjectName("help" if ok else "error")
        self.export_note.setText(message)
        self.export_note.setVisible(True)
        self.export_note.style().unpolish(self.export_note)
        self.export_note.style().polish(self.export_note)

    # -- ledger -------------------------------------------------------------------------------

    def refresh_ledgers(self) -> None:
        ledgers = self.state.ledgers
        if self.state.ledgers_loading:
            self.ledger_note.setText("Reading this site's privacy ledgers…")
            return
        self.ledger_note.setText(f"Stored in {self.state.state_dir / 'site.sqlite'}. Each round is written here "
                                 "before this site's update leaves the computer." if ledgers else
                                 "No rounds trained yet: nothing spent.")
        self.ledger_table.setRowCount(len(ledgers))
        for r, e in enumerate(ledgers):
            if "error" in e:
                values = (e["path"], "DAMAGED", e["error"], "", "", "")
            else:
                values = (e["federation_id"], str(e["rounds"]), f"{e['spent_epsilon']:.4g}",
                          f"{e['remaining_epsilon']:.4g}", f"{e['budget_epsilon']:g}", f"{e['delta']:.2g}")
            for c, value in enumerate(values):
                self.ledger_table.setItem(r, c, QTableWidgetItem(value))
        if ledgers:
            selected = self.ledger_table.selectionModel().selectedRows()
            self.ledger_table.selectRow(selected[0].row() if selected and selected[0].row() < len(ledgers) else 0)
            self._show_history()  # the selection may not have changed, but the rows under it have
        else:
            self.history.setRowCount(0)

    def _show_history(self) -> None:
        rows = self.ledger_table.selectionModel().selectedRows()
        if not rows:
            return
        entry = self.state.ledgers[rows[0].row()]
        entries = self.state.ledger_entries(entry["federation_id"]) if "error" not in entry else []
        incomplete = self.state.rounds_not_completed(entry.get("federation_id", ""))
        self.history.setRowCount(len(entries))
        for r, e in enumerate(entries):
            round_text = str(e.round) if e.attempt == 1 else f"{e.round} (run {e.attempt})"
            why = incomplete.get((e.round, e.attempt))
            if why:
                round_text += " — not completed"
            values = (round_text, f"{e.epsilon:.4g}", f"{e.sigma:.3f}", str(e.steps), protection_words(e),
                      time.strftime("%d %b %H:%M", time.localtime(e.time)))
            for c, value in enumerate(values):
                item = QTableWidgetItem(value)
                if c == 4 and e.protection:
                    item.setToolTip(e.protection)  # the ledger's own sentence: against whom, assuming what
                if c == 0 and (why or e.attempt > 1):
                    item.setToolTip(CHARGED_ANYWAY.format(why=why) if why else RAN_AGAIN)
                self.history.setItem(r, c, item)
