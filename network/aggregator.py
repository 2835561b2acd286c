"""The aggregator's driver: sockets, files and clocks around the sans-I/O federation machine.

All plan, join, round, decline and round-end logic lives in `hemafed.core.rounds.agg_round`
(and the secure-aggregation protocol in `hemafed.core.secagg`); this module feeds
that machine the transport's events and carries out its actions: sends and
broadcasts, closing a peer, status.json, and the checkpoint and round log of each
round, which are retried until written before the next round may start.

It never holds an image, one site's update, or one site's sample count: with secure
aggregation on, it only ever sees masked vectors and their sum.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Any

import numpy as np

from hemafed.core.atomic import atomic_write_bytes
from hemafed.core.learning.checkpoints import Checkpoint, CheckpointStore
from hemafed.core.learning.models import build_model, get_flat_params, model_hash
from hemafed.core.learning.server_opt import make_plan_optimizer
from hemafed.core.rounds import agg_round as R
from hemafed.core.rounds.agg_round import RoundOutcome
from hemafed.core.rounds.plan import FederationPlan, PlanError
from hemafed.core.trust.identity import parse_public_line
from hemafed.network import protocol as P
from hemafed.network.config import AggregatorConfig
from hemafed.network.envelope import Envelope, Limits
from hemafed.network.errors import NotConnected, ProtocolError
from hemafed.network.progress import progress_bar
from hemafed.network.schema import SafeLogFilter, safe_text
from hemafed.network.server import AggregatorServer, Connected, Disconnected, Message
from hemafed.network.tls import ServerTLS

log = logging.getLogger(__name__)
log.addFilter(SafeLogFilter())
logging.getLogger(R.__name__).addFilter(SafeLogFilter())  # the machine logs peer-chosen names and reasons

__all__ = ["Aggregator", "RoundOutcome", "initial_weights"]


def initial_weights(plan: FederationPlan) -> np.ndarray:
    return get_flat_params(build_model(plan.model, len(plan.classes), seed=plan.seed))


class Aggregator:
    def __init__(self, config: AggregatorConfig) -> None:
        self.cfg = config
        self.plan = config.plan
        names = list(config.sites)
        if self.plan.secagg and 2 * self.plan.threshold <= len(names):
            raise PlanError(f"threshold t={self.plan.threshold} must exceed half of the {len(names)} allowed "
                            "sites (otherwise an aggregator could unmask a site by splitting the others)")
        if len(names) > self.plan.max_sites:
            raise PlanError(f"{len(names)} sites exceed the plan's max_sites={self.plan.max_sites}")
        for line in config.sites.values():
            parse_public_line(line)  # a bad key line fails here, at start, with its message
        self.site_ids = {name: i + 1 for i, name in enumerate(names)}
        self.store = CheckpointStore(config.state_dir / "checkpoints")
        self.optimizer = make_plan_optimizer(self.plan, len(initial_weights(self.plan)))
        self.machine: R.FederationMachine | None = None
        self._weights: np.ndarray | None = None
        self.dim = 0
        self.validator: P.SiteMessageValidator | None = None
        self.server: AggregatorServer | None = None
        self._finished: R.RoundFinished | None = None
        self._after_record: list[R.Action] = []
        self._status_failing = False
        self.record_failures = 0  # failed attempts to write a round's checkpoint or log line (for tests, status)
        self.listening = asyncio.Event()  # set once the server is bound (its port is then known)

    # -- the machine's state, for callers and tests ------------------------------------

    @property
    def weights(self) -> np.ndarray | None:
        return self.machine.weights if self.machine is not None else self._weights

    @property
    def outcomes(self) -> list[RoundOutcome]:
        return self.machine.outcomes if self.machine is not None else []

    @property
    def accepted(self) -> set[str]:
        return self.machine.accepted if self.machine is not None else set()

    @property
    def rejected(self) -> dict[str, list[str]]:
        return self.machine.rejected if self.machine is not None else {}

    # -- lifecycle ------------------------------------------------------------------

    def _resume(self) -> int:
        ckpt = self.store.latest()
        if ckpt is not None:
            if ckpt.meta.get("plan_digest") != self.plan.digest():
                raise PlanError(f"checkpoints in {self.store.dir} belong to another plan; use a new state_dir")
            self._weights = ckpt.weights
            self.optimizer.load_state(ckpt.optimizer_state)
            self._reconcile_log(ckpt)
            log.info("resuming after round %d from %s", ckpt.round, self.store.dir)
            return ckpt.round + 1
        self._weights = initial_weights(self.plan)
        self.store.save(Checkpoint(0, self._weights, {}, {"plan_digest": self.plan.digest()}))
        return 1

    def _reconcile_log(self, ckpt: Checkpoint) -> None:
        """A crash between a round's checkpoint and its log line leaves the line missing: add it back."""
        if ckpt.round == 0 or any(e.get("round") == ckpt.round for e in self.store.read_log()):
            return
        log.warning("round %d has a checkpoint but no log line (a crash in between); recording it", ckpt.round)
        self.store.append_log({"round": ckpt.round, "status": ckpt.meta.get("status", "completed"),
                               "recovered": True, "time": time.time()})

    def prepare(self) -> R.FederationMachine:
        """Resume from the checkpoints and build the machine and the edge's validator (no sockets yet)."""
        first = self._resume()
        assert self._weights is not None
        self.dim = len(self._weights)
        self.validator = P.plan_validator(self.plan, self.dim, len(self.site_ids))
        self.machine = R.FederationMachine(self.plan, self.cfg.sites, self._weights, self.optimizer, first,
                                           escape=safe_text)
        self.validator.round = self.machine.round_in_progress
        return self.machine

    async def run(self) -> None:
        machine = self.prepare()
        tls = None if self.cfg.insecure else ServerTLS(self.cfg.cert, self.cfg.key)
        self.server = AggregatorServer(
            self.cfg.sites, host=self.cfg.host, port=self.cfg.port, tls=tls, insecure=self.cfg.insecure,
            federation=self.plan.federation_id, limits=Limits.for_model(self.dim, max_sites=len(self.site_ids)),
            ping_interval=30.0, ping_timeout=120.0, **self.cfg.server_options(),
        )
        self.server.validator = self.validator
        await self.server.start()
        self.listening.set()
        if self.cfg.port_file is not None:
            atomic_write_bytes(self.cfg.port_file, str(self.server.port).encode(), mode=0o644)
        try:
            await self._perform(machine.start(time.monotonic()))
            while not machine.finished:
                deadline = machine.next_deadline
                wait = 1.0 if deadline is None else min(max(deadline - time.monotonic(), 0.0), 1.0)
                try:
                    event = await self.server.recv(timeout=wait)
                except TimeoutError:
                    event = None
                await self._perform(self._feed(event))
            await self._linger()
        finally:
            await self.server.close()

    async def _linger(self) -> None:
        """After the last round, keep answering for `linger_s`: a site that connects now hears that the federation
        has finished (and stops trying) instead of finding nobody at the address."""
        assert self.server is not None
        if self.cfg.linger_s > 0:
            log.info("the federation has finished; telling sites that connect in the next %.0f s", self.cfg.linger_s)
        until = time.monotonic() + self.cfg.linger_s
        while (left := until - time.monotonic()) > 0:
            try:
                event = await self.server.recv(timeout=min(left, 1.0))
            except TimeoutError:
                continue
            if isinstance(event, Connected):
                await self._perform(self._feed(event))

    # -- events in, actions out --------------------------------------------------------------

    def _feed(self, event: Any) -> list[R.Action]:
        """One transport event into the machine. A failure drops that site only, never the process."""
        assert self.machine is not None
        now = time.monotonic()
        site = getattr(event, "site", None)
        try:
            if isinstance(event, Connected):
                return self.machine.connected(event.site, now)
            if isinstance(event, Disconnected):
                return self.machine.disconnected(event.site, now)
            if isinstance(event, Message):
                env = event.envelope
                return self.machine.receive(R.Inbound(event.site, env.type, env.round, env.body, env.blobs), now)
            return self.machine.tick(now)
        except Exception as exc:
            log.error("handling %s from %s failed; dropping that site", type(event).__name__, site, exc_info=exc)
            if site is None:
                return []
            return [R.Reject(site, "internal", f"handler failed: {exc!r}")]

    async def _perform(self, actions: list[R.Action]) -> None:
        assert self.server is not None and self.machine is not None
        queue = list(actions)
        while queue:
            action = queue.pop(0)
            now = time.monotonic()
            if isinstance(action, R.Send):
                try:
                    await self.server.send(action.site, Envelope(action.type, action.round, action.body,
                                                                 action.blobs))
                except NotConnected:
                    queue += self.machine.disconnected(action.site, now)
            elif isinstance(action, R.Broadcast):
                reached = await self.server.broadcast(Envelope(action.type, action.round, action.body,
                                                               action.blobs), action.sites)
                for site in sorted(set(action.sites) - reached):
                    queue += self.machine.disconnected(site, now)
            elif isinstance(action, R.Reject):
                await self.server.reject(action.site, ProtocolError(action.detail, code=action.code), action.round)
            elif isinstance(action, R.Status):
                self._status(action.round, action.stage)
            elif isinstance(action, R.RoundFinished):
                self._finished, self._after_record = action, []
                await self._finish_round(action.outcome)
                queue = self._after_record + queue  # the next round starts only after _finish_round returned
            elif isinstance(action, R.Done):
                await self.server.flush(5.0)  # let the final weights go out before closing
            self.validator.round = self.machine.round_in_progress

    # -- after a round ----------------------------------------------------------------------

    async def _finish_round(self, outcome: RoundOutcome) -> None:
        """Record the round (retried until on disk), log it, then let the machine go on (round_end)."""
        assert self.machine is not None and self._finished is not None

        weights, state = self._finished.weights, self._finished.optimizer_state
        ckpt = Checkpoint(outcome.round, weights, state, {
            "plan_digest": self.plan.digest(), "status": outcome.status, "model_hash": model_hash(weights)})
        await self._record(ckpt, outcome)
        acc = "–" if outcome.fed_val_accuracy is None else f"{outcome.fed_val_accuracy:.3f}"
        log.info("round %d %s: %d survivors, dropped %s, declined %s, federated validation accuracy %s "
                 "(%.1f s)", outcome.round, outcome.status, len(outcome.survivors), outcome.dropouts or "none",
                 outcome.declined or "none", acc, outcome.wall_s)
        actions = self.machine.recorded(outcome.round, time.monotonic())
        # round_end goes out now; what follows (the next round, or done) once this method has returned
        split = next((i for i, a in enumerate(actions) if not (isinstance(a, R.Broadcast) and a.type == P.ROUND_END)),
                     len(actions))
        await self._perform(actions[:split])
        self._after_record = actions[split:]

    async def _record(self, ckpt: Checkpoint, outcome: RoundOutcome) -> None:
        """Write the round's checkpoint, then its log line; retry until both are on disk.

        The next round never starts on state that is not recorded: while the disk
        refuses (full, EMFILE, permissions) the aggregator keeps its round state in
        memory, keeps serving its connections (joins, late messages) and retries with
        back-off, saying so in the log and in status.json when it can.
        """
        delay, attempt = 0.5, 0
        while True:
            try:
                self.store.save(ckpt)
                if not any(e.get("round") == outcome.round for e in self.store.read_log()[-1:]):
                    self.store.append_log(outcome.log_entry())
                if attempt:
                    log.warning("round %d recorded after %d failed attempts", outcome.round, attempt)
                return
            except OSError as exc:
                attempt += 1
                self.record_failures += 1
                log.error("cannot record round %d (attempt %d): %s; the next round waits, retrying in %.1f s",
                          outcome.round, attempt, exc, delay)
                self._status(outcome.round, f"cannot write the checkpoint: {exc.strerror or exc}")
            await self._pump(delay)
            delay = min(delay * 2, 30.0)

    async def _pump(self, seconds: float) -> None:
        """Serve idle events (joins, plan answers, late messages) for `seconds`."""
        assert self.server is not None
        until = time.monotonic() + seconds
        while (left := until - time.monotonic()) > 0:
            try:
                event = await self.server.recv(timeout=left)
            except TimeoutError:
                return
            # The machine is RECORDING: it answers joins and plan messages, and starts nothing new.
            await self._perform(self._feed(event))

    def _status(self, rnd: int, stage: str) -> None:
        """Best effort: status.json is for people; failing to write it never stops a round."""
        import json

        machine = self.machine
        data = {"round": rnd, "rounds": self.plan.rounds, "stage": stage, "time": time.time(),
                "ready": sorted(machine.ready) if machine else [],
                "preparing": {site: {"done": d, "total": t, "eta_s": eta}
                              for site, (d, t, eta) in sorted(machine.preparing.items())} if machine else {}}
        try:
            atomic_write_bytes(self.cfg.state_dir / "status.json", json.dumps(data).encode(), mode=0o644)
        except OSError as exc:
            if not self._status_failing:
                log.error("cannot write %s: %s (will keep trying)", self.cfg.state_dir / "status.json", exc)
            self._status_failing = True
        else:
            if self._status_failing:
                log.info("status.json is being written again")
            self._status_failing = False
        if sys.stderr.isatty():
            done = rnd if stage == "done" else rnd - 1
            print(progress_bar(done, self.plan.rounds, f"round {rnd}/{self.plan.rounds}: {stage}, "
                               f"{len(data['ready'])} sites ready"), file=sys.stderr, flush=True)
