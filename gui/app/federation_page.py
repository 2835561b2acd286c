"""Federation page: where the aggregator is, who this site is (the identity key and the
fingerprint to read out by phone), Join / Leave, the plan review, live round status,
failures in words with the next step in this app, and a log.

Everything it says about the running site comes from one value (`site_status.SiteStatus`), folded
from the site driver's events; the window's status bar shows the same value."""

from __future__ import annotations

import math
import time
from collections import deque
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
from .site_status import CONNECTION_WORDS, SiteStatus, fold, joining
from .site_worker import SiteWorker
from .state import DEFAULT_URL, AppState, RoundRecord


def _time_left(seconds: float) -> str:
    """'about 3 min left' / 'less than a minute left', for a progress bar."""
    minutes = round(seconds / 60)
    return "less than a minute left" if minutes < 1 else f"about {minutes} min left"


def app_next_step(failure: ev.SiteFailed, fingerprint: str = "") -> str:
    """The next step for a failure, in terms of this app's pages and buttons (the driver's own `what_to_do` is
    written for the headless site and its site.toml)."""
    fatal = failure.fatal
    steps = {
        "unreachable": ("check the address with the federation's admin (is its aggregator running? has the "
                        "federation finished?), then press Join again" if fatal else
                        "nothing to change here: the site keeps trying until you press Leave; if it lasts, check "
                        "the address with the federation's admin"),
        "bad_address": "correct the aggregator address above (it starts with wss://), then press Join",
        "unknown_key": (f"press Copy public key, send it to the federation's admin and read them the fingerprint "
                        f"{fingerprint} by phone; press Join again once they have added it"),
        "certificate": ("choose the federation's CA certificate (from its admin) under CA certificate, check its "
                        "fingerprint with them by phone, then press Join"),
        "wrong_aggregator": "check the address and the federation name above with the federation's admin",
        "plan_refused": ("check the reasons with the federation's admin, or widen what this site accepts on the "
                         "Privacy page if your policy allows, then press Join"),
        "budget": ("on the Privacy page, raise this site's budget (or this federation's budget) if your policy "
                   "allows, then press Join; or ask the admin for a plan with fewer rounds"),
        "data": "check the images on the Data page, then press Join again",
        "training": "check the images on the Data page and the log below, then press Join again",
        "finished": ("nothing more can happen in this federation: ask its admin for the final model, or for the "
                     "address of a new federation"),
        "internal": "see the log below and report it to hemafed's maintainers; press Join to try again",
    }
    return steps.get(failure.code, failure.what_to_do)


