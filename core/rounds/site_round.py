"""A hospital site's side of a federation as a sans-I/O state machine.

The driver (`hemafed.network.site.SiteRunner`) owns sockets, threads and time; this
machine owns the decisions: is this plan acceptable, may this round start, what to
send after training, when a round is over, when the federation is done. It is fed

    connected()                       a new session with the aggregator began
    receive(message)                  one message from the aggregator (type, round, body, blobs)
    prepared(...)                     the result of a `Prepare` action (data, ledger, σ)
    answer(accept, reason)            the operator's decision after an `AskOperator` action
    preparing(done, total, left) / featurized() / featurize_failed(why)
                                      progress and result of a `Featurize` action
    trained(...) / budget_exhausted(...) / train_cancelled(...) / train_failed(...)
                                      the result of a `Train` action
    connection_lost(why) / stop()

and every call returns the actions to carry out, in order: `Send` a message, `Emit` an
event (`hemafed.core.rounds.site_events`), `Prepare` a plan (load data, open the ledger,
project ε: off the event loop), `AskOperator`, `Featurize` (compute what every round needs from
the images — the slow part, minutes the first time — reporting progress to the aggregator,
which holds the first round for a site still preparing), `Train` a round (off the event
loop; the ledger entry is written inside, before the result comes back), `Finish`
(save the final model), `Stop` (a fatal error: close and end the run).

A message that is malformed or out of place raises `MessageRefused` and leaves the
machine exactly as it was; the driver logs it and carries on. Every field read from a
message is type- and range-checked here first: the aggregator is not trusted to send
sane JSON. Text from the aggregator is escaped (`safe_text`) before it reaches an event.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import numpy as np

from .. import secagg
from ..errors import FatalError, HemafedError
from ..trust.identity import IdentityError, fingerprint, parse_public_line
from ..trust.text import safe_text
from .plan import FederationPlan, PlanError, SiteBounds
from .round_messages import (  # the round vocabulary, shared with the other end
    DECLINE,
    DONE,
    FINISHED,
    PLAIN_UPDATE,
    PLAN,
    PLAN_ACCEPT,
    PLAN_REJECT,
    PREPARING,
    ROUND_END,
    ROUND_START,
    SECAGG,
    STATUS,
)
from .site_events import (
    PlanAnswered,
    PlanReceived,
    PrepareProgress,
    RoundFinished,
    RoundStarted,
    RoundWithoutThisSite,
    SiteEvent,
    SiteFailed,
    StageChanged,
)

log = logging.getLogger(__name__)


MAX_INT = 2**31 - 1  # no plan number a site uses is anywhere near this; bigger is hostile
MAX_CLASSES = 1000
ROUND_END_STATUSES = ("completed", "abandoned")


class MessageRefused(HemafedError):
    """A message from the aggregator was malformed or out of place; nothing changed."""


class PlanRefused(FatalError):
    """The site refused the federation's plan (reasons in `reasons`)."""

    def __init__(self, reasons: list[str], what_to_do: str | None = None) -> None:
        super().__init__("; ".join(reasons), what_to_do=what_to_do)
        self.reasons = reasons


@dataclass(frozen=True)
class PrivacySettings:
    """σ fitted to the budget for the whole plan, the sampling rate, steps per round, δ."""

    sigma: float
    sample_rate: float
    steps: int
    delta: float


class Message(Protocol):
    """What the machine reads from a message (an `Envelope` fits)."""

    type: str
    round: int
    body: Mapping[str, Any]
    blobs: tuple[bytes, ...]


# -- actions --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    type: str
    round: int
    body: dict[str, Any] = field(default_factory=dict)
    blobs: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class Emit:
    event: SiteEvent


@dataclass(frozen=True)
class Prepare:
    """Load the data, open the ledger and calibrate σ for `plan`; answer with `prepared()`."""

    plan: FederationPlan


