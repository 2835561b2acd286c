"""The aggregator's federation logic as a sans-I/O state machine: plan, joins, rounds, round end.

Like `core.secagg`, it never touches a socket, a clock or a file. The driver
(`hemafed.network.aggregator`) feeds it what happened, with the current monotonic
time, and carries out the actions it returns::

    machine.start(now)                      -> actions
    machine.connected(site, now)            -> actions   (a site authenticated)
    machine.disconnected(site, now)         -> actions   (its connection closed, or a send failed)
    machine.receive(Inbound(...), now)      -> actions   (a message that passed the edge's schema)
    machine.tick(now)                       -> actions   (call at `next_deadline` at the latest)
    machine.recorded(round, now)            -> actions   (after the driver wrote a RoundFinished)

Actions: `Send`, `Broadcast`, `Reject` (close that site: a dropout), `Status`,
`RoundFinished` (the driver must write the checkpoint and round log, then call
`recorded`; no new round starts before that), `Done`.

A peer's fault never raises: it becomes a `Reject` for that peer. Messages reach
the machine only after the transport checked them against `network/schema.py`, so
the types and bounds of their fields can be relied on here.

The life of a run::

    WAITING --(enough sites ready)--> ROUND --(outcome)--> RECORDING --(recorded)--> WAITING ... DONE
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .. import secagg
from ..trust.identity import parse_public_line
from .calibration_sums import CALIBRATION_GRID, CELL_FALSE_ALARMS, cell_threshold_from_tails, temperature_from_sums
from .plan import FederationPlan
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

log = logging.getLogger(__name__)



def weights_blob(weights: np.ndarray) -> bytes:
    return np.ascontiguousarray(weights, dtype="<f4").tobytes()


def blob_to_vector(blob: bytes, length: int, dtype: str = "<f4") -> np.ndarray:
    """A received vector, checked for length and finiteness; raises ValueError otherwise."""
    itemsize = np.dtype(dtype).itemsize
    if len(blob) != length * itemsize:
        raise ValueError(f"vector of {len(blob)} bytes, expected {length} × {itemsize}")
    vec = np.frombuffer(blob, dtype=dtype).astype(dtype[1:] if dtype[0] in "<>" else dtype)
    if vec.dtype.kind == "f" and not np.isfinite(vec).all():
        raise ValueError("vector holds NaN or infinite values")
    return vec


class ServerStep(Protocol):
    """How the aggregator turns a completed round into the next weights (`core.learning.server_opt`): from the
    mean update (FedAvg, FedAdam) or from the unmasked ring sum (DP-FedSGD, `step_ring`)."""

    def step(self, weights: np.ndarray, mean_update: np.ndarray) -> np.ndarray: ...

    def state(self) -> dict[str, np.ndarray]: ...


# ---------------------------------------------------------------- inputs and actions


@dataclass(frozen=True)
class Inbound:
    """One message from an authenticated site, already checked against its schema."""

    site: str
    type: str
    round: int
    body: Mapping[str, Any] = field(default_factory=dict)
    blobs: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class Send:
    site: str
    type: str
    round: int
    body: Mapping[str, Any] = field(default_factory=dict)
    blobs: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class Broadcast:
    sites: tuple[str, ...]
    type: str
    round: int
    body: Mapping[str, Any] = field(default_factory=dict)
    blobs: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class Reject:
    """Close `site`'s connection with `code` (malformed | unexpected | internal); `detail` is for the log."""

    site: str
    code: str
    detail: str
    round: int = 0


@dataclass(frozen=True)
class Status:
    round: int
    stage: str