class FederationPage(QWidget):
    title = "Federation"
    joinedChanged = Signal(bool)
    statusChanged = Signal(object)  # the SiteStatus after each change

    def __init__(self, state: AppState) -> None:
        super().__init__()
        self.state = state
        self.worker: SiteWorker | None = None
        self.dialog: PlanDialog | None = None
        self.status = SiteStatus()
        self._log_lines: deque[tuple[str, bool]] = deque(maxlen=10_000)  # (line, shown only with "every stage")
        s = state.settings

        self.url = QLineEdit(s.get_str("federation/url", ""))
        self.url.setPlaceholderText(DEFAULT_URL)
        self.ca = QLineEdit(s.get_str("federation/ca_file", ""))
        self.ca.setPlaceholderText("the federation's CA certificate (.pem), from its admin")
        self.ca.textChanged.connect(self._show_ca_fingerprint)
        self.ca_fingerprint = QLabel()
        self.ca_fingerprint.setWordWrap(True)
        # a wrapped label is given the height of its narrowest layout; keep the words under the field they are about
        self.ca_fingerprint.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop)
        self.ca_fingerprint.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        ca_btn = QPushButton("Browse…")
        ca_btn.clicked.connect(self._choose_ca)
        ca_row = QHBoxLayout()
        ca_row.addWidget(self.ca, 1)
        ca_row.addWidget(ca_btn)
        self.federation = QLineEdit(s.get_str("federation/id", ""))
        self.federation.setPlaceholderText("optional: refuse any other federation")
        self.insecure = QCheckBox("allow unencrypted ws:// (local tests only)")
        self.operator = QLineEdit(state.operator)
        self.operator.setPlaceholderText("your name (kept with each plan you accept)")
        self.operator.setToolTip("Recorded with each plan you accept and printed in the site's privacy report.")
        self.operator.editingFinished.connect(lambda: state.set_operator(self.operator.text()))
        conn_box = QGroupBox("Aggregator")
        cf = QFormLayout(conn_box)
        cf.addRow("address", self.url)
        cf.addRow("CA certificate", ca_row)
        cf.addRow("", self.ca_fingerprint)
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
        self.every_stage = QCheckBox("show every stage of every round")
        self.every_stage.setToolTip("By default the log has one line per round; this adds a line for each step of a "
                                    "round (training, the secure-aggregation stages)")
        self.every_stage.toggled.connect(self._rebuild_log)
        log_box = QGroupBox("Log")
        lv = QVBoxLayout(log_box)
        lv.addWidget(self.log)
        lv.addWidget(self.every_stage)

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
        self._show_ca_fingerprint()
        self.render()

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
            self._set_status(SiteStatus(phase="failed", problem=ev.SiteFailed(
                f"Cannot join: {refusal[0]}.", fatal=True, what_to_do=refusal[1])))
            self.append_log(f"PROBLEM: cannot join: {refusal[0]} — {refusal[1]}")
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
                         insecure=self.insecure.isChecked(), bounds=self.state.bounds,
                         operator=self.state.operator)
        identity, _ = self.identity()
        self.worker = SiteWorker(cfg, identity)
        self.worker.bridge.event.connect(self.on_event)
        self.worker.bridge.crashed.connect(lambda msg: self.on_event(ev.SiteFailed(
            msg, fatal=True, what_to_do="see the log; try Join again", code="internal")))
        self.worker.bridge.finished.connect(self._worker_finished)
        self.state.clear_rounds(None)  # a new federation: nothing of an earlier one is shown
        self._set_status(joining())
        self.append_log(f"joining {cfg.aggregator} with budget ε = {cfg.epsilon:g}")
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
        if self.status.joined:  # the driver ended without its Finished event (it crashed)
            self._set_status(fold(self.status, ev.Finished(None, outcome="failed")))
        self.render()
        self.state.refresh_ledgers_soon()
        self.joinedChanged.emit(False)

    @property
    def last_failure(self) -> ev.SiteFailed | None:
        return self.status.problem

    # -- events ---------------------------------------------------------------------------------

    def on_event(self, e: object) -> None:
        """React to one site event (queued from the driver's thread, or emitted by a test): fold it into the
        status everything shown is drawn from, then log it and act on it."""
        self._set_status(fold(self.status, e))
        if isinstance(e, ev.ConnectionChanged):
            self.append_log(f"connection: {CONNECTION_WORDS.get(e.state, e.state)}"
                            + (f" — {e.detail}" if e.detail else ""), detail=e.state == "connecting")
        elif isinstance(e, ev.PlanReceived):
            self.state.set_plan(e.plan, received=True)
            self.state.load_rounds(e.plan.federation_id)  # a rejoin continues the history this site has
            self.append_log(f"plan received: {e.plan.rounds} rounds of {e.plan.model}, federation "
                            f"{e.plan.federation_id}" + (" (the plan you accepted before)" if not e.awaiting_answer
                                                          and not e.problems else ""))
            if e.problems:
                self._set_status(fold(self.status, ev.SiteFailed(
                    "The federation's plan is outside what this site accepts: " + "; ".join(e.problems) + ".",
                    fatal=True, what_to_do="", code="plan_refused")))
            elif e.awaiting_answer:
                self.review_plan(e)
        elif isinstance(e, ev.PlanAnswered):
            self.append_log("plan accepted" if e.accepted else "plan declined: " + "; ".join(e.reasons))
        elif isinstance(e, ev.PrepareProgress):
            if e.done >= e.total:
                self.append_log(f"images prepared ({e.total}); waiting for the first round")
        elif isinstance(e, ev.RoundWithoutThisSite):
            self.append_log(f"round {e.round} of {e.rounds} started with {e.participants} hospitals, without this "
                            "one (it takes part once it is ready)")
        elif isinstance(e, ev.RoundStarted):
            self.append_log(f"round {e.round} of {e.rounds} started with {e.participants} sites", detail=True)
        elif isinstance(e, ev.StageChanged):
            if e.stage == "preparing":
                self.append_log("preparing this hospital's images for the federation's model")
            else:
                self.append_log(f"round {e.round}: {self.status.words}", detail=True)
        elif isinstance(e, ev.RoundFinished):
            acc = f", accuracy {e.accuracy:.1%}" if e.accuracy is not None else ""
            eps = f", ε spent {e.epsilon_spent:.3g}" if e.epsilon_spent is not None else ""
            self.append_log(f"round {e.round} of {self.status.rounds} {e.status}{acc}{eps}"
                            + (f" — {e.detail}" if e.detail else ""))
            self.state.add_round(RoundRecord(e.round, e.status, e.accuracy, e.epsilon_spent))
            self.state.refresh_ledgers_soon()  # off the GUI thread: the next round is training
        elif isinstance(e, ev.SiteFailed):
            self.append_log(f"PROBLEM: {e.message} — {app_next_step(e, self._fingerprint())}")
        elif isinstance(e, ev.Finished):
            self.append_log(f"federation finished; model saved to {e.model_path}" if e.model_path
                            else "left the federation" if e.outcome == "stopped" else "the site stopped")
            if e.model_path:
                self.state.set_model(Path(e.model_path))

    def _set_status(self, status: SiteStatus) -> None:
        self.status = status
        self.render()
        self.statusChanged.emit(status)

    def render(self) -> None:
        """Draw the panel, the progress bar, the banner and the buttons from `self.status`."""
        st = self.status
        self.connection.setText(CONNECTION_WORDS.get(st.connection, st.connection)
                                + (f" ({self.url.text().strip()})" if st.connection != "disconnected" else ""))
        self.round_label.setText(f"round {st.round} of {st.rounds}" if st.round else
                                 f"{st.rounds} rounds planned" if st.rounds else "—")
        self.stage.setText(st.words)
        self.epsilon.setText(f"{st.epsilon_spent:.4g} of {self.state.epsilon:g}" if st.epsilon_spent is not None
                             else "—")
        self.participants.setText(str(st.participants) if st.participants else "—")
        if st.phase == "preparing" and st.prepared is not None:
            done, total, left = st.prepared
            self.train_bar.setRange(0, max(total, 1))
            self.train_bar.setValue(min(done, total))
            tail = "" if left is None or done >= total else f" · {_time_left(left)}"
            self.train_bar.setFormat(f"images prepared: %v of %m{tail}")
        elif st.step is not None and st.phase in ("training", "keys", "shares", "masked", "unmask", "waiting"):
            step, total = st.step
            self.train_bar.setRange(0, max(total, 1))
            self.train_bar.setValue(step)
            loss = f" · loss {st.loss:.3f}" if st.loss is not None and math.isfinite(st.loss) else ""
            self.train_bar.setFormat(("trained" if step >= total else "step %v of %m") + loss)
        else:
            self.train_bar.setRange(0, 1)
            self.train_bar.setValue(0)
            self.train_bar.setFormat("—")
        if st.problem is not None:
            step = app_next_step(st.problem, self._fingerprint())
            todo = f"<br><b>What to do:</b> {step}" if step else ""
            retry = "" if st.problem.fatal else "<br><i>The site keeps trying.</i>"
            self.banner.setObjectName("error")
            self.banner.setText(f"<b>{st.problem.message}</b>{todo}{retry}")
            self.banner.setVisible(True)
        elif st.note:
            self.banner.setObjectName("note")
            self.banner.setText(st.note)
            self.banner.setVisible(True)
        else:
            self.banner.setVisible(False)
        self.banner.style().unpolish(self.banner)
        self.banner.style().polish(self.banner)
        self.join_btn.setEnabled(self.worker is None)
        self.leave_btn.setEnabled(self.worker is not None and not self.worker.stop_requested)

    def _fingerprint(self) -> str:
        identity, _ = self.identity()
        return identity.fingerprint if identity is not None else ""

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
        """Show a problem found outside the driver (an identity key that cannot be made, a file that cannot be
        imported) the way the driver's are shown."""
        self._set_status(fold(self.status, failure))
        self.append_log(f"PROBLEM: {failure.message}" + (f" — {failure.what_to_do}" if failure.what_to_do else ""))

    def append_log(self, line: str, detail: bool = False) -> None:
        """One log line; a `detail` line (a stage of a round) shows only with "show every stage". The log follows
        new lines unless the operator scrolled up to read."""
        self._log_lines.append((f"{time.strftime('%H:%M:%S')}  {line}", detail))
        if detail and not self.every_stage.isChecked():
            return
        bar = self.log.verticalScrollBar()
        following = bar.value() >= bar.maximum() - 2
        position = bar.value()
        self.log.appendPlainText(self._log_lines[-1][0])
        bar.setValue(bar.maximum() if following else position)

    def _rebuild_log(self) -> None:
        show_all = self.every_stage.isChecked()
        self.log.setPlainText("\n".join(text for text, detail in self._log_lines if show_all or not detail))
        self.log.verticalScrollBar().setValue(self.log.verticalScrollBar().maximum())

    def _show_ca_fingerprint(self) -> None:
        """The CA certificate's SHA-256 fingerprint, to confirm with the federation's admin by phone."""
        from hemafed.core.trust.certs import certificate_fingerprint

        path = self.ca.text().strip()
        if not path:
            self.ca_fingerprint.setText("")
            return
        try:
            fp = certificate_fingerprint(Path(path))
        except FileNotFoundError:
            self.ca_fingerprint.setText("<i>No file at this path: choose the CA certificate (.pem) that the "
                                        "federation's admin sent you.</i>")
            return
        except OSError as exc:
            self.ca_fingerprint.setText(f"<i>This file cannot be opened ({exc.strerror or 'no permission'}): "
                                        "copy the CA certificate somewhere this account can read.</i>")
            return
        except ValueError:
            self.ca_fingerprint.setText("<i>This file is not a certificate (a .pem file that starts with "
                                        "BEGIN CERTIFICATE): choose the one the federation's admin sent you.</i>")
            return
        self.ca_fingerprint.setText(f"Fingerprint (confirm it with the federation's admin by phone):<br>"
                                    f"<code>{fp}</code>")

    def shutdown(self, timeout: float = 15.0) -> None:
        """Leave (if joined) and wait for the driver's thread (window closing)."""
        if self.worker is not None:
            self.worker.stop()
            self.worker.join(timeout)