@dataclass(frozen=True)
class AskOperator:
    """Wait for the operator's `answer()` on the plan just shown in `PlanReceived`."""

    plan: FederationPlan


@dataclass(frozen=True)
class Featurize:
    """Compute what the rounds of `plan` need from this site's images (progress through `preparing()`);
    answer with `featurized()` or `featurize_failed()`."""

    plan: FederationPlan


@dataclass(frozen=True)
class Train:
    """Evaluate `weights` on the local validation split, then train one round from them."""

    round: int
    weights: np.ndarray


@dataclass(frozen=True)
class Finish:
    """The federation is done: save `weights` as the final model (with the federation's calibration
    `temperature`, when the aggregator sent one)."""

    round: int
    weights: np.ndarray
    temperature: float | None = None
    cell_threshold: float | None = None  # the federation's cell-check threshold, when the aggregator sent one
    class_mix: tuple[int, ...] | None = None  # the federation's validation images per class, when it sent them


@dataclass(frozen=True)
class Stop:
    """End the run (after a fatal error; the `SiteFailed` event came just before)."""

    outcome: str = "failed"


Action = Send | Emit | Prepare | AskOperator | Featurize | Train | Finish | Stop


@dataclass
class TrainOutcome:
    """This site's part of a round, ready to leave (with DP its spend is already in the ledger): for a secure
    plan `ring`, the input to secure aggregation (quantized, noise share included), the only thing sent; for a
    plain plan `update` (Δ) and `weight` (its sample count); with the local validation confusion matrix of the
    model the round started from, and ε spent now (None without DP). `core.learning.site_trainer` makes it."""

    round: int
    confusion: np.ndarray
    weight: int
    ring: np.ndarray | None = None
    update: np.ndarray | None = None
    epsilon_spent: float | None = None
    loss: float = float("nan")
    steps: int = 0
    entry: Any = None  # the ledger entry written for this round


class Phase(enum.Enum):
    WAIT_PLAN = "wait_plan"  # connected; this session has no plan yet
    PREPARING = "preparing"  # `Prepare` is out
    DECIDING = "deciding"  # `AskOperator` is out
    FEATURIZING = "featurizing"  # accepted; `Featurize` is out (the aggregator hears `preparing`)
    READY = "ready"  # plan accepted; between rounds
    TRAINING = "training"  # `Train` is out
    SECAGG = "secagg"  # secure aggregation of the active round is running
    SUBMITTED = "submitted"  # this site's part of the round is sent; waiting for round_end
    DONE = "done"
    STOPPED = "stopped"


IN_ROUND = (Phase.TRAINING, Phase.SECAGG, Phase.SUBMITTED)

PLAN_WHAT_TO_DO = ("the plan is outside what this site accepts: check the reasons with the federation's admin; "
                   "if the plan is right, widen [bounds] (or the ε budget) in site.toml, then start the site again")
BUDGET_WHAT_TO_DO = ("this site cannot train more rounds in this federation without passing its ε budget; "
                     "the spend so far stays recorded (`hemafed ledger`); tell the federation's admin")