@dataclass
class RoundOutcome:
    round: int
    status: str  # "completed" | "abandoned"
    participants: list[str] = field(default_factory=list)
    survivors: list[str] = field(default_factory=list)
    dropouts: list[str] = field(default_factory=list)
    declined: list[str] = field(default_factory=list)
    reason: str = ""
    fed_val_accuracy: float | None = None
    confusion: list[list[int]] | None = None
    mean_update: np.ndarray | None = None
    ring_sum: np.ndarray | None = None  # DP-FedSGD: the unmasked ring sum the server step decodes
    wall_s: float = 0.0
    # the surviving sites' validation NLL summed at each temperature of CALIBRATION_GRID (secure rounds only)
    calibration_nll: list[int] | None = None
    # how many of their validation images score above each of CELL_SCORE_EDGES in the cell check (secure rounds)
    cell_tails: list[int] | None = None

    def log_entry(self) -> dict[str, Any]:
        return {"round": self.round, "status": self.status, "participants": self.participants,
                "survivors": self.survivors, "dropouts": self.dropouts, "declined": self.declined,
                "reason": self.reason, "fed_val_accuracy": self.fed_val_accuracy, "confusion": self.confusion,
                "calibration_nll": self.calibration_nll, "cell_tails": self.cell_tails,
                "wall_s": round(self.wall_s, 3), "time": time.time()}


@dataclass(frozen=True)
class RoundFinished:
    """Write this round's checkpoint (`weights`, `optimizer_state`) and log line, then call `recorded`."""

    outcome: RoundOutcome
    weights: np.ndarray = field(repr=False)
    optimizer_state: dict[str, np.ndarray] = field(repr=False)


@dataclass(frozen=True)
class Done:
    weights: np.ndarray = field(repr=False)
    temperature: float | None = None  # the federation's calibration (`federation_temperature`), if it has one
    cell_threshold: float | None = None  # the cell check's threshold (`federation_cell_threshold`), if it has one


Action = Send | Broadcast | Reject | Status | RoundFinished | Done


class Stage(enum.Enum):
    WAITING = "waiting for sites"
    ROUND = "round"
    RECORDING = "recording"
    DONE = "done"


_SECAGG_STAGES = {secagg.AggStage.COLLECT_KEYS: "training", secagg.AggStage.COLLECT_SHARES: "sharing keys",
                  secagg.AggStage.COLLECT_MASKED: "masked input",
                  secagg.AggStage.COLLECT_SIGNATURES: "consistency check", secagg.AggStage.COLLECT_UNMASK: "unmasking"}


# ---------------------------------------------------------------- the machine


