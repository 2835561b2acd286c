"""The aggregator's round driver: broadcasts the global model, carries secure-aggregation
messages between the sites and the core state machine, applies the server optimizer,
checkpoints every round, and resumes after a restart.

It never holds an image, one site's update, or one site's sample count: with secure
aggregation on, it only ever sees masked vectors and their sum.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hemafed.core import secagg
from hemafed.core.atomic import atomic_write_bytes
from hemafed.core.checkpoints import Checkpoint, CheckpointStore
from hemafed.core.identity import parse_public_line
from hemafed.core.plan import FederationPlan, PlanError
from hemafed.core.server_opt import make_server_optimizer
from hemafed.network import protocol as P
from hemafed.network.config import AggregatorConfig
from hemafed.network.envelope import Envelope, Limits
from hemafed.network.errors import MalformedMessage, NotConnected, ProtocolError
from hemafed.network.progress import progress_bar
from hemafed.network.schema import SafeLogFilter, safe_text
from hemafed.network.server import AggregatorServer, Connected, Disconnected, Message
from hemafed.network.tls import ServerTLS

log = logging.getLogger(__name__)
log.addFilter(SafeLogFilter())


def initial_weights(plan: FederationPlan) -> np.ndarray:
    from hemafed.core.models import build_model, get_flat_params

    return get_flat_params(build_model(plan.model, len(plan.classes), seed=plan.seed))


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
    wall_s: float = 0.0

    def log_entry(self) -> dict[str, Any]:
        return {"round": self.round, "status": self.status, "participants": self.participants,
                "survivors": self.survivors, "dropouts": self.dropouts, "declined": self.declined,
                "reason": self.reason, "fed_val_accuracy": self.fed_val_accuracy, "confusion": self.confusion,
                "wall_s": round(self.wall_s, 3), "time": time.time()}


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
        self.site_ids = {name: i + 1 for i, name in enumerate(names)}
        self.site_names = {i: name for name, i in self.site_ids.items()}
        self.keys = {name: parse_public_line(line) for name, line in config.sites.items()}
        self.store = CheckpointStore(config.state_dir / "checkpoints")
        self.optimizer = make_server_optimizer(self.plan.server_optimizer, self.plan.server_lr)
        self.accepted: set[str] = set()
        self.rejected: dict[str, list[str]] = {}
        self.weights: np.ndarray | None = None
        self.dim = 0
        self.validator: P.SiteMessageValidator | None = None
        self.server: AggregatorServer | None = None
        self.outcomes: list[RoundOutcome] = []
        self._status_failing = False
        self.record_failures = 0  # failed attempts to write a round's checkpoint or log line (for tests, status)
        self.listening = asyncio.Event()  # set once the server is bound (its port is then known)

    # -- lifecycle ------------------------------------------------------------------

    def _resume(self) -> int:
        ckpt = self.store.latest()
        if ckpt is not None:
            if ckpt.meta.get("plan_digest") != self.plan.digest():
                raise PlanError(f"checkpoints in {self.store.dir} belong to another plan; use a new state_dir")
            self.weights = ckpt.weights
            self.optimizer.load_state(ckpt.optimizer_state)
            self._reconcile_log(ckpt)
            log.info("resuming after round %d from %s", ckpt.round, self.store.dir)
            return ckpt.round + 1
        self.weights = initial_weights(self.plan)
        self.store.save(Checkpoint(0, self.weights, {}, {"plan_digest": self.plan.digest()}))
        return 1

    def _reconcile_log(self, ckpt: Checkpoint) -> None:
        """A crash between a round's checkpoint and its log line leaves the line missing: add it back."""
        if ckpt.round == 0 or any(e.get("round") == ckpt.round for e in self.store.read_log()):
            return
        log.warning("round %d has a checkpoint but no log line (a crash in between); recording it", ckpt.round)
        self.store.append_log({"round": ckpt.round, "status": ckpt.meta.get("status", "completed"),
                               "recovered": True, "time": time.time()})

    async def run(self) -> None:
        first = self._resume()
        assert self.weights is not None
        self.dim = len(self.weights)
        self.validator = P.plan_validator(self.plan, self.dim, len(self.site_ids))
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
            for rnd in range(first, self.plan.rounds + 1):
                await self._await_sites(rnd, first=rnd == first)
                outcome = await self.run_round(rnd)
                await self._finish_round(outcome)
            await self.server.broadcast(Envelope(P.DONE, self.plan.rounds, {}, (P.weights_blob(self.weights),)),
                                        self.accepted)
            self._status(self.plan.rounds, "done")
            await asyncio.sleep(0.5)  # let the final weights drain before closing
        finally:
            await self.server.close()

    # -- waiting for sites, plans ---------------------------------------------------------

    def _ready(self) -> set[str]:
        assert self.server is not None
        return self.accepted & self.server.connected()

    async def _await_sites(self, rnd: int, first: bool) -> None:
        """Wait for the sites of the next round.

        The first round of a run waits up to the join time-out for every allowed site;
        after that (and in later rounds) it goes on once min_sites are ready, so a dead
        site cannot stall the federation, and a round is never started that could not
        possibly finish.
        """
        assert self.server is not None
        want = len(self.site_ids) - len(self.rejected) if first else self.plan.min_sites
        deadline = time.monotonic() + self.plan.join_timeout_s
        self._status(rnd, "waiting for sites")
        while len(self._ready()) < want:
            if time.monotonic() > deadline:
                if len(self._ready()) >= self.plan.min_sites:
                    return
                log.warning("round %d: %d of the %d sites needed are ready; still waiting", rnd,
                            len(self._ready()), self.plan.min_sites)
                deadline = time.monotonic() + self.plan.join_timeout_s
            try:
                event = await self.server.recv(timeout=1.0)
            except TimeoutError:
                continue
            await self._handle_idle(event)

    async def _handle_idle(self, event: Any) -> None:
        """Events outside a round: joins, plan answers, late messages. A failure here drops that site only."""
        try:
            await self._handle_idle_unguarded(event)
        except Exception as exc:
            await self._drop_peer(getattr(event, "site", None), exc)

    async def _drop_peer(self, site: str | None, exc: BaseException, rnd: int = 0) -> None:
        """Handling a message from `site` failed unexpectedly: log it, close that site, carry on."""
        log.error("handling a message from %s failed; dropping that site", site, exc_info=exc)
        if site is None or self.server is None:
            return
        self.accepted.discard(site)
        with contextlib.suppress(Exception):
            await self.server.reject(site, ProtocolError(f"handler failed: {exc!r}", code="internal"), rnd)

    async def _handle_idle_unguarded(self, event: Any) -> None:
        assert self.server is not None
        if isinstance(event, Connected):
            self.accepted.discard(event.site)
            await self._send(event.site, Envelope(P.PLAN, 0, {
                "plan": self.plan.to_dict(), "digest": self.plan.digest(), "site_id": self.site_ids[event.site]}))
        elif isinstance(event, Disconnected):
            self.accepted.discard(event.site)
        elif isinstance(event, Message):
            env = event.envelope
            if env.type == P.PLAN_ACCEPT and env.body.get("digest") == self.plan.digest():
                self.accepted.add(event.site)
                self.rejected.pop(event.site, None)
                log.info("%s accepted the plan (%d ready)", event.site, len(self._ready()))
            elif env.type in (P.PLAN_ACCEPT, P.PLAN_REJECT):
                # The schema made `reasons` a short list of bounded strings; escape them for the log.
                reasons = [safe_text(r) for r in env.body.get("reasons", [])][:20]
                self.rejected[event.site] = reasons
                log.warning("%s refused the plan: %s", event.site, "; ".join(reasons) or "digest mismatch")
            else:
                log.debug("ignoring late %s from %s (round %d)", env.type, event.site, env.round)

    async def _send(self, site: str, env: Envelope) -> bool:
        assert self.server is not None
        try:
            await self.server.send(site, env)
            return True
        except NotConnected:
            return False

    # -- one round --------------------------------------------------------------------------

    async def run_round(self, rnd: int) -> RoundOutcome:
        assert self.server is not None and self.validator is not None and self.weights is not None
        started = time.monotonic()
        participants = sorted(self._ready(), key=self.site_ids.__getitem__)
        outcome = RoundOutcome(rnd, "abandoned", participants=participants)
        self.validator.round = rnd
        need = self.plan.threshold if self.plan.secagg else 1
        if len(participants) < need:
            outcome.reason = f"{len(participants)} sites ready, {need} needed"
            return self._abandon(outcome, started)
        ids = {self.site_ids[s]: s for s in participants}
        body: dict[str, Any] = {"participants": {str(i): self.cfg.sites[s] for i, s in ids.items()}}
        reached = await self.server.broadcast(Envelope(P.ROUND_START, rnd, body, (P.weights_blob(self.weights),)),
                                              participants)
        self._status(rnd, "training")
        log.info("round %d: %d sites training", rnd, len(reached))
        if self.plan.secagg:
            result = await self._secure_round(rnd, ids, set(reached), outcome)
        else:
            result = await self._plain_round(rnd, set(reached), outcome)
        if result is None:
            return self._abandon(outcome, started)
        weighted_sum, weight_sum, extras = result
        if weight_sum <= 0:
            outcome.reason = "the surviving sites reported no samples"
            return self._abandon(outcome, started)
        outcome.status = "completed"
        outcome.mean_update = (weighted_sum.astype(np.float64) / weight_sum).astype(np.float32)
        k = len(self.plan.classes)
        confusion = np.asarray(extras, dtype=np.int64).reshape(k, k)
        total = int(confusion.sum())
        outcome.confusion = confusion.tolist()
        outcome.fed_val_accuracy = float(np.trace(confusion)) / total if total else None
        outcome.wall_s = time.monotonic() - started
        return outcome

    def _abandon(self, outcome: RoundOutcome, started: float) -> RoundOutcome:
        outcome.status = "abandoned"
        outcome.wall_s = time.monotonic() - started
        log.warning("round %d abandoned: %s; the model is unchanged", outcome.round, outcome.reason)
        return outcome

    async def _secure_round(self, rnd: int, ids: dict[int, str], reached: set[str],
                            outcome: RoundOutcome) -> tuple[np.ndarray, int, np.ndarray] | None:
        cfg = P.secagg_config(self.plan, self.dim)
        machine = secagg.AggregatorSecAgg(cfg, rnd, {i: self.keys[s] for i, s in ids.items()})
        for sid, name in ids.items():
            if name not in reached:
                await self._deliver(machine.site_dropped(sid), rnd)
        stage_names = {secagg.AggStage.COLLECT_KEYS: "training", secagg.AggStage.COLLECT_SHARES: "sharing keys",
                       secagg.AggStage.COLLECT_MASKED: "masked input", secagg.AggStage.COLLECT_UNMASK: "unmasking"}
        stage, deadline = None, 0.0
        dropped: set[str] = {name for name in ids.values() if name not in reached}
        while not machine.finished:
            if machine.stage != stage:
                stage = machine.stage
                timeout = self.plan.train_timeout_s if stage == secagg.AggStage.COLLECT_KEYS \
                    else self.plan.stage_timeout_s
                deadline = time.monotonic() + timeout
                self._status(rnd, stage_names.get(stage, stage.value))
            remaining = deadline - time.monotonic()
            try:
                event = await self.server.recv(timeout=max(remaining, 0.0)) if remaining > 0 else None
            except TimeoutError:
                event = None
            if event is None:
                late = {ids[i] for i in machine.awaiting}
                log.warning("round %d: stage %s timed out waiting for %s", rnd, stage.value, sorted(late))
                dropped |= late
                await self._deliver(machine.deadline_passed(), rnd)
                continue
            site = getattr(event, "site", None)
            sid = self.site_ids.get(site) if site else None
            if isinstance(event, Message) and sid in ids and event.envelope.round == rnd:
                env = event.envelope
                if env.type == P.DECLINE:
                    outcome.declined.append(site)
                    log.info("round %d: %s declined (%s)", rnd, site, safe_text(env.body.get("reason", "no reason")))
                    await self._deliver(machine.site_dropped(sid), rnd)
                elif env.type == P.SECAGG:
                    try:
                        msg = secagg.decode(env.blobs[0], max_vector_len=cfg.vector_len)
                        outs = machine.receive(sid, msg)
                    except secagg.SecAggError as exc:
                        log.warning("round %d: refused a secure-aggregation message from %s: %s", rnd, site,
                                    safe_text(exc))
                        code = "malformed" if isinstance(exc, secagg.MalformedMessage) else "unexpected"
                        await self.server.reject(site, ProtocolError(str(exc), code=code), rnd)
                        dropped.add(site)
                        outs = machine.site_dropped(sid)
                    except Exception as exc:
                        await self._drop_peer(site, exc, rnd)
                        dropped.add(site)
                        outs = machine.site_dropped(sid)
                    await self._deliver(outs, rnd)
                continue
            if isinstance(event, Disconnected) and sid in ids:
                dropped.add(site)
                await self._deliver(machine.site_dropped(sid), rnd)
            await self._handle_idle(event)
        result = machine.outcome
        if isinstance(result, secagg.Abandoned):
            outcome.reason = f"{result.reason} (stage {result.stage})"
            outcome.dropouts = sorted(dropped, key=self.site_ids.__getitem__)
            return None
        assert isinstance(result, secagg.SecAggResult)
        outcome.survivors = [ids[i] for i in result.survivors]
        outcome.dropouts = sorted(set(outcome.participants) - set(outcome.survivors) - set(outcome.declined))
        return result.weighted_sum, result.weight_sum, result.extras_sum

    async def _deliver(self, outgoing: list[secagg.Outgoing], rnd: int) -> None:
        for item in outgoing:
            await self._send(self.site_names[item.to], Envelope(P.SECAGG, rnd, {}, (secagg.encode(item.message),)))

    async def _plain_round(self, rnd: int, reached: set[str],
                           outcome: RoundOutcome) -> tuple[np.ndarray, int, np.ndarray] | None:
        """Without secure aggregation (a baseline): the aggregator sees each site's update."""
        k2 = len(self.plan.classes) ** 2
        total, weight, extras = np.zeros(self.dim, np.float64), 0, np.zeros(k2, np.int64)
        waiting = set(reached)
        got: list[str] = []
        deadline = time.monotonic() + self.plan.train_timeout_s
        while waiting and (remaining := deadline - time.monotonic()) > 0:
            try:
                event = await self.server.recv(timeout=remaining)
            except TimeoutError:
                break
            site = getattr(event, "site", None)
            if isinstance(event, Message) and site in waiting and event.envelope.round == rnd:
                env = event.envelope
                waiting.discard(site)
                if env.type == P.DECLINE:
                    outcome.declined.append(site)
                    continue
                if env.type == P.PLAIN_UPDATE:
                    try:
                        update = P.blob_to_vector(env.blobs[0], self.dim)
                        counts = P.blob_to_vector(env.blobs[1], k2, "<i8")
                        if (counts < 0).any() or counts.sum() > self.plan.max_weight:
                            raise MalformedMessage("confusion counts out of range")
                    except MalformedMessage as exc:
                        log.warning("round %d: refused the update of %s: %s", rnd, site, exc)
                        await self.server.reject(site, exc, rnd)
                        continue
                    # The schema bounds the weight to [0, plan.max_weight]: no overflow, no negative scaling.
                    total += update
                    extras += counts
                    weight += env.body["weight"]
                    got.append(site)
                continue
            if isinstance(event, Disconnected):
                waiting.discard(site or "")
            await self._handle_idle(event)
        outcome.survivors = sorted(got, key=self.site_ids.__getitem__)
        outcome.dropouts = sorted(set(outcome.participants) - set(got) - set(outcome.declined))
        if not got:
            outcome.reason = "no site sent an update"
            return None
        return total.astype(np.float32), weight, extras

    # -- after a round ----------------------------------------------------------------------

    async def _finish_round(self, outcome: RoundOutcome) -> None:
        assert self.weights is not None and self.server is not None
        self.outcomes.append(outcome)
        if outcome.status == "completed" and outcome.mean_update is not None:
            self.weights = self.optimizer.step(self.weights, outcome.mean_update)
        from hemafed.core.models import model_hash

        ckpt = Checkpoint(outcome.round, self.weights, self.optimizer.state(), {
            "plan_digest": self.plan.digest(), "status": outcome.status, "model_hash": model_hash(self.weights)})
        await self._record(ckpt, outcome)
        acc = "–" if outcome.fed_val_accuracy is None else f"{outcome.fed_val_accuracy:.3f}"
        log.info("round %d %s: %d survivors, dropped %s, declined %s, federated validation accuracy %s "
                 "(%.1f s)", outcome.round, outcome.status, len(outcome.survivors), outcome.dropouts or "none",
                 outcome.declined or "none", acc, outcome.wall_s)
        await self.server.broadcast(Envelope(P.ROUND_END, outcome.round, {
            "status": outcome.status, "fed_val_accuracy": outcome.fed_val_accuracy}), self._ready())

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
            await self._handle_idle(event)

    def _status(self, rnd: int, stage: str) -> None:
        """Best effort: status.json is for people; failing to write it never stops a round."""
        import json

        data = {"round": rnd, "rounds": self.plan.rounds, "stage": stage, "time": time.time(),
                "ready": sorted(self._ready()) if self.server else []}
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