class SiteRound:
    """One site's view of one federation, across reconnects (see the module docstring)."""

    def __init__(self, bounds: SiteBounds, *, identity: Any, federation: str | None = None,
                 auto_accept: bool = True, roster: Container[bytes] | None = None,
                 plan_problems: Callable[[FederationPlan], list[str]] = lambda plan: [],
                 accepted: Mapping[str, FederationPlan] | None = None) -> None:
        self.bounds = bounds
        self.roster = roster  # pinned peer keys: a round naming any other key is refused (core/trust/roster.py)
        self.federation = federation
        self.auto_accept = auto_accept
        self._identity = identity  # Ed25519 private key: signs this site's secure-aggregation keys
        self._plan_problems = plan_problems  # what this site cannot run (e.g. a model it does not know)
        self.phase = Phase.WAIT_PLAN
        self.plan: FederationPlan | None = None
        self.site_id = 0
        self.n_params = 0
        # the last plan accepted in each federation, this run or an earlier one (the site's store keeps them): the
        # same plan again is not reviewed twice; a changed one is shown with what changed
        self.accepted: dict[str, FederationPlan] = dict(accepted or {})
        self.round = 0  # the active (or last) round of this session
        self.last_started = 0  # rounds only move forward within a session
        self.finished_rounds: set[int] = set()
        self.rounds_trained = 0
        self.epsilon_spent: float | None = None
        self.secagg: secagg.SiteSecAgg | None = None
        self._offered: tuple[FederationPlan, int] | None = None  # plan and site id being prepared

    # -- session --------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.phase not in (Phase.DONE, Phase.STOPPED)

    def connected(self) -> list[Action]:
        """A new session: the aggregator will send its plan again; round state is gone."""
        if self.running:
            self.phase = Phase.WAIT_PLAN
            self.secagg = None
            self.last_started = 0
        return []

    def connection_lost(self, why: str) -> list[Action]:
        out = self._leave_round(f"connection lost ({safe_text(why)})")
        if self.running:
            self.phase = Phase.WAIT_PLAN
        return out

    def stop(self) -> list[Action]:
        """The operator leaves: a round in progress ends as "left" for this site."""
        if self.phase is Phase.TRAINING:
            detail = "left during training: the round's spend is recorded only if its training had finished"
        else:
            detail = "left after training: the round's spend stays recorded in the ledger"
        out = self._leave_round(detail)
        self.phase = Phase.STOPPED
        return out

    # -- messages ------------------------------------------------------------------------

    def receive(self, msg: Message) -> list[Action]:
        """Handle one message; raises `MessageRefused` (state unchanged) for a bad one."""
        handler = {PLAN: self._on_plan, ROUND_START: self._on_round_start, SECAGG: self._on_secagg,
                   ROUND_END: self._on_round_end, DONE: self._on_done, STATUS: self._on_status,
                   FINISHED: self._on_finished}.get(msg.type)
        if handler is None:
            raise MessageRefused(f"unexpected message type {safe_text(msg.type, 40)}")
        if not self.running:
            raise MessageRefused(f"{msg.type} after the run ended")
        rnd = msg.round
        if not isinstance(rnd, int) or isinstance(rnd, bool) or not 0 <= rnd <= MAX_INT:
            raise MessageRefused("round is not a small non-negative integer")
        if not isinstance(msg.body, Mapping):
            raise MessageRefused(f"{msg.type} body is not a mapping")
        return handler(msg)

    def _on_plan(self, msg: Message) -> list[Action]:
        if self.phase is not Phase.WAIT_PLAN:
            raise MessageRefused(f"a plan while {self.phase.value}")
        body = msg.body
        raw, digest, site_id = body.get("plan"), body.get("digest"), body.get("site_id")
        try:
            if not isinstance(raw, Mapping):
                raise PlanError("the plan is not a mapping")
            plan = FederationPlan.from_dict(dict(raw))
        except (PlanError, TypeError, ValueError, OverflowError) as exc:
            return self._refuse_plan(None, [f"the aggregator's plan is malformed: {safe_text(str(exc))}"])
        reasons = plan_sanity(plan)
        if digest != plan.digest():
            reasons.append("the plan's digest does not match its contents")
        if self.federation and plan.federation_id != self.federation:
            reasons.append(f"federation {plan.federation_id!r} is not the configured {self.federation!r}")
        if not _small_int(site_id) or not 1 <= site_id <= plan.max_sites:
            reasons.append("the aggregator gave this site no valid site id")
        if not reasons:
            reasons = self.bounds.violations(plan) + self._plan_problems(plan)
        if reasons:
            return self._refuse_plan(plan, reasons, outside=True)
        self._offered = (plan, int(site_id))
        self.phase = Phase.PREPARING
        return [Prepare(plan)]

    def prepared(self, privacy: PrivacySettings | None, *, n_params: int, epsilon_spent: float | None = None,
                 epsilon_per_round: tuple[float, ...] = (), problems: list[str] | None = None,
                 what_to_do: str | None = None) -> list[Action]:
        """The driver prepared the plan from `Prepare` (problems: why it cannot be run here)."""
        if self.phase is not Phase.PREPARING or self._offered is None:
            raise RuntimeError(f"prepared() while {self.phase.value}")
        plan, site_id = self._offered
        if problems:
            return self._refuse_plan(plan, list(problems), privacy, epsilon_per_round, what_to_do)
        self.plan, self.site_id, self.n_params = plan, site_id, int(n_params)
        self.epsilon_spent = epsilon_spent
        before = self.accepted.get(plan.federation_id)
        ask = not self.auto_accept and (before is None or before.digest() != plan.digest())
        changes = plan_changes(before, plan) if before is not None else ()
        out: list[Action] = [Emit(PlanReceived(plan, privacy, (), tuple(epsilon_per_round), awaiting_answer=ask,
                                               changes=changes))]
        if ask:
            self.phase = Phase.DECIDING
            # the aggregator holds the first round for a site whose operator is reading the plan, as for one
            # that is preparing (0 of 0 images: not started yet)
            return [*out, Send(PREPARING, 0, {"done": 0, "total": 0}), AskOperator(plan)]
        return out + self._accept(plan)

    def answer(self, accept: bool, reason: str = "") -> list[Action]:
        """The operator's decision on the plan shown in `PlanReceived`."""
        if self.phase is not Phase.DECIDING or self.plan is None:
            raise RuntimeError(f"answer() while {self.phase.value}")
        if accept:
            return self._accept(self.plan)
        reasons = [safe_text(reason) if reason else "the operator declined the plan"]
        self.phase = Phase.STOPPED
        return [Send(PLAN_REJECT, 0, {"reasons": reasons}), Emit(PlanAnswered(False, tuple(reasons))),
                Stop("stopped")]

    def _accept(self, plan: FederationPlan) -> list[Action]:
        self.accepted[plan.federation_id] = plan
        self.phase = Phase.FEATURIZING
        return [Emit(PlanAnswered(True)), Emit(StageChanged(self.round, "preparing")), Featurize(plan)]

    def preparing(self, done: int, total: int, seconds_left: float | None) -> list[Action]:
        """Progress of the `Featurize` action: for the operator, and for the aggregator (which holds the first
        round for a site that is still preparing). Nothing while not featurizing (e.g. disconnected)."""
        if self.phase is not Phase.FEATURIZING:
            return []
        body: dict[str, Any] = {"done": int(done), "total": int(total)}
        if seconds_left is not None and math.isfinite(seconds_left):
            body["eta_s"] = round(max(0.0, float(seconds_left)), 1)
        return [Send(PREPARING, 0, body), Emit(PrepareProgress(int(done), int(total), body.get("eta_s")))]

    def featurized(self) -> list[Action]:
        """The `Featurize` action finished: tell the aggregator this site is ready for rounds."""
        if self.phase is not Phase.FEATURIZING or self.plan is None:
            return []  # the connection was lost meanwhile: the plan comes again, and this answer with it
        self.phase = Phase.READY
        return [Send(PLAN_ACCEPT, 0, {"digest": self.plan.digest()}), Emit(StageChanged(self.round, "waiting"))]

    def featurize_failed(self, message: str) -> list[Action]:
        """Preparing the images failed (unreadable data, a resource failure): refuse the plan with the reason."""
        if self.phase is not Phase.FEATURIZING or self.plan is None:
            return []
        reasons = [f"cannot prepare this site's images: {safe_text(message)}"]
        self.phase = Phase.STOPPED
        return [Send(PLAN_REJECT, 0, {"reasons": reasons}), Emit(PlanAnswered(False, tuple(reasons))),
                Emit(SiteFailed(reasons[0], True, "check the data folder and the site's log, then join again",
                                code="data")),
                Stop()]

    def _refuse_plan(self, plan: FederationPlan | None, reasons: list[str], privacy: PrivacySettings | None = None,
                     epsilon_per_round: tuple[float, ...] = (), what_to_do: str | None = None,
                     outside: bool = False) -> list[Action]:
        self.phase = Phase.STOPPED
        out: list[Action] = []
        if plan is not None:
            out.append(Emit(PlanReceived(plan, privacy, tuple(reasons), tuple(epsilon_per_round))))
        return [*out, Send(PLAN_REJECT, 0, {"reasons": reasons}), Emit(PlanAnswered(False, tuple(reasons))),
                Emit(SiteFailed(("refused the federation's plan, which is outside what this site accepts: " if outside
                                 else "refused the federation's plan: ") + "; ".join(reasons), True,
                                what_to_do or PLAN_WHAT_TO_DO, code=_refusal_code(reasons))), Stop()]

    # -- a round --------------------------------------------------------------------------

    def _on_round_start(self, msg: Message) -> list[Action]:
        plan = self.plan
        if self.phase not in (Phase.READY, Phase.SECAGG, Phase.SUBMITTED) or plan is None:
            raise MessageRefused(f"round_start while {self.phase.value}")
        rnd = msg.round
        if not 1 <= rnd <= plan.rounds or rnd <= self.last_started:
            raise MessageRefused(f"round_start for round {rnd} (last started {self.last_started}, "
                                 f"plan has {plan.rounds})")
        weights = self._vector(msg, "round_start")
        participants = msg.body.get("participants")
        if not isinstance(participants, Mapping) or not 1 <= len(participants) <= plan.max_sites:
            raise MessageRefused("round_start participants are not a mapping of at most max_sites entries")
        machine = None
        peers: dict[int, Any] = {}
        if plan.secagg:
            for key, line in participants.items():
                if not isinstance(key, str) or not key.isdigit() or len(key) > 6 or not isinstance(line, str):
                    raise MessageRefused("round_start participants must map site ids to key lines")
                try:
                    peers[int(key)] = parse_public_line(line[:400])
                except (IdentityError, ValueError) as exc:
                    raise MessageRefused(f"round_start participant {key}: {safe_text(str(exc))}") from None
            try:
                machine = secagg.SiteSecAgg(plan.secagg_config(self.n_params), rnd, self.site_id,
                                            self._identity, peers, roster=self.roster)
            except secagg.SecAggError as exc:
                raise MessageRefused(f"round {rnd} cannot be aggregated securely here: {exc}") from None
        out: list[Action] = []
        if self.phase is not Phase.READY and self.round not in self.finished_rounds:
            self.finished_rounds.add(self.round)
            out.append(Emit(RoundFinished(self.round, "abandoned", None, self.epsilon_spent,
                                          "the aggregator started the next round without ending this one")))
        self.round = self.last_started = rnd
        self.finished_rounds.discard(rnd)  # a round re-run after the aggregator restarted is a new attempt
        self.secagg = machine
        self.phase = Phase.TRAINING
        fingerprints = tuple(sorted(fingerprint(key) for key in peers.values()))
        return [*out, Emit(RoundStarted(rnd, plan.rounds, len(participants), fingerprints)),
                Emit(StageChanged(rnd, "training")), Train(rnd, weights)]

    def trained(self, rnd: int, result: TrainOutcome) -> list[Action]:
        """Training finished and (with DP) the spend is in the ledger: send this site's part."""
        self._expect_training(rnd)
        self.rounds_trained += 1
        self.epsilon_spent = result.epsilon_spent
        plan = self.plan
        assert plan is not None
        if not plan.secagg:
            self.phase = Phase.SUBMITTED
            extras = np.ascontiguousarray(result.confusion.reshape(-1), dtype=np.int64)
            weighted = (np.asarray(result.update, np.float64) * result.weight).astype("<f4")
            return [Send(PLAIN_UPDATE, rnd, {"weight": int(result.weight)},
                         (weighted.tobytes(), extras.astype("<i8").tobytes())), Emit(StageChanged(rnd, "waiting"))]
        assert self.secagg is not None
        try:
            msgs = self.secagg.start_ring(result.ring)
        except secagg.SecAggError as exc:
            return self._leave_round(f"this site's update cannot enter secure aggregation ({exc}); "
                                     "the round's spend stays recorded", failed=True)
        self.phase = Phase.SECAGG
        return [Emit(StageChanged(rnd, "keys")), *(Send(SECAGG, rnd, {}, (secagg.encode(m),)) for m in msgs)]

    def budget_exhausted(self, rnd: int, message: str) -> list[Action]:
        """The ledger refused the round before training: decline it, then stop (fatal)."""
        self._expect_training(rnd)
        self.finished_rounds.add(rnd)
        self.secagg = None
        self.phase = Phase.STOPPED
        return [Send(DECLINE, rnd, {"reason": "budget_exhausted"}),
                Emit(RoundFinished(rnd, "declined", None, self.epsilon_spent, message)),
                Emit(SiteFailed(message, True, BUDGET_WHAT_TO_DO, code="budget")), Stop()]

    def train_cancelled(self, rnd: int, *, recorded: bool, epsilon_spent: float | None) -> list[Action]:
        """Training stopped (the operator left). `recorded`: the spend reached the ledger first."""
        self._expect_training(rnd)
        if recorded:
            self.rounds_trained += 1
        self.epsilon_spent = epsilon_spent
        detail = ("stopped after training: the update was not sent, but the round's spend stays recorded in the "
                  "ledger" if recorded else "stopped during training: nothing was sent and nothing recorded")
        return self._leave_round(detail)

    def train_failed(self, rnd: int, message: str) -> list[Action]:
        """Training raised something unexpected: leave the round and stop (nothing was sent)."""
        self._expect_training(rnd)
        out = self._leave_round(f"training failed: {message}")
        self.phase = Phase.STOPPED
        return [*out, Emit(SiteFailed(f"training failed in round {rnd}: {message}", True, code="training",
                                      what_to_do="check the data folder and the site's log, then start the site "
                                                 "again")),
                Stop()]

    def _expect_training(self, rnd: int) -> None:
        if self.phase is not Phase.TRAINING or rnd != self.round:
            raise RuntimeError(f"a training result for round {rnd} while {self.phase.value} in round {self.round}")

    def _on_secagg(self, msg: Message) -> list[Action]:
        machine = self.secagg
        if self.phase is not Phase.SECAGG or machine is None or msg.round != self.round:
            raise MessageRefused(f"secure-aggregation message for round {msg.round} while {self.phase.value} "
                                 f"in round {self.round}")
        if len(msg.blobs) != 1:
            raise MessageRefused("a secure-aggregation message carries exactly one blob")
        try:
            decoded = secagg.decode(msg.blobs[0], max_vector_len=machine.cfg.vector_len)
        except (secagg.SecAggError, ValueError, TypeError, OverflowError, RecursionError) as exc:
            raise MessageRefused(f"undecodable secure-aggregation message: {safe_text(str(exc))}") from None
        stage = {secagg.KeyList: "shares", secagg.ShareDelivery: "masked",
                 secagg.UnmaskRequest: "unmask"}.get(type(decoded))
        out: list[Action] = [Emit(StageChanged(self.round, stage))] if stage else []
        try:
            replies = machine.receive(decoded)
        except (secagg.SecAggError, ValueError, TypeError, OverflowError) as exc:
            # Refusing is always safe: the site reveals nothing more this round.
            log.error("round %d: refusing a secure-aggregation message: %s", self.round, safe_text(str(exc)))
            return out + self._leave_round(f"refused a secure-aggregation message ({safe_text(str(exc))}); "
                                           "this site revealed nothing more this round")
        out += [Send(SECAGG, self.round, {}, (secagg.encode(m),)) for m in replies]
        if machine.finished:
            self.secagg = None
            self.phase = Phase.SUBMITTED
            out.append(Emit(StageChanged(self.round, "waiting")))
        return out

    def _on_round_end(self, msg: Message) -> list[Action]:
        rnd = msg.round
        if rnd in self.finished_rounds and rnd <= self.round:
            return []  # this site already closed the round (declined, left): nothing new
        if self.phase not in (Phase.SECAGG, Phase.SUBMITTED) or rnd != self.round:
            raise MessageRefused(f"round_end for round {rnd} while {self.phase.value} in round {self.round}")
        status, accuracy = msg.body.get("status"), msg.body.get("fed_val_accuracy")
        if status not in ROUND_END_STATUSES:
            raise MessageRefused(f"round_end status {safe_text(status, 40)} is not one of {ROUND_END_STATUSES}")
        if accuracy is not None and not (_number(accuracy) and 0.0 <= accuracy <= 1.0):
            raise MessageRefused("round_end accuracy is not a number in [0, 1]")
        self.finished_rounds.add(rnd)
        self.secagg = None
        self.phase = Phase.READY
        return [Emit(RoundFinished(rnd, status, None if accuracy is None else float(accuracy), self.epsilon_spent))]

    def _on_done(self, msg: Message) -> list[Action]:
        plan = self.plan
        if self.phase not in (Phase.READY, Phase.SECAGG, Phase.SUBMITTED) or plan is None:
            raise MessageRefused(f"done while {self.phase.value}")
        if msg.round != plan.rounds:
            raise MessageRefused(f"done for round {msg.round}, the plan has {plan.rounds}")
        weights = self._vector(msg, "done")
        temperature = msg.body.get("temperature")
        if temperature is not None and not (_number(temperature) and 0.05 <= temperature <= 20.0):
            raise MessageRefused("done: the calibration temperature is not a number in [0.05, 20]")
        cell = msg.body.get("not_a_cell_threshold")
        if cell is not None and not (_number(cell) and 1.0 <= cell <= 1e7):
            raise MessageRefused("done: the cell-check threshold is not a number in [1, 10^7]")
        mix = msg.body.get("validation_classes")
        if mix is not None and not (isinstance(mix, list) and len(mix) == len(plan.classes)
                                    and all(_small_int(v) and v >= 0 for v in mix) and sum(mix) > 0):
            raise MessageRefused("done: the federation's validation class counts are not one count per class")
        out = self._leave_round("the federation finished before this round ended")
        self.phase = Phase.DONE
        return [*out, Finish(msg.round, weights, None if temperature is None else float(temperature),
                             None if cell is None else float(cell), None if mix is None else tuple(mix))]

    def _on_status(self, msg: Message) -> list[Action]:
        """A round started without this site (it is still preparing, or not ready): say so."""
        if self.phase not in (Phase.WAIT_PLAN, Phase.PREPARING, Phase.DECIDING, Phase.FEATURIZING, Phase.READY):
            raise MessageRefused(f"status while {self.phase.value}")
        rounds, participants, reason = (msg.body.get(k) for k in ("rounds", "participants", "reason"))
        if not (_small_int(rounds) and rounds >= 1 and _small_int(participants) and participants >= 0
                and reason in ("preparing", "not_ready") and 1 <= msg.round <= rounds):
            raise MessageRefused("a malformed status message")
        return [Emit(RoundWithoutThisSite(msg.round, rounds, participants, reason))]

    def _on_finished(self, msg: Message) -> list[Action]:
        """The federation was over when this site connected: stop trying (nothing more can happen in it)."""
        rounds, completed = msg.body.get("rounds"), msg.body.get("completed")
        if not (_small_int(rounds) and rounds >= 1 and _small_int(completed) and 0 <= completed <= rounds):
            raise MessageRefused("a malformed finished message")
        out = self._leave_round("the federation finished before this round ended here")
        took_part = f"this site took part in {self.rounds_trained} of them in this session" if self.rounds_trained \
            else "without this site"
        self.phase = Phase.STOPPED
        return [*out, Emit(SiteFailed(
            f"The federation has finished: {completed} of its {rounds} rounds completed, {took_part}.", True,
            "nothing more can happen in this federation; ask its admin for the final model, or for the address of a "
            "new federation", code="finished")), Stop()]

    # -- helpers ----------------------------------------------------------------------------

    def _leave_round(self, detail: str, failed: bool = False) -> list[Action]:
        """End the active round for this site (it will not take part any further)."""
        if self.phase not in IN_ROUND or self.round in self.finished_rounds:
            return []
        self.finished_rounds.add(self.round)
        self.secagg = None
        self.phase = Phase.READY
        out: list[Action] = [Emit(RoundFinished(self.round, "left", None, self.epsilon_spent, detail))]
        if failed:
            out.append(Emit(SiteFailed(detail, False)))
        return out

    def _vector(self, msg: Message, what: str) -> np.ndarray:
        if len(msg.blobs) != 1 or len(msg.blobs[0]) != 4 * self.n_params:
            raise MessageRefused(f"{what} must carry {self.n_params} float32 weights")
        vec = np.frombuffer(msg.blobs[0], dtype="<f4").astype(np.float32)
        if not np.isfinite(vec).all():
            raise MessageRefused(f"{what} weights hold NaN or infinite values")
        return vec