class FederationMachine:
    """One aggregator run of `plan` from round `first_round`, over the allowed `sites` (name -> key line)."""

    def __init__(self, plan: FederationPlan, sites: Mapping[str, str], weights: np.ndarray,
                 optimizer: ServerStep, first_round: int = 1, *,
                 escape: Callable[[str], str] = ascii) -> None:
        self.plan = plan
        self.site_lines = dict(sites)
        self.site_ids = {name: i + 1 for i, name in enumerate(sites)}
        self.site_names = {i: name for name, i in self.site_ids.items()}
        self.keys = {name: parse_public_line(line) for name, line in sites.items()}
        self.weights = np.asarray(weights, dtype=np.float32)
        self.dim = len(self.weights)
        self.optimizer = optimizer
        self.first_round = first_round
        self.escape = escape  # for peer text kept or logged (reasons): one printable line
        self.stage = Stage.WAITING
        self.round = first_round  # the round being waited for, run or recorded
        self.connected_sites: set[str] = set()
        self.accepted: set[str] = set()
        self.rejected: dict[str, list[str]] = {}
        # connected sites that accepted the plan and are computing their images' features: (done, total, eta_s)
        self.preparing: dict[str, tuple[int, int, float | None]] = {}
        self.wait_started = self.join_deadline = self.hold_until = 0.0
        self._status_sent = 0.0
        self._missing_logged: tuple[str, ...] = ()
        self.outcomes: list[RoundOutcome] = []
        self.deadline = 0.0
        self._round: _Round | None = None
        self._last_started = first_round - 1

    # -- queries --------------------------------------------------------------------

    @property
    def ready(self) -> set[str]:
        return self.accepted & self.connected_sites

    @property
    def finished(self) -> bool:
        return self.stage is Stage.DONE

    @property
    def next_deadline(self) -> float | None:
        """When `tick` must be called at the latest (None: nothing is timed now)."""
        return self.deadline if self.stage in (Stage.WAITING, Stage.ROUND) else None

    @property
    def round_in_progress(self) -> int:
        """The round whose messages sites may send now (0 before the first one starts)."""
        return self._last_started

    # -- inputs ---------------------------------------------------------------------

    def start(self, now: float) -> list[Action]:
        if self.first_round > self.plan.rounds:
            return self._done()
        return self._wait(now)

    def connected(self, site: str, now: float) -> list[Action]:
        self._known(site)
        if self.stage is Stage.DONE:  # too late: say so, so the site stops trying
            completed = sum(1 for o in self.outcomes if o.status == "completed")
            return [Send(site, FINISHED, self.plan.rounds, {"rounds": self.plan.rounds, "completed": completed}),
                    Reject(site, "finished", "connected after the federation finished")]
        self.connected_sites.add(site)
        self.accepted.discard(site)
        self.preparing.pop(site, None)
        out: list[Action] = [Send(site, PLAN, 0, {"plan": self.plan.to_dict(), "digest": self.plan.digest(),
                                                  "site_id": self.site_ids[site]})]
        return out + self._progress(now)

    def disconnected(self, site: str, now: float) -> list[Action]:
        self._known(site)
        self.connected_sites.discard(site)
        self.accepted.discard(site)
        self.preparing.pop(site, None)
        out: list[Action] = []
        if self._round is not None:
            out += self._round.dropped(site)
        return out + self._progress(now)

    def receive(self, msg: Inbound, now: float) -> list[Action]:
        self._known(msg.site)
        if msg.site not in self.connected_sites:
            return []  # from a connection already closed (it raced its Disconnected)
        out: list[Action] = []
        if self._round is not None and self._round.takes(msg):
            try:
                out += self._round.receive(msg)
            except Exception as exc:  # a bug on one message: drop that site, keep the round
                log.error("round %d: handling %s from %s failed", self._round.number, msg.type, msg.site,
                          exc_info=exc)
                out.append(Reject(msg.site, "internal", f"handler failed: {exc!r}", msg.round))
                out += self._round.dropped(msg.site)
        else:
            out += self._idle(msg, now)
        return out + self._progress(now)

    def tick(self, now: float) -> list[Action]:
        if self._round is not None and now >= self.deadline:
            return self._round.timed_out() + self._progress(now)
        return self._progress(now)

    def recorded(self, rnd: int, now: float) -> list[Action]:
        """The driver wrote round `rnd`'s checkpoint and log line: tell the sites, go on."""
        if self.stage is not Stage.RECORDING or rnd != self.round:
            raise RuntimeError(f"recorded({rnd}) while {self.stage.value} round {self.round}")
        outcome = self.outcomes[-1]
        out: list[Action] = [Broadcast(tuple(sorted(self.ready)), ROUND_END, rnd, {
            "status": outcome.status, "fed_val_accuracy": outcome.fed_val_accuracy})]
        self.round += 1
        if self.round > self.plan.rounds:
            return out + self._done()
        return out + self._wait(now)

    # -- plan answers, joins, late messages --------------------------------------------

    def _idle(self, msg: Inbound, now: float) -> list[Action]:
        if msg.type == PREPARING:
            if msg.site in self.accepted:
                return []  # a late progress report after it said it was ready
            first = msg.site not in self.preparing
            done, total = int(msg.body["done"]), int(msg.body["total"])
            self.preparing[msg.site] = (min(done, total), total, msg.body.get("eta_s"))
            if first:
                log.info("%s accepted the plan and is preparing its images (%d)", msg.site, total)
            if self.stage is Stage.WAITING and (first or done >= total or now - self._status_sent >= 1.0):
                return [self._waiting_status(now)]
            return []
        if msg.type == PLAN_ACCEPT and msg.body.get("digest") == self.plan.digest():
            self.accepted.add(msg.site)
            self.rejected.pop(msg.site, None)
            was_preparing = self.preparing.pop(msg.site, None) is not None
            log.info("%s %s (%d ready)", msg.site, "is ready after preparing" if was_preparing else "accepted the plan",
                     len(self.ready))
        elif msg.type in (PLAN_ACCEPT, PLAN_REJECT):
            reasons = [self.escape(str(r)) for r in msg.body.get("reasons", [])][:20]
            self.accepted.discard(msg.site)
            self.preparing.pop(msg.site, None)
            self.rejected[msg.site] = reasons
            log.warning("%s refused the plan: %s", msg.site, "; ".join(reasons) or "digest mismatch")
        else:
            log.debug("ignoring late %s from %s (round %d)", msg.type, msg.site, msg.round)
        return []

    def _known(self, site: str) -> None:
        if site not in self.site_ids:
            raise KeyError(f"{site!r} is not an allowed site")  # a driver bug: only allowed sites authenticate

    # -- stage changes ---------------------------------------------------------------

    def _wait(self, now: float) -> list[Action]:
        self.stage = Stage.WAITING
        self.wait_started = now
        self.deadline = self.join_deadline = now + self.plan.join_timeout_s
        self.hold_until = now + max(self.plan.join_timeout_s, self.plan.prepare_timeout_s)
        return [self._waiting_status(now), *self._progress(now)]

    def _waiting_status(self, now: float) -> Status:
        self._status_sent = now
        coming = self._holding_for(now, ignore_deadline=True)
        return Status(self.round, f"waiting for sites ({len(coming)} preparing)" if coming else "waiting for sites")

    def _holding_for(self, now: float, ignore_deadline: bool = False) -> list[str]:
        """Connected sites that accepted the plan and are still preparing. The first round of a run waits for
        them (up to the plan's `prepare_timeout_s` from when it began waiting), so no hospital misses rounds
        only because its images take long to prepare; later rounds go on without them."""
        if self.round != self.first_round or (now >= self.hold_until and not ignore_deadline):
            return []
        return sorted(s for s in self.preparing if s in self.connected_sites and s not in self.accepted)

    def _want(self) -> int:
        """The first round of a run waits (up to the join time-out) for every allowed site that has not
        refused the plan; later rounds go on once min_sites are ready, so a dead site cannot stall them."""
        if self.round == self.first_round:  # (never fewer than the plan's min_sites, whoever refused)
            return max(len(self.site_ids) - len(self.rejected), self.plan.min_sites, 1)
        return self.plan.min_sites

    def _progress(self, now: float) -> list[Action]:
        out: list[Action] = []
        if self.stage is Stage.WAITING:
            ready = len(self.ready)
            if ready >= self._want():
                out += self._start_round(now)
            elif now >= self.join_deadline:
                holding = self._holding_for(now)
                if holding:
                    if self.deadline != self.hold_until:
                        log.info("round %d: %d sites ready; waiting up to %.0f s more for %s, still preparing",
                                 self.round, ready, self.hold_until - now, ", ".join(holding))
                    self.deadline = self.hold_until
                elif ready >= self.plan.min_sites:
                    out += self._start_round(now)
                else:
                    log.warning("round %d: %d of the %d sites needed are ready; still waiting", self.round, ready,
                                self.plan.min_sites)
                    self.deadline = self.join_deadline = now + self.plan.join_timeout_s
        elif self.stage is Stage.ROUND and self._round is not None:
            out += self._round.stage_status(now)
            if self._round.finished:
                out += self._end_round(now)
        return out

    def _start_round(self, now: float) -> list[Action]:
        participants = sorted(self.ready, key=self.site_ids.__getitem__)
        self.stage = Stage.ROUND
        self._last_started = self.round
        outcome = RoundOutcome(self.round, "abandoned", participants=participants)
        need = self.plan.threshold if self.plan.secagg else 1
        self._round = (_SecureRound if self.plan.secagg else _PlainRound)(self, outcome, now)
        if len(participants) < need:
            outcome.reason = f"{len(participants)} sites ready, {need} needed"
            self._round.abandon()
            return self._end_round(now)
        body = {"participants": {str(self.site_ids[s]): self.site_lines[s] for s in participants}}
        self._log_missing(len(participants))
        out: list[Action] = [Broadcast(tuple(participants), ROUND_START, self.round, body,
                                       (weights_blob(self.weights),))]
        left_out = sorted(self.connected_sites - set(participants), key=self.site_ids.__getitem__)
        for site in left_out:  # connected, but not in this round: tell them the federation goes on without them
            why = "preparing" if site in self.preparing else "not_ready"
            out.append(Send(site, STATUS, self.round, {"rounds": self.plan.rounds, "participants": len(participants),
                                                       "reason": why}))
        return out + self._round.begin() + self._progress(now)

    def _log_missing(self, n: int) -> None:
        """Name the allowed sites a round starts without (their images are missing from its update), each time
        that set changes."""
        missing = tuple(s for s in self.site_ids if s not in self.ready)
        if missing == self._missing_logged:
            log.info("round %d: %d sites training", self.round, n)
            return
        self._missing_logged = missing
        why = {s: "preparing" if s in self.preparing else "declined the plan" if s in self.rejected else
               "not connected" for s in missing}
        log.log(logging.WARNING if missing else logging.INFO, "round %d: %d sites training%s", self.round, n,
                "; without " + ", ".join(f"{s} ({w})" for s, w in why.items()) if missing else ", every site in")

    def _end_round(self, now: float) -> list[Action]:
        assert self._round is not None
        outcome = self._round.result(now)
        self._round = None
        self.stage = Stage.RECORDING
        if outcome.status == "completed" and outcome.ring_sum is not None:
            self.weights = self.optimizer.step_ring(self.weights, outcome.ring_sum)  # type: ignore[attr-defined]
        elif outcome.status == "completed" and outcome.mean_update is not None:
            self.weights = self.optimizer.step(self.weights, outcome.mean_update)
        else:
            log.warning("round %d abandoned: %s; the model is unchanged", outcome.round, outcome.reason)
        self.outcomes.append(outcome)
        return [RoundFinished(outcome, self.weights, self.optimizer.state())]

    def _done(self) -> list[Action]:
        self.stage = Stage.DONE
        log = [o.log_entry() for o in self.outcomes]
        temperature, cell = federation_temperature(log), federation_cell_threshold(log)
        body = {} if temperature is None else {"temperature": temperature}
        if cell is not None:
            body["not_a_cell_threshold"] = cell
        mix = federation_class_mix(log)
        if mix is not None:
            body["validation_classes"] = mix
        return [Broadcast(tuple(sorted(self.accepted)), DONE, self.plan.rounds, body, (weights_blob(self.weights),)),
                Status(self.plan.rounds, "done"), Done(self.weights, temperature, cell)]


