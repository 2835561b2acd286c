"""Federation page: where the aggregator is, who this site is (the identity key and the
fingerprint to read out by phone), Join / Leave, the plan review, live round status,
failures in words with the next step, and a log."""

from __future__ import annotations

import math
import time
from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import (
    QCheckBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from hemafed.network import site_events as ev

from .plan_dialog import PlanDialog
from .site_worker import SiteWorker
from .state import DEFAULT_URL, AppState, RoundRecord

STAGE_WORDS = {
    "preparing": "preparing this hospital's images (once per set of images)",
    "waiting": "waiting for the next round",
    "training": "training on this hospital's images",
    "keys": "secure aggregation: exchanging keys",
    "shares": "secure aggregation: sharing key pieces",
    "masked": "secure aggregation: sending the masked update",
    "unmask": "secure aggregation: helping to unmask the sum",
}
def _time_left(seconds: float) -> str:
    """'about 3 min left' / 'less than a minute left', for a progress bar."""
    minutes = round(seconds / 60)
    return "less than a minute left" if minutes < 1 else f"about {minutes} min left"


CONNECTION_WORDS = {
    "connecting": "connecting…",
    "connected": "connected",
    "reconnecting": "connection lost, reconnecting…",
    "disconnected": "not connected",
}


class FederationPage(QWidget):
    title = "Federation"
    joinedChanged = Signal(bool)

    def __init__(self, state: AppState) -> None:
        super().__init__()
        self.state = state
        self.worker: SiteWorker | None = None
        self.dialog: PlanDialog | None = None
        self.rounds_total = 0
        self.last_failure: ev.SiteFailed | None = None
        s = state.settings

        self.url = QLineEdit(s.get_str("federation/url", ""))
        self.url.setPlaceholderText(DEFAULT_URL)
        self.ca = QLineEdit(s.get_str("federation/ca_file", ""))
        self.ca.setPlaceholderText("the federation's CA certificate (.pem), from its admin")
        ca_btn = QPushButton("Browse…")
        ca_btn.clicked.connect(self._choose_ca)
        ca_row = QHBoxLayout()
        ca_row.addWidget(self.ca, 1)
        ca_row.addWidget(ca_btn)
        self.federation = QLineEdit(s.get_str("federation/id", ""))
        self.federation.setPlaceholderText("optional: refuse any other federation")
        self.insecure = QCheckBox("allow unencrypted ws:// (local tests only)")
        self.operator = QLineEdit(state.operator)
        self.operator.setPlaceholderText("your name: recorded with the plan you accept, printed in the privacy report")
        self.operator.editingFinished.connect(lambda: state.set_operator(self.operator.text()))
        conn_box = QGroupBox("Aggregator")
        cf = QFormLayout(conn_box)
        cf.addRow("address", self.url)
        cf.addRow("CA certificate", ca_row)
        cf.addRow("federation", self.federation)
        cf.addRow("", self.insecure)

        self.fingerprint = QLabel()
        self.fingerprint.setObjectName("fingerprint")
        self.fingerprint.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.fingerprint.setWordWrap(True)
        self.key_info = QLabel()
        self.key_info.setWordWrap(True)
        self.create_key_btn = QPushButton("Create identity key")
        self.create_key_btn.clicked.connect(self.create_key)
        import_btn = QPushButton("Import key…")
        import_btn.clicked.connect(self._import_key)
        copy_btn = QPushButton("Copy public key")
        copy_btn.clicked.connect(self._copy_public)
        key_row = QHBoxLayout()
        for b in (self.create_key_btn, import_btn, copy_btn):
            key_row.addWidget(b)
        key_row.addStretch(1)
        id_box = QGroupBox("This site's identity")
        iv = QVBoxLayout(id_box)
        how = QLabel("Send the public key to the federation's admin, then read this fingerprint out to them by "
                     "phone so they know the key is really yours:")
        how.setWordWrap(True)
        iv.addWidget(how)
        iv.addWidget(self.fingerprint)
        iv.addWidget(self.key_info)
        iv.addLayout(key_row)
        operator_row = QHBoxLayout()
        operator_row.addWidget(QLabel("operator"))
        operator_row.addWidget(self.operator, 1)
        iv.addLayout(operator_row)

        self.join_btn = QPushButton("Join federation")
        self.join_btn.setObjectName("primary")
        self.join_btn.clicked.connect(self.join)
        self.leave_btn = QPushButton("Leave")
        self.leave_btn.clicked.connect(self.leave)
        self.leave_btn.setEnabled(False)
        join_row = QHBoxLayout()
        join_row.addWidget(self.join_btn)
        join_row.addWidget(self.leave_btn)
        join_row.addStretch(1)

        self.banner = QLabel()
        self.banner.setObjectName("error")
        self.banner.setWordWrap(True)
        self.banner.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.banner.setVisible(False)

        self.connection = QLabel(CONNECTION_WORDS["disconnected"])
        self.connection.setWordWrap(True)
        self.round_label = QLabel("—")
        self.stage = QLabel("—")
        self.stage.setWordWrap(True)
        self.train_bar = QProgressBar()
        self.train_bar.setFormat("step %v of %m")
        self.train_bar.setRange(0, 1)
        self.train_bar.setValue(0)
        self.epsilon = QLabel("—")
        self.participants = QLabel("—")
        status_box = QGroupBox("Status")
        sf = QFormLayout(status_box)
        sf.addRow("connection", self.connection)
        sf.addRow("round", self.round_label)
        sf.addRow("now", self.stage)
        sf.addRow("training", self.train_bar)
        sf.addRow("ε spent", self.epsilon)
        sf.addRow("sites in this round", self.participants)

        self.log = QPlainTextEdit()
        self.log.setReadOnly(True)
        self.log.setMaximumBlockCount(5000)
        log_box = QGroupBox("Log")
        QVBoxLayout(log_box).addWidget(self.log)

        left = QVBoxLayout()
        left.addWidget(conn_box)
        left.addWidget(id_box)
        left.addStretch(1)
        right = QVBoxLayout()
        right.addLayout(join_row)
        right.addWidget(self.banner)
        right.addWidget(status_box)
        right.addWidget(log_box, 1)
        layout = QHBoxLayout(self)
        layout.addLayout(left, 1)
        layout.addLayout(right, 1)
        self.refresh_identity()

    # -- identity -------------------------------------------------------------------------------

    def identity(self):
        from hemafed.core.trust.identity import IdentityError, load_identity

        try:
            return load_identity(self.state.state_dir), None
        except IdentityError as exc:
            return None, str(exc)

    def refresh_identity(self) -> None:
        from hemafed.core.trust.identity import short_fingerprint

        identity, error = self.identity()
        if identity is None:
            self.fingerprint.setText("no identity key yet")
            self.key_info.setText("Create one (or import the key IT gave you); then send its public key to the "
                                  "federation's admin." if "no identity key" in (error or "") else error)
            self.create_key_btn.setEnabled(True)
            return
        self.fingerprint.setText(short_fingerprint(identity.public_key))
        self.key_info.setText(f"Full fingerprint: {identity.fingerprint}<br>Key file: {identity.path} "
                              "(readable by you only; never send it)")
        self.create_key_btn.setEnabled(False)

    def create_key(self) -> None:
        from hemafed.core.trust.identity import IdentityError, init_identity

        try:
            init_identity(self.state.state_dir)
        except IdentityError as exc:
            self.show_failure(ev.SiteFailed(str(exc), fatal=False, what_to_do=""))
        self.refresh_identity()

    def _import_key(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Import an identity key (PEM, Ed25519)")
        if path:
            self.import_key(Path(path))

    def import_key(self, path: Path) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from hemafed.core.atomic import atomic_write_bytes
        from hemafed.core.trust.identity import KEY_DIR, PUB_FILE, IdentityKey, key_path

        try:
            pem = path.read_bytes()
            key = serialization.load_pem_private_key(pem, password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError(f"it holds a {type(key).__name__}, not an Ed25519 key")
        except (OSError, ValueError, TypeError) as exc:
            self.show_failure(ev.SiteFailed(f"cannot import {path}: {exc}", fatal=False,
                                            what_to_do="choose the .key file made by `hemafed keys init`"))
            return
        target = key_path(self.state.state_dir)
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write_bytes(target, pem, 0o600, overwrite=True)
        atomic_write_bytes(self.state.state_dir / KEY_DIR / PUB_FILE,
                           (IdentityKey(key, target).public_line() + "\n").encode(), 0o644, overwrite=True)
        self.refresh_identity()

    def _copy_public(self) -> None:
        identity, _ = self.identity()
        if identity is not None:
            QGuiApplication.clipboard().setText(identity.public_line())
            self.append_log("public key copied to the clipboard")

    def _choose_ca(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "The federation's CA certificate", "", "PEM (*.pem *.crt)")
        if path:
            self.ca.setText(path)

    # -- join / leave ---------------------------------------------------------------------------

    def join_refusal(self) -> tuple[str, str] | None:
        """(what is wrong, what to do) when this site cannot join now."""
        url = self.url.text().strip()
        if not url:
            return "no aggregator address", "enter the wss:// address the federation's admin gave you"
        if url.startswith("ws://") and not self.insecure.isChecked():
            return ("the address is unencrypted (ws://)", "use the wss:// address; ws:// is for local tests only")
        identity, error = self.identity()
        if identity is None:
            return f"this site has no usable identity key ({error})", "create or import one above"
        reason = self.state.join_refusal()
        if reason and "outside what this site accepts" in reason and self.state.plan_received:
            # The aggregator's last plan was refused; its admin may have changed it since. The
            # driver checks the plan it gets on joining against the same bounds, so let it ask.
            reason = None
        if reason:
            if "budget" in reason or "ledger" in reason:
                todo = "raise the budget on the Privacy page if your policy allows, or ask for a plan with fewer rounds"
            elif "outside what this site accepts" in reason:
                todo = "ask the federation's admin about the plan, or change the accepted δ on the Privacy page"
            elif "still being computed" in reason:
                todo = "wait a moment and press Join again"
            else:
                todo = "fix the images on the Data page"
            return reason, todo
        return None

    def join(self) -> bool:
        if self.worker is not None:
            return False
        refusal = self.join_refusal()
        if refusal:
            self.show_failure(ev.SiteFailed(f"Cannot join: {refusal[0]}.", fatal=True, what_to_do=refusal[1]))
            return False
        from hemafed.network.config import SiteConfig

        s = self.state.settings
        s.set("federation/url", self.url.text().strip())
        s.set("federation/ca_file", self.ca.text().strip())
        s.set("federation/id", self.federation.text().strip())
        self.state.set_operator(self.operator.text())
        cfg = SiteConfig(data=Path(self.state.source), state_dir=self.state.state_dir,
                         aggregator=self.url.text().strip(), epsilon=self.state.epsilon,
                         federation=self.federation.text().strip() or None,
                         ca_file=Path(self.ca.text().strip()) if self.ca.text().strip() else None,
                         insecure=self.insecure.isChecked(), bounds=self.state.bounds, operator=self.state.operator)
        identity, _ = self.identity()
        self.banner.setVisible(False)
        self.last_failure = None
        self.worker = SiteWorker(cfg, identity)
        self.worker.bridge.event.connect(self.on_event)
        self.worker.bridge.crashed.connect(
            lambda msg: self.show_failure(ev.SiteFailed(msg, fatal=True, what_to_do="see the log; try Join again")))
        self.worker.bridge.finished.connect(self._worker_finished)
        self.append_log(f"joining {cfg.aggregator} with budget ε = {cfg.epsilon:g}")
        self.connection.setText(CONNECTION_WORDS["connecting"])
        self.join_btn.setEnabled(False)
        self.leave_btn.setEnabled(True)
        self.joinedChanged.emit(True)
        self.worker.start()
        return True

    def leave(self) -> None:
        if self.worker is not None:
            self.append_log("leaving: the current round is interrupted; nothing is recorded for an update "
                            "that was not sent")
            self.leave_btn.setEnabled(False)
            self.worker.stop()

    def _worker_finished(self, model_path) -> None:
        if self.worker is not None:
            self.worker.join(5)
        self.worker = None
        self.join_btn.setEnabled(True)
        self.leave_btn.setEnabled(False)
        self.connection.setText(CONNECTION_WORDS["disconnected"])
        self.state.refresh_ledgers_soon()
        self.joinedChanged.emit(False)

    # -- events ---------------------------------------------------------------------------------

    def on_event(self, e: object) -> None:
        """React to one site event (queued from the driver's thread, or emitted by a test)."""
        if isinstance(e, ev.ConnectionChanged):
            self.connection.setText(CONNECTION_WORDS.get(e.state, e.state) + (f" ({e.url})" if e.url else ""))
            self.append_log(f"connection: {e.state}" + (f" — {e.detail}" if e.detail else ""))
        elif isinstance(e, ev.PlanReceived):
            self.state.set_plan(e.plan, received=True)
            self.rounds_total = e.plan.rounds
            self.append_log(f"plan received: {e.plan.model}, {e.plan.rounds} rounds, federation {e.plan.federation_id}")
            if e.problems:
                self.show_failure(ev.SiteFailed(
                    "The federation's plan is outside what this site accepts: " + "; ".join(e.problems) + ".",
                    fatal=True, what_to_do="the site declined it; ask the federation's admin to change the plan, "
                    "or change what this site accepts on the Privacy page"))
            else:
                self.review_plan(e)
        elif isinstance(e, ev.PlanAnswered):
            self.append_log("plan accepted" if e.accepted else "plan declined: " + "; ".join(e.reasons))
        elif isinstance(e, ev.RoundStarted):
            self.rounds_total = e.rounds
            self.round_label.setText(f"round {e.round} of {e.rounds}")
            self.participants.setText(str(e.participants))
            self.append_log(f"round {e.round} of {e.rounds} started with {e.participants} sites")
        elif isinstance(e, ev.StageChanged):
            self.stage.setText(STAGE_WORDS.get(e.stage, e.stage))
            if e.stage not in ("training", "preparing"):
                self.train_bar.setFormat("done" if self.train_bar.value() else "step %v of %m")
            if e.stage == "preparing":
                self.append_log("preparing this hospital's images for the federation's model")
            else:
                self.append_log(f"round {e.round}: {STAGE_WORDS.get(e.stage, e.stage)}")
        elif isinstance(e, ev.PrepareProgress):
            self.train_bar.setRange(0, max(e.total, 1))
            self.train_bar.setValue(e.done)
            left = "" if e.seconds_left is None or e.done >= e.total else f" · {_time_left(e.seconds_left)}"
            self.train_bar.setFormat(f"images prepared: %v of %m{left}")
            if e.done >= e.total:
                self.append_log(f"images prepared ({e.total}); waiting for the first round")
        elif isinstance(e, ev.TrainProgress):
            self.train_bar.setRange(0, max(e.total, 1))
            self.train_bar.setValue(e.step)
            loss = f" · loss {e.loss:.3f}" if math.isfinite(e.loss) else ""
            self.train_bar.setFormat(f"step %v of %m{loss}")
        elif isinstance(e, ev.RoundFinished):
            if e.epsilon_spent is not None:
                self.epsilon.setText(f"{e.epsilon_spent:.4g} of {self.state.epsilon:g}")
            acc = f", accuracy {e.accuracy:.1%}" if e.accuracy is not None else ""
            self.append_log(f"round {e.round} {e.status}{acc}" + (f" — {e.detail}" if e.detail else ""))
            self.state.add_round(RoundRecord(e.round, e.status, e.accuracy, e.epsilon_spent))
            self.state.refresh_ledgers_soon()  # off the GUI thread: the next round is training
        elif isinstance(e, ev.SiteFailed):
            self.show_failure(e)
        elif isinstance(e, ev.Finished):
            self.stage.setText("finished" + (f": {e.rounds_trained} round(s) trained" if e.rounds_trained else ""))
            self.append_log(f"federation finished; model saved to {e.model_path}" if e.model_path
                            else "left the federation")
            if e.model_path:
                self.state.set_model(Path(e.model_path))

    def review_plan(self, e: ev.PlanReceived) -> None:
        self.dialog = PlanDialog(e, self.state.epsilon, self)
        self.dialog.finished.connect(self._plan_answered)
        self.dialog.open()

    def _plan_answered(self, result: int) -> None:
        accepted = result == PlanDialog.DialogCode.Accepted
        if self.worker is not None:
            self.worker.answer_plan(accepted, "" if accepted else "the operator declined the plan")
        self.append_log("you accepted the plan" if accepted else "you declined the plan")
        self.dialog = None

    def show_failure(self, failure: ev.SiteFailed) -> None:
        self.last_failure = failure
        if failure.fatal:
            self.stage.setText("stopped: see the message above")
            self.train_bar.setRange(0, 1)
            self.train_bar.setValue(0)
            self.train_bar.setFormat("—")
        todo = f"<br><b>What to do:</b> {failure.what_to_do}" if failure.what_to_do else ""
        retry = "" if failure.fatal else "<br><i>The site keeps trying.</i>"
        self.banner.setText(f"<b>{failure.message}</b>{todo}{retry}")
        self.banner.setVisible(True)
        self.append_log(f"PROBLEM: {failure.message}" + (f" — {failure.what_to_do}" if failure.what_to_do else ""))

    def append_log(self, line: str) -> None:
        self.log.appendPlainText(f"{time.strftime('%H:%M:%S')}  {line}")

    def shutdown(self, timeout: float = 15.0) -> None:
        """Leave (if joined) and wait for the driver's thread (window closing)."""
        if self.worker is not None:
            self.worker.stop()
            self.worker.join(timeout)