def _refusal_code(reasons: list[str]) -> str:
    text = " ".join(reasons)
    if "budget" in text or "ledger" in text:
        return "budget"
    if "training images" in text or "no usable" in text or "cannot load" in text:
        return "data"
    return "plan_refused"


def plan_changes(before: FederationPlan, after: FederationPlan) -> tuple[tuple[str, str, str], ...]:
    """(field, before, after) for every field in which a plan differs from the one accepted before."""
    old, new = before.to_dict(), after.to_dict()
    return tuple((name, safe_text(str(old.get(name)), 80), safe_text(str(value), 80))
                 for name, value in new.items() if old.get(name) != value)


def plan_sanity(plan: FederationPlan) -> list[str]:
    """Range checks a site applies to any plan before using a number from it (a hostile
    aggregator can send a well-typed plan with absurd values)."""
    out = []
    for f in fields(plan):
        value = getattr(plan, f.name)
        if isinstance(value, int) and not isinstance(value, bool) and not -MAX_INT <= value <= MAX_INT:
            out.append(f"plan field {f.name} is out of range")
        elif isinstance(value, float) and not math.isfinite(value):
            out.append(f"plan field {f.name} is not finite")
    if len(plan.classes) > MAX_CLASSES or any(len(c) > 64 for c in plan.classes):
        out.append("the plan's class list is too long")
    if len(plan.model) > 64:
        out.append("the plan's model name is too long")
    return out


def _small_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -MAX_INT <= value <= MAX_INT


def _number(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if isinstance(value, int):
        return -MAX_INT <= value <= MAX_INT
    return math.isfinite(value)


__all__ = [
    "DECLINE",
    "DONE",
    "FINISHED",
    "PLAIN_UPDATE",
    "PLAN",
    "PLAN_ACCEPT",
    "PLAN_REJECT",
    "PREPARING",
    "ROUND_END",
    "ROUND_START",
    "SECAGG",
    "STATUS",
    "Action",
    "AskOperator",
    "Emit",
    "Featurize",
    "Finish",
    "MessageRefused",
    "Phase",
    "PlanRefused",
    "Prepare",
    "PrivacySettings",
    "Send",
    "SiteRound",
    "Stop",
    "Train",
    "TrainOutcome",
    "plan_sanity",
]