def federation_temperature(log: list[dict]) -> float | None:
    """The calibration temperature from the last completed round's validation NLL sums (a round's log entries,
    oldest first): the model then differs from the final one by one server step. None without such a round."""
    for entry in reversed(log):
        sums, confusion = entry.get("calibration_nll"), entry.get("confusion")
        if entry.get("status") == "completed" and sums and confusion:
            return temperature_from_sums(np.asarray(sums), int(np.sum(confusion)))
    return None


def federation_class_mix(log: list[dict]) -> list[int] | None:
    """How many validation images of each class the hospitals of the last completed round held: the row sums of
    its summed validation confusion counts, which the aggregator opens anyway (a site's class offsets are fitted
    to this mix, core.learning.class_offsets). None without such a round."""
    for entry in reversed(log):
        confusion = entry.get("confusion")
        if entry.get("status") == "completed" and confusion:
            return [int(v) for v in np.asarray(confusion, np.int64).sum(axis=1)]
    return None


def federation_cell_threshold(log: list[dict], false_alarms: float = CELL_FALSE_ALARMS) -> float | None:
    """The cell check's threshold from the last completed round's validation counts (`cell_tails`): the smallest
    public edge above which at most `false_alarms` of all the round's validation images lie. None without them."""
    for entry in reversed(log):
        tails, confusion = entry.get("cell_tails"), entry.get("confusion")
        if entry.get("status") == "completed" and tails and confusion:
            return cell_threshold_from_tails(np.asarray(tails), int(np.sum(confusion)), false_alarms)
    return None


