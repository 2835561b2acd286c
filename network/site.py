"""A hospital site's driver: I/O, threads and time around the round state machine
(`hemafed.core.rounds.site_round.SiteRound`), which makes every decision.

The driver connects (reconnecting with back-off after a transient failure), feeds each
message to the machine and carries out the actions it returns: sends, typed events
(`hemafed.core.rounds.site_events`, all delivered on the event-loop thread), preparing a plan
and training a round off the event loop. With DP, the durable ledger entry is written
inside the site trainer's round (`core.learning.site_trainer`), so the spend is on disk before any send.
The headless `hemafed site` and the desktop app drive the same object:

    runner = SiteRunner(cfg, on_event=show, auto_accept=False)
    path = await runner.run()            # on the driver's event loop
    runner.answer_plan(True)             # on that loop, after PlanReceived(awaiting_answer=True)
    runner.answer_plan_threadsafe(True)  # the same from any other thread (a GUI)
    runner.stop() / runner.stop_threadsafe()
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from hemafed.core.atomic import atomic_write_bytes
from hemafed.core.data.partition import stratified_split
from hemafed.core.data.scan import scan_source
from hemafed.core.errors import HemafedError
from hemafed.core.learning.cell_check import with_site_threshold
from hemafed.core.learning.confidence import Calibration, offsets_text
from hemafed.core.learning.fedsgd import moments_layout
from hemafed.core.learning.models import model_problems
from hemafed.core.learning.site_trainer import Projection, SiteData, SiteTrainer, TrainingCancelled, site_trainer
from hemafed.core.privacy.ledger import BudgetExhausted, PrivacyLedger
from hemafed.core.privacy.store import SiteStore
from hemafed.core.rounds import site_round as sr
from hemafed.core.rounds.calibration_sums import CELL_FALSE_ALARMS
from hemafed.core.rounds.plan import FederationPlan, PlanError
from hemafed.core.rounds.site_events import (
    ConnectionChanged,
    Finished,
    PlanAnswered,
    RoundFinished,
    RoundStarted,
    SiteEvent,
    SiteFailed,
    StageChanged,
    TrainProgress,
)
from hemafed.core.rounds.site_round import PlanRefused, PrivacySettings
from hemafed.core.trust.identity import IdentityKey, load_identity
from hemafed.core.trust.text import safe_text
from hemafed.network.client import Backoff, SiteClient
from hemafed.network.config import SiteConfig
from hemafed.network.envelope import Envelope, Limits
from hemafed.network.errors import (
    AuthenticationRefused,
    CertificateRejected,
    ConnectFailed,
    ConnectionLost,
    NotConnected,
    ProtocolError,
)
from hemafed.network.outbound import OutboundLog
from hemafed.network.plan_review import plan_rows, sees_text

log = logging.getLogger(__name__)

DIE_STAGES = ("train", "keys", "shares", "masked", "unmask")
EventFn = Callable[[SiteEvent], None]
T = TypeVar("T")
PROGRESS_EVERY_S = 0.1  # at most ~10 TrainProgress events a second (and always the last step)
PREPARE_REPORT_S = 1.0  # preparation progress: to the operator and the aggregator at most once a second
SHORT_SESSION_S = 5.0  # a session shorter than this counts towards the reconnect back-off

__all__ = ["DIE_STAGES", "PlanRefused", "PrivacySettings", "SiteRunner", "save_model_file"]


class _Stopped(HemafedError):
    """stop() was called: unwind to run()."""


class SiteRunner:
    """One site in one federation. `run()` returns the path of the final model (or None).

    `on_event` receives every `SiteEvent` on the event-loop thread that runs `run()`;
    it must not block (the GUI bridge re-emits them as queued Qt signals). With
    `auto_accept` (headless) an acceptable plan is accepted at once; otherwise the
    driver waits for `answer_plan()` after `PlanReceived(awaiting_answer=True)`.
    `die_at=(round, stage)` simulates a crash (`on_die`, default: exit the process).
    """

    def __init__(self, cfg: SiteConfig, *, identity: IdentityKey | None = None,
                 on_event: EventFn | None = None, auto_accept: bool = True,
                 die_at: tuple[int, str] | None = None, on_die: Callable[[], None] | None = None) -> None:
        self.cfg = cfg
        self.identity = identity or load_identity(cfg.state_dir)
        self.on_event = on_event
        self.auto_accept = auto_accept
        self.die_at = die_at
        self.on_die = on_die or _hard_exit
        self.backoff = Backoff()  # reconnect policy: a site gives up after backoff.retry_for seconds unreachable
        self.store = SiteStore(cfg.state_dir)
        self.machine = sr.SiteRound(cfg.bounds, identity=self.identity.private_key, federation=cfg.federation,
                                    auto_accept=auto_accept, roster=cfg.pinned_roster(), plan_problems=model_problems,
                                    accepted=_accepted_plans(self.store))
        self.plan: FederationPlan | None = None
        self.trainer: SiteTrainer | None = None  # everything this site does with its images for `plan`
        self.data: SiteData | None = None
        self.ledger: PrivacyLedger | None = None
        self._featurizing: asyncio.Future | None = None  # the trainer's preparation, across reconnects
        self._prepare_seen: tuple[int, int, float | None] | None = None
        self.last_outcome: sr.TrainOutcome | None = None  # this site's latest round (kept here, never resent)
        self.bytes_sent = self.bytes_received = 0
        self.client: SiteClient | None = None
        self.final_path: Path | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_flag = threading.Event()  # also the training's cancel flag (checked between steps)
        self._wake: asyncio.Event | None = None
        self._decision: asyncio.Future[tuple[bool, str]] | None = None
        self._last_progress = 0.0
        self._tried_to_connect = False
        # every message this site sends is recorded in its store before it leaves (`network.outbound`)
        self.outbound = OutboundLog(self.store, self._outbound_context)
        self._accepted: set[str] = set()  # digests of the plans whose acceptance is recorded

    def _outbound_context(self) -> tuple[str, FederationPlan | None]:
        plan = self.plan or self.machine.plan
        return (plan.federation_id if plan is not None else (self.cfg.federation or "")), plan

    @property
    def site_id(self) -> int:
        return self.machine.site_id

    # -- control (the UI's side) ---------------------------------------------------------------

    def answer_plan(self, accept: bool, reason: str = "") -> bool:
        """The operator's decision on the plan awaiting an answer; call on the driver's loop.
        False when no plan is waiting (answered already, or none offered)."""
        fut = self._decision
        if fut is None or fut.done():
            return False
        fut.set_result((bool(accept), str(reason)))
        return True

    def answer_plan_threadsafe(self, accept: bool, reason: str = "") -> None:
        """`answer_plan` from any thread (e.g. a GUI's)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed in between: nothing waits any more
                loop.call_soon_threadsafe(self.answer_plan, accept, reason)

    def stop(self) -> None:
        """Leave the federation: training stops between two steps, nothing more is sent, the
        connection closes (the aggregator counts a dropout) and `run()` returns soon after.
        A round whose training had not finished leaves nothing in the ledger; one whose
        spend was already recorded keeps it (the RoundFinished event says which)."""
        self._stop_flag.set()
        if self._wake is not None:
            self._wake.set()

    def stop_threadsafe(self) -> None:
        """`stop()` from any thread; training sees the flag at once, the loop wakes soon after."""
        self._stop_flag.set()
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed in between: run() is over anyway
                loop.call_soon_threadsafe(self.stop)

    @property
    def stopping(self) -> bool:
        return self._stop_flag.is_set()

    # -- main loop -----------------------------------------------------------------------------

    async def run(self) -> Path | None:
        """Take part until the federation is done, a fatal error, or `stop()`. Returns the
        final model's path (None otherwise); the last event is always `Finished`."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        if self._stop_flag.is_set():
            self._wake.set()
        outcome = "failed"
        try:
            try:
                self.client = SiteClient(self.cfg.aggregator, self.identity, ca_file=self.cfg.ca_file,
                                         insecure=self.cfg.insecure, federation=self.cfg.federation,
                                         limits=Limits.for_model(4_000_000), backoff=self.backoff,
                                         ping_interval=30.0, ping_timeout=120.0, on_send=self.outbound)
            except ValueError as exc:  # a bad URL in site.toml, caught before any connection
                self._emit(SiteFailed(str(exc), True, "fix the aggregator URL in site.toml", code="bad_address"))
                return None
            outcome = await self._main()
        except _Stopped:
            outcome = "stopped"
        except asyncio.CancelledError:  # the task running us was cancelled (the app quits): a stop
            self._stop_flag.set()  # a training thread still running stops at its next step
            outcome = "stopped"
            raise
        except Exception as exc:  # a bug: say so on the event channel too, then let it surface
            self._emit(SiteFailed(f"internal error: {safe_text(f'{type(exc).__name__}: {exc}')}", True,
                                  "see the site's log; please report this to the hemafed maintainers", code="internal"))
            raise
        finally:
            if outcome == "stopped":
                self._perform_now(self.machine.stop())
            if self.client is not None:
                with contextlib.suppress(Exception):
                    await self.client.close()
                if self._tried_to_connect:
                    self._emit(ConnectionChanged("disconnected", self.cfg.aggregator))
            self._emit(Finished(self.final_path if outcome == "done" else None, self.machine.rounds_trained,
                                outcome=outcome))
        return self.final_path if outcome == "done" else None

    async def _main(self) -> str:
        assert self.client is not None
        first, short_sessions = True, 0
        while True:
            if self.stopping:
                raise _Stopped
            if not self.client.connected:
                if not first and short_sessions:
                    # The aggregator keeps dropping us at once: do not hammer it.
                    await self._interruptible(asyncio.sleep(self.backoff.delay(short_sessions - 1)))
                failed = await self._connect(first)
                if failed:
                    return failed
                first, session_start = False, time.monotonic()
            try:
                env = await self._interruptible(self.client.recv(timeout=None))
            except (ConnectionLost, NotConnected, ProtocolError) as exc:
                short_sessions = short_sessions + 1 if time.monotonic() - session_start < SHORT_SESSION_S else 0
                self._connection_lost(exc)
                continue
            self.bytes_received += _size(env)
            try:
                actions = self.machine.receive(env)
            except sr.MessageRefused as exc:
                log.warning("refused a %s message from the aggregator: %s", safe_text(env.type, 40), exc)
                continue
            outcome = await self._perform(actions)
            if outcome is not None:
                return outcome

    async def _connect(self, first: bool) -> str | None:
        """Connect (with back-off); None when connected, "failed" after a fatal error."""
        assert self.client is not None
        url = self.cfg.aggregator
        self._tried_to_connect = True
        self._emit(ConnectionChanged("connecting" if first else "reconnecting", url))
        warned = False

        def on_retry(why: str, delay: float) -> None:
            nonlocal warned
            self._emit(ConnectionChanged("reconnecting", url, f"{why}; next try in {delay:.0f} s"))
            if not warned:
                warned = True
                self._emit(SiteFailed(f"cannot reach the aggregator at {url}: {why}", False,
                                      "the site keeps trying on its own; if this lasts, check the address with the "
                                      "federation's admin (is the aggregator running? has the federation "
                                      "finished?)", code="unreachable"))

        try:
            await self._interruptible(self.client.connect(on_retry))
        except AuthenticationRefused as exc:
            return self._fail(f"the aggregator refused this site's key: {exc.message}",
                              f"send this site's public key to the federation's admin and confirm its "
                              f"fingerprint {self.identity.fingerprint} by phone (`hemafed keys show` prints the "
                              f"line to send); start the site again once the admin has added it", "unknown_key")
        except CertificateRejected as exc:
            return self._fail(str(exc), exc.what_to_do, "certificate")
        except ProtocolError as exc:
            return self._fail(f"{url} is not this federation's aggregator: {safe_text(exc.detail)}",
                              "check the aggregator URL and the federation name in site.toml with the admin",
                              "wrong_aggregator")
        except ConnectFailed as exc:
            return self._fail(str(exc), "check that the aggregator is running and reachable from here, "
                                        "then start the site again", "unreachable")
        self._emit(ConnectionChanged("connected", url))
        self._perform_now(self.machine.connected())
        return None

    def _fail(self, message: str, what_to_do: str, code: str) -> str:
        log.debug("fatal: %s", message)
        self._emit(SiteFailed(message, True, what_to_do, code))
        return "failed"

    def _connection_lost(self, exc: BaseException) -> None:
        why = safe_text(str(exc))
        log.warning("connection to the aggregator lost (%s); reconnecting", why)
        self._emit(ConnectionChanged("reconnecting", self.cfg.aggregator, why))
        self._perform_now(self.machine.connection_lost(why))

    async def _interruptible(self, aw: Awaitable[T]) -> T:
        """Await `aw` unless stop() comes first (then cancel it and raise _Stopped)."""
        assert self._wake is not None
        task = asyncio.ensure_future(aw)
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({task, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waker.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if task.cancelled():
            raise _Stopped
        return task.result()

    # -- actions -------------------------------------------------------------------------------

    async def _perform(self, actions: list[sr.Action]) -> str | None:
        """Carry out the machine's actions in order; a run outcome when the run should end."""
        lost = False
        for i, action in enumerate(actions):
            if isinstance(action, sr.Emit):
                self._event_action(action.event)
                continue
            if isinstance(action, sr.Stop):
                return action.outcome
            if self.stopping:  # nothing more goes out after stop(); its events still do
                self._perform_now(actions[i + 1:])
                raise _Stopped
            if isinstance(action, sr.Send):
                if lost:
                    continue  # the rest of a batch for a connection that is gone
                try:
                    await self._send(Envelope(action.type, action.round, action.body, action.blobs))
                except (ConnectionLost, NotConnected) as exc:
                    # Transient: the round is lost for this site; the loop reconnects.
                    lost = True
                    self._connection_lost(exc)
                continue
            if isinstance(action, sr.Prepare):
                more = await self._prepare_action(action.plan)
            elif isinstance(action, sr.AskOperator):
                more = await self._ask_operator()
            elif isinstance(action, sr.Featurize):
                more = await self._featurize_action()
            elif isinstance(action, sr.Train):
                more = await self._train_action(action)
            elif isinstance(action, sr.Finish):
                self.final_path = await asyncio.to_thread(self._save_final, action)
                return "done"
            else:
                raise TypeError(f"unknown action {action!r}")
            outcome = await self._perform(more)
            if outcome is not None:
                return outcome
        return None

    def _perform_now(self, actions: list[sr.Action]) -> None:
        """Only the events of `actions` (after a lost connection or a stop nothing else goes out)."""
        for action in actions:
            if isinstance(action, sr.Emit):
                self._event_action(action.event)

    def _event_action(self, event: SiteEvent) -> None:
        if isinstance(event, PlanAnswered) and event.accepted:
            self._record_acceptance()  # on record before anything else happens: a rejoin needs no second review
        self._emit(event)
        if isinstance(event, RoundStarted) and event.peers:
            self._log_round(event.round, "started", peers=list(event.peers))  # who the masks were agreed with
        elif isinstance(event, StageChanged):
            self._maybe_die(event.round, event.stage)
        elif isinstance(event, RoundFinished):
            # the site's own round log (the simulation's traffic figures come from it)
            status = "round_end" if event.status in ("completed", "abandoned") else event.status
            # accuracy and ε too: the app's accuracy history is read back from this log after a restart
            self._log_round(event.round, status, outcome=event.status, detail=event.detail,
                            accuracy=event.accuracy, epsilon_spent=event.epsilon_spent,
                            bytes_sent=self.bytes_sent, bytes_received=self.bytes_received)

    def _emit(self, event: SiteEvent) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(event)
        except Exception:  # a broken consumer must not take the federation down
            log.exception("the site's event handler failed on %s", type(event).__name__)

    async def _send(self, env: Envelope) -> None:
        assert self.client is not None
        self.bytes_sent += _size(env)
        await self.client.send(env, reconnect=False)

    async def _ask_operator(self) -> list[sr.Action]:
        assert self._loop is not None
        self._decision = self._loop.create_future()
        try:
            accept, reason = await self._interruptible(self._decision)
        finally:
            self._decision = None
        return self.machine.answer(accept, reason)

    # -- preparing a plan ------------------------------------------------------------------------

    async def _prepare_action(self, plan: FederationPlan) -> list[sr.Action]:
        try:
            proj = await asyncio.to_thread(self.prepare, plan)
        except PlanRefused as exc:
            return self.machine.prepared(None, n_params=0, problems=exc.reasons, what_to_do=exc.what_to_do or None)
        except Exception as exc:  # e.g. an unreadable file: refuse the plan with the reason
            log.exception("preparing the plan failed")
            return self.machine.prepared(None, n_params=0,
                                         problems=[safe_text(f"cannot prepare the plan here: {exc}")])
        assert self.trainer is not None
        return self.machine.prepared(proj.settings, n_params=self.trainer.n_params,
                                     epsilon_spent=proj.spent if plan.dp else None,
                                     epsilon_per_round=proj.epsilon_per_round)

    def prepare(self, plan: FederationPlan) -> Projection:
        """Load the data, open the ledger and project this site's ε for the plan (off the event loop; fast: the
        images' features come after the operator accepted, `_featurize_action`). Raises `PlanRefused` with every
        reason the plan cannot run here."""
        if self.trainer is None or self.plan is None or self.plan.digest() != plan.digest():
            if self.data is None or self.plan is None or (self.plan.classes, self.plan.input_size,
                                                          self.plan.val_fraction, self.plan.seed) != \
                    (plan.classes, plan.input_size, plan.val_fraction, plan.seed):
                self.data = self._load_data(plan)
            self.trainer = site_trainer(plan, bounds=self.cfg.bounds, seed=self.cfg.simulation_seed,
                                        threads=self.cfg.torch_threads)
            self._featurizing = None
        self.plan = plan
        assert self.data is not None
        # an existing ledger only: a plan under review (or refused) leaves nothing behind
        self.ledger = self.trainer.open_ledger(self.cfg.state_dir, self.cfg.epsilon, len(self.data.train_labels),
                                               create=False, kind=self.cfg.accountant) if plan.dp else None
        if not plan.dp:
            log.warning("this plan is NON-PRIVATE: updates carry no differential-privacy guarantee")
        return self.trainer.prepare(self.ledger, self.data, self.cfg.epsilon)

    async def _featurize_action(self) -> list[sr.Action]:
        """Compute the images' features (minutes the first time; the cache makes later federations instant),
        telling the operator and the aggregator how far it got; then tell the aggregator this site is ready."""

        trainer = self.trainer
        assert trainer is not None and self.plan is not None and self.data is not None
        if self.plan.dp and self.ledger is None:  # accepted: from now on this federation has a ledger
            self.ledger = await asyncio.to_thread(trainer.open_ledger, self.cfg.state_dir, self.cfg.epsilon,
                                                  len(self.data.train_labels), create=True, kind=self.cfg.accountant)
            trainer.bind_ledger(self.ledger)
        if self._featurizing is None:  # once per trainer: a reconnect in between waits for the same work
            self._prepare_seen = None

            def progress(done: int, total: int, left: float | None) -> None:
                self._prepare_seen = (done, total, left)  # read by the loop below

            self._featurizing = asyncio.ensure_future(asyncio.to_thread(
                trainer.featurize, progress, self._stop_flag.is_set))
        job, reported = self._featurizing, None
        try:
            while True:
                await self._interruptible(asyncio.wait({job}, timeout=PREPARE_REPORT_S))
                seen = self._prepare_seen
                if seen is not None and seen != reported and (not job.done() or reported is not None):
                    reported = seen
                    outcome = await self._perform(self.machine.preparing(*seen))
                    if outcome is not None:
                        raise RuntimeError(f"preparing ended the run: {outcome}")
                if job.done():
                    break
            job.result()
        except TrainingCancelled:
            raise _Stopped from None
        except _Stopped:
            raise
        except Exception as exc:
            self._featurizing = None
            log.exception("preparing this site's images failed")
            return self.machine.featurize_failed(f"{type(exc).__name__}: {exc}")
        return self.machine.featurized()

    def _load_data(self, plan: FederationPlan) -> SiteData:
        try:
            site = scan_source(self.cfg.data, plan.classes, size=plan.input_size)
        except (FileNotFoundError, ValueError, OSError) as exc:
            raise PlanRefused([f"cannot load the training images from {self.cfg.data}: {exc}"],
                              "check the data folder in site.toml (`hemafed scan` shows what it holds)") from exc
        if site.report.problems:
            log.warning("%d files skipped while loading %s (run `hemafed scan` for the list)",
                        len(site.report.problems), self.cfg.data)
        if len(site.labels) == 0:
            raise PlanRefused([f"no usable training images in {self.cfg.data}"],
                              "check the data folder in site.toml (`hemafed scan` shows what it holds)")
        train, val = stratified_split(site.labels, plan.val_fraction, seed=plan.seed)
        log.info("local data: %d training and %d validation images", len(train), len(val))
        return SiteData(site.images[train], site.labels[train], site.images[val], site.labels[val])

    # -- a round -------------------------------------------------------------------------------

    async def _train_action(self, action: sr.Train) -> list[sr.Action]:
        rnd, trainer = action.round, self.trainer
        assert trainer is not None
        recorded_before = self.ledger.rounds if self.ledger is not None else 0
        started = time.monotonic()

        def progress(step: int, total: int, left: float | None) -> None:
            self._progress(TrainProgress(rnd, step, total, float("nan")))

        try:
            await asyncio.to_thread(self._save_model, "latest", action.weights, rnd)
            outcome = await asyncio.to_thread(self._contribution, rnd, action.weights, progress)
        except TrainingCancelled:
            return self.machine.train_cancelled(rnd, recorded=self._recorded_since(recorded_before),
                                                epsilon_spent=self._spent())
        except BudgetExhausted as exc:
            log.warning("round %d: declining, %s", rnd, exc)
            return self.machine.budget_exhausted(rnd, str(exc))
        except Exception as exc:  # a bug or a resource failure: never a traceback for the operator
            log.exception("round %d: training failed", rnd)
            return self.machine.train_failed(rnd, safe_text(f"{type(exc).__name__}: {exc}"))
        self.last_outcome = outcome
        # on the loop's thread, so before the machine's next stage (the training thread's were queued earlier)
        self._emit(TrainProgress(rnd, max(outcome.steps, 1), max(outcome.steps, 1), float(outcome.loss)))
        eps = outcome.epsilon_spent
        proj = trainer.projection
        log.info("round %d: trained %d steps in %.1f s, %s", rnd, outcome.steps, time.monotonic() - started,
                 f"ε spent {eps:.3f} of {self.cfg.epsilon:g} at δ={proj.delta:g}" if eps is not None
                 else "NON-PRIVATE")
        self._log_round(rnd, "trained", epsilon=eps, loss=outcome.loss, train_s=time.monotonic() - started)
        if self.stopping:  # stop() came after the last step: the spend is recorded, nothing is sent
            return self.machine.train_cancelled(rnd, recorded=self._recorded_since(recorded_before),
                                                epsilon_spent=eps)
        return self.machine.trained(rnd, outcome)

    def _contribution(self, rnd: int, weights: np.ndarray, progress) -> sr.TrainOutcome:
        """This site's part of round `rnd` (on a worker thread): the trainer's, spend recorded first."""
        assert self.trainer is not None
        return self.trainer.contribution(rnd, weights, self._stop_flag.is_set, progress)

    def _recorded_since(self, before: int) -> bool:
        """Did this round reach the ledger? (`record_round` updates the open ledger object.)"""
        return self.ledger is not None and self.ledger.rounds > before

    def _spent(self) -> float | None:
        return self.ledger.spent_epsilon() if self.ledger is not None else None

    def _progress(self, event: TrainProgress) -> None:
        """Called on the training thread: hand the event to the loop's thread (throttled)."""
        now = time.monotonic()
        if event.step < event.total and now - self._last_progress < PROGRESS_EVERY_S:
            return
        self._last_progress = now
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._emit, event)

    def _save_final(self, action: sr.Finish) -> Path:
        calibration = self._calibrate(action.weights, action.temperature, action.cell_threshold, action.class_mix)
        path = self._save_model("final", action.weights, action.round, calibration)
        log.info("federation finished; final model saved to %s%s", path,
                 "" if calibration is None else f" (temperature {calibration.temperature:.3g} from "
                 f"{calibration.temperature_from}; 'uncertain' threshold "
                 + ("none: too few validation images here" if calibration.threshold is None else
                    f"{calibration.threshold:.3f} from {calibration.images} validation images here")
                 + f"; {offsets_text(calibration)})")
        return path

    def _calibrate(self, weights: np.ndarray, temperature: float | None, cell_threshold: float | None = None,
                   class_mix: tuple[int, ...] | None = None) -> Calibration | None:
        """The federation's temperature (or, without one, this site's own), this site's class offsets when they
        pass the guard, and the abstention threshold from this site's validation images; nothing about the offsets
        or the threshold is sent (docs/privacy.md, "Calibration")."""
        federation = None if temperature is None else Calibration.federation_only(
            temperature, cell_threshold=cell_threshold, cell_false_alarms=CELL_FALSE_ALARMS,
            federation_classes=None if class_mix is None else list(class_mix))
        if self.trainer is None:
            return federation
        try:
            logits, labels = self.trainer.validation_logits(weights)
        except RuntimeError:  # never prepared (the site joined for the end only)
            return federation
        where = moments_layout(getattr(self.trainer, "trainable", None))
        cal = Calibration.fit(logits, labels, temperature=temperature,
                              federation_mix=None if class_mix is None else np.asarray(class_mix))
        return with_site_threshold(cal,
                                   None if where is None else np.asarray(weights)[where], self.trainer.data.val_images,
                                   federation_threshold=cell_threshold)

    # -- bookkeeping -----------------------------------------------------------------------------

    def _save_model(self, name: str, weights: np.ndarray, rnd: int, calibration: Calibration | None = None) -> Path:
        assert self.plan is not None
        path = self.cfg.state_dir / "models" / self.plan.federation_id / f"{name}.npz"
        return save_model_file(path, weights, self.plan, rnd, calibration)

    def _record_acceptance(self) -> None:
        """The plan as the operator accepted it (fields, digest, the review's words, who, when, which aggregator), in
        the site's store for its privacy report; once per plan and run (a reconnect re-sends the same plan)."""
        plan, trainer = self.plan or self.machine.plan, self.trainer
        if plan is None or plan.digest() in self._accepted:
            return
        self._accepted.add(plan.digest())
        proj = None
        if trainer is not None:
            with contextlib.suppress(RuntimeError):  # not prepared (a plan refused before preparing): no figures
                proj = trainer.projection
        review = plan_rows(plan, proj.settings if proj is not None else None, self.cfg.epsilon,
                           proj.epsilon_per_round if proj is not None else ())
        review.append(("what the aggregator sees", sees_text(plan)))
        certificate = self.client.peer_certificate_sha256 if self.client is not None else None
        self.store.record_plan_acceptance(
            plan.federation_id, plan.digest(), plan.to_dict(), operator=self.cfg.operator,
            decided="automatic" if self.auto_accept else "operator",
            aggregator=json.dumps({"url": self.cfg.aggregator, "certificate_sha256": certificate}),
            review=review, time=time.time())

    def _log_round(self, rnd: int, status: str, **fields: Any) -> None:
        """The site's own round log, beside its ledger (`SiteStore.round_log`)."""

        plan = self.plan or self.machine.plan
        federation = plan.federation_id if plan is not None else (self.cfg.federation or "")
        self.store.log_round(federation, rnd, status, time.time(), **fields)

    def _maybe_die(self, rnd: int, stage: str) -> None:
        stage = "train" if stage == "training" else stage
        if self.die_at == (rnd, stage):
            log.warning("simulated crash at round %d, stage %s", rnd, stage)
            self.on_die()