# ---------------------------------------------------------------- one round


class _Round:
    """What both kinds of round share: participants, declines, dropouts, the outcome."""

    def __init__(self, fed: FederationMachine, outcome: RoundOutcome, now: float) -> None:
        self.fed, self.outcome, self.started = fed, outcome, now
        self.number = outcome.round
        self.participants = set(outcome.participants)
        self.finished = False
        self.sums: tuple[np.ndarray, int, np.ndarray] | None = None
        self.ring_sum: np.ndarray | None = None

    def takes(self, msg: Inbound) -> bool:
        return msg.site in self.participants and msg.round == self.number and msg.type in (DECLINE, SECAGG,
                                                                                           PLAIN_UPDATE)

    def abandon(self) -> None:
        self.finished = True
        self.sums = None

    def begin(self) -> list[Action]:
        return []

    def stage_status(self, now: float) -> list[Action]:
        return []

    def receive(self, msg: Inbound) -> list[Action]:
        raise NotImplementedError

    def dropped(self, site: str) -> list[Action]:
        raise NotImplementedError

    def timed_out(self) -> list[Action]:
        raise NotImplementedError

    def result(self, now: float) -> RoundOutcome:
        outcome = self.outcome
        outcome.wall_s = now - self.started
        if self.sums is None:
            outcome.status = "abandoned"
            return outcome
        weighted_sum, weight_sum, extras = self.sums
        if weight_sum <= 0:
            outcome.status = "abandoned"
            outcome.reason = "the surviving sites reported no samples"
            return outcome
        outcome.status = "completed"
        if self.fed.plan.algorithm == "fedsgd":
            outcome.ring_sum = self.ring_sum  # the server step decodes it (core.server_opt.FedSGDStep)
        else:
            outcome.mean_update = (weighted_sum.astype(np.float64) / weight_sum).astype(np.float32)
        k = len(self.fed.plan.classes)
        extras = np.asarray(extras, dtype=np.int64)
        confusion = extras[:k * k].reshape(k, k)
        if len(extras) > k * k:
            grid = len(CALIBRATION_GRID)
            self.outcome.calibration_nll = extras[k * k:k * k + grid].tolist()
            tails = extras[k * k + grid:]
            self.outcome.cell_tails = tails.tolist() if tails.any() else None
        total = int(confusion.sum())
        outcome.confusion = confusion.tolist()
        outcome.fed_val_accuracy = float(np.trace(confusion)) / total if total else None
        return outcome


class _PlainRound(_Round):
    """Without secure aggregation (a baseline): the aggregator sees each site's update."""

    def __init__(self, fed: FederationMachine, outcome: RoundOutcome, now: float) -> None:
        super().__init__(fed, outcome, now)
        self.k2 = len(fed.plan.classes) ** 2
        self.total = np.zeros(fed.dim, np.float64)
        self.weight = 0
        self.extras = np.zeros(self.k2, np.int64)
        self.waiting = set(self.participants)
        self.got: list[str] = []
        fed.deadline = now + fed.plan.train_timeout_s

    def stage_status(self, now: float) -> list[Action]:
        if not self.waiting and not self.finished:
            self._close()
        return []

    def receive(self, msg: Inbound) -> list[Action]:
        if msg.site not in self.waiting:
            return []  # a second answer for this round: the first one counts
        self.waiting.discard(msg.site)
        if msg.type == DECLINE:
            self.outcome.declined.append(msg.site)
            log.info("round %d: %s declined (%s)", self.number, msg.site,
                     self.fed.escape(str(msg.body.get("reason", "no reason"))))
            return []
        if msg.type != PLAIN_UPDATE:
            return [Reject(msg.site, "unexpected", f"{msg.type} in a plain round", self.number)]
        try:
            update = blob_to_vector(msg.blobs[0], self.fed.dim)
            counts = blob_to_vector(msg.blobs[1], self.k2, "<i8")
            if (counts < 0).any() or counts.sum() > self.fed.plan.max_weight:
                raise ValueError("confusion counts out of range")
        except (ValueError, IndexError) as exc:
            log.warning("round %d: refused the update of %s: %s", self.number, msg.site, exc)
            return [Reject(msg.site, "malformed", str(exc), self.number)]
        # The edge's schema bounds the weight to [0, plan.max_weight]: no overflow, no negative scaling.
        self.total += update
        self.extras += counts
        self.weight += int(msg.body["weight"])
        self.got.append(msg.site)
        return []

    def dropped(self, site: str) -> list[Action]:
        self.waiting.discard(site)
        return []

    def timed_out(self) -> list[Action]:
        if self.waiting:
            log.warning("round %d: no update in time from %s", self.number, sorted(self.waiting))
        self.waiting.clear()
        self._close()
        return []

    def _close(self) -> None:
        ids = self.fed.site_ids
        self.outcome.survivors = sorted(self.got, key=ids.__getitem__)
        self.outcome.dropouts = sorted(self.participants - set(self.got) - set(self.outcome.declined),
                                       key=ids.__getitem__)
        self.finished = True
        if not self.got:
            self.outcome.reason = "no site sent an update"
            self.sums = None
        else:
            self.sums = (self.total.astype(np.float32), self.weight, self.extras)