def _accepted_plans(store: SiteStore) -> dict[str, FederationPlan]:
    """The last plan this site accepted in each federation (one that no longer parses is simply asked again)."""
    out = {}
    for federation_id, fields in store.last_accepted_plans().items():
        try:
            out[federation_id] = FederationPlan.from_dict(fields)
        except (PlanError, TypeError, ValueError):
            log.info("the plan accepted earlier in %s no longer reads; it will be reviewed again", federation_id)
    return out


def _hard_exit() -> None:
    logging.shutdown()
    os._exit(17)


def _size(env: Envelope) -> int:
    return 4 + len(json.dumps({"type": env.type, "round": env.round, "body": dict(env.body)})) + sum(
        len(b) for b in env.blobs)


def save_model_file(path: Path, weights: np.ndarray, plan: FederationPlan, rnd: int,
                    calibration: Calibration | None = None) -> Path:
    """A model file the app can load: flat float32 weights plus the registry name and classes (and this site's
    calibration, when it fitted one)."""
    import io

    buf = io.BytesIO()
    meta = {"model": plan.model, "classes": list(plan.classes), "input_size": plan.input_size,
            "round": rnd, "federation_id": plan.federation_id,
            "calibration": None if calibration is None else calibration.to_dict()}
    np.savez(buf, weights=weights, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
    atomic_write_bytes(path, buf.getvalue(), mode=0o600)
    return path