class _SecureRound(_Round):
    """With secure aggregation: the messages go through `core.secagg.AggregatorSecAgg`."""

    def __init__(self, fed: FederationMachine, outcome: RoundOutcome, now: float) -> None:
        super().__init__(fed, outcome, now)
        self.ids = {fed.site_ids[s]: s for s in outcome.participants}
        self.cfg = fed.plan.secagg_config(fed.dim)
        self.machine: secagg.AggregatorSecAgg | None = None
        self.dropouts: set[str] = set()
        self.stage: secagg.AggStage | None = None
        self.now = now

    def begin(self) -> list[Action]:
        self.machine = secagg.AggregatorSecAgg(self.cfg, self.number, {i: self.fed.keys[s]
                                                                        for i, s in self.ids.items()})
        return []

    def stage_status(self, now: float) -> list[Action]:
        """A new secure-aggregation stage starts its own deadline (and a status line)."""
        m = self.machine
        if m is None:
            return []
        if m.finished:
            self._close()
            return []
        if m.stage == self.stage:
            return []
        self.stage = m.stage
        plan = self.fed.plan
        self.fed.deadline = now + (plan.train_timeout_s if m.stage == secagg.AggStage.COLLECT_KEYS
                                   else plan.stage_timeout_s)
        return [Status(self.number, _SECAGG_STAGES.get(m.stage, m.stage.value))]

    def receive(self, msg: Inbound) -> list[Action]:
        assert self.machine is not None
        sid = self.fed.site_ids[msg.site]
        if msg.type == DECLINE:
            self.outcome.declined.append(msg.site)
            log.info("round %d: %s declined (%s)", self.number, msg.site,
                     self.fed.escape(str(msg.body.get("reason", "no reason"))))
            return self._deliver(self.machine.site_dropped(sid))
        if msg.type != SECAGG:
            return [Reject(msg.site, "unexpected", f"{msg.type} in a secure round", self.number)]
        try:
            decoded = secagg.decode(msg.blobs[0], max_vector_len=self.cfg.vector_len)
            outs = self.machine.receive(sid, decoded)
        except secagg.SecAggError as exc:
            log.warning("round %d: refused a secure-aggregation message from %s: %s", self.number, msg.site,
                        self.fed.escape(str(exc)))
            code = "malformed" if isinstance(exc, secagg.MalformedMessage) else "unexpected"
            self.dropouts.add(msg.site)
            return [Reject(msg.site, code, str(exc), self.number), *self._deliver(self.machine.site_dropped(sid))]
        return self._deliver(outs)

    def dropped(self, site: str) -> list[Action]:
        if self.machine is None or site not in self.participants:
            return []
        self.dropouts.add(site)
        return self._deliver(self.machine.site_dropped(self.fed.site_ids[site]))

    def timed_out(self) -> list[Action]:
        assert self.machine is not None
        late = {self.ids[i] for i in self.machine.awaiting}
        log.warning("round %d: stage %s timed out waiting for %s", self.number,
                    self.machine.stage.value, sorted(late))
        self.dropouts |= late
        return self._deliver(self.machine.deadline_passed())

    def _deliver(self, outgoing: list[secagg.Outgoing]) -> list[Action]:
        return [Send(self.ids[item.to], SECAGG, self.number, {}, (secagg.encode(item.message),))
                for item in outgoing]

    def _close(self) -> None:
        assert self.machine is not None
        self.finished = True
        result = self.machine.outcome
        ids = self.fed.site_ids
        if isinstance(result, secagg.Abandoned):
            self.outcome.reason = f"{result.reason} (stage {result.stage})"
            self.outcome.dropouts = sorted(self.dropouts, key=ids.__getitem__)
            self.sums = None
            return
        assert isinstance(result, secagg.SecAggResult)
        self.outcome.survivors = [self.ids[i] for i in result.survivors]
        self.outcome.dropouts = sorted(self.participants - set(self.outcome.survivors)
                                       - set(self.outcome.declined), key=ids.__getitem__)
        self.sums = (result.weighted_sum, result.weight_sum, result.extras_sum)
        self.ring_sum = result.ring_sum
