"""A hospital site's round driver: checks the plan, trains with DP-SGD off the event
loop, records the privacy spend before anything leaves, and takes part in secure
aggregation. The headless `hemafed site` and the desktop app drive the same object.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hemafed.core import secagg
from hemafed.core.atomic import append_line_durable, atomic_write_bytes
from hemafed.core.identity import IdentityKey, load_identity, parse_public_line
from hemafed.core.plan import FederationPlan, PlanError
from hemafed.network import protocol as P
from hemafed.network.client import SiteClient
from hemafed.network.config import SiteConfig
from hemafed.network.envelope import Envelope, Limits
from hemafed.network.errors import ConnectionLost

log = logging.getLogger(__name__)

DIE_STAGES = ("train", "keys", "shares", "masked", "unmask")
EventFn = Callable[[str, dict[str, Any]], None]


@dataclass
class LocalData:
    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray


@dataclass(frozen=True)
class PrivacySettings:
    sigma: float
    sample_rate: float
    steps: int
    delta: float


class PlanRefused(Exception):
    def __init__(self, reasons: list[str]) -> None:
        super().__init__("; ".join(reasons))
        self.reasons = reasons


class SiteRunner:
    """One site in one federation. `run()` returns the path of the final model (or None)."""

    def __init__(self, cfg: SiteConfig, *, identity: IdentityKey | None = None,
                 die_at: tuple[int, str] | None = None, on_die: Callable[[], None] | None = None,
                 on_event: EventFn | None = None,
                 accept_plan: Callable[[FederationPlan, PrivacySettings | None], bool] | None = None) -> None:
        self.cfg = cfg
        self.identity = identity or load_identity(cfg.state_dir)
        self.die_at = die_at
        self.on_die = on_die or _hard_exit
        self.last_result = None  # the latest LocalResult: loss and steps for the operator; never sent
        self.on_event = on_event or (lambda kind, data: None)
        self.accept_plan = accept_plan
        self.plan: FederationPlan | None = None
        self.site_id = 0
        self.data: LocalData | None = None
        self.privacy: PrivacySettings | None = None
        self.ledger = None
        self.machine: secagg.SiteSecAgg | None = None
        self.global_weights: np.ndarray | None = None
        self.bytes_sent = self.bytes_received = 0
        self.client: SiteClient | None = None
        self.finished = False
        self.final_path: Path | None = None

    # -- main loop ---------------------------------------------------------------------------

    async def run(self) -> Path | None:
        self.client = SiteClient(self.cfg.aggregator, self.identity, ca_file=self.cfg.ca_file,
                                 insecure=self.cfg.insecure, federation=self.cfg.federation,
                                 limits=Limits.for_model(4_000_000), ping_interval=30.0, ping_timeout=120.0)
        try:
            while True:
                try:
                    env = await self.client.recv(timeout=None)
                except ConnectionLost as exc:
                    log.warning("connection to the aggregator lost (%s); reconnecting", exc)
                    self.machine = None
                    continue
                self.bytes_received += _size(env)
                await self._dispatch(env)
                if self.finished:
                    return self.final_path
        finally:
            await self.client.close()

    async def _send(self, env: Envelope) -> None:
        assert self.client is not None
        self.bytes_sent += _size(env)
        await self.client.send(env)

    async def _dispatch(self, env: Envelope) -> None:
        if env.type == P.PLAN:
            await self._on_plan(env)
        elif env.type == P.ROUND_START:
            await self._on_round_start(env)
        elif env.type == P.SECAGG:
            await self._on_secagg(env)
        elif env.type == P.ROUND_END:
            self._log_round(env.round, "round_end", outcome=env.body.get("status"), bytes_sent=self.bytes_sent,
                            bytes_received=self.bytes_received)
            self.on_event("round_end", {"round": env.round, **dict(env.body)})
        elif env.type == P.DONE:
            self.final_path = self._on_done(env)
            self.finished = True
        elif env.type == "error":
            log.error("the aggregator reported an error: %s", env.body.get("message"))
        else:
            log.warning("ignoring unexpected %s message", env.type)

    # -- plan ------------------------------------------------------------------------------------

    async def _on_plan(self, env: Envelope) -> None:
        try:
            plan = FederationPlan.from_dict(dict(env.body.get("plan", {})))
            if env.body.get("digest") != plan.digest():
                raise PlanRefused(["plan digest does not match its contents"])
            if self.cfg.federation and plan.federation_id != self.cfg.federation:
                raise PlanRefused([f"federation {plan.federation_id!r} is not the configured one"])
            self.site_id = int(env.body["site_id"])
            self.prepare(plan)
            if self.accept_plan is not None and not self.accept_plan(plan, self.privacy):
                raise PlanRefused(["the operator declined the plan"])
        except (PlanError, PlanRefused, ValueError, KeyError, TypeError) as exc:
            reasons = exc.reasons if isinstance(exc, PlanRefused) else [str(exc)]
            log.error("refusing the federation plan: %s", "; ".join(reasons))
            self.on_event("plan_refused", {"reasons": reasons})
            await self._send(Envelope(P.PLAN_REJECT, 0, {"reasons": reasons}))
            return
        log.info("joined federation %s as site %d (%s)", plan.federation_id, self.site_id,
                 f"σ={self.privacy.sigma:.3f}, q={self.privacy.sample_rate:.4f}, {self.privacy.steps} steps/round, "
                 f"δ={self.privacy.delta:g}" if self.privacy else "NON-PRIVATE")
        self.on_event("plan_accepted", {"plan": plan.to_dict(), "privacy": self.privacy and vars(self.privacy)})
        await self._send(Envelope(P.PLAN_ACCEPT, 0, {"digest": plan.digest()}))

    def prepare(self, plan: FederationPlan) -> None:
        """Check the plan against the bounds, load the data, calibrate σ for the whole plan."""
        from hemafed.core.calibration import BudgetTooSmall, calibrate_sigma, sample_rate, steps_per_round
        from hemafed.core.models import get_spec

        reasons = self.cfg.bounds.violations(plan)
        try:
            if get_spec(plan.model).input_size != plan.input_size:
                reasons.append(f"model {plan.model} does not take {plan.input_size}-pixel input")
        except KeyError as exc:
            reasons.append(str(exc.args[0]))
        if reasons:
            raise PlanRefused(reasons)
        if self.plan is None or self.plan.digest() != plan.digest():
            self.data = self._load_data(plan)
        self.plan = plan
        n = len(self.data.train_labels)
        if n < plan.batch_size:
            raise PlanRefused([f"only {n} training images, fewer than the batch size {plan.batch_size}"])
        if not plan.dp:
            self.privacy = None
            log.warning("this plan is NON-PRIVATE: updates carry no differential-privacy guarantee")
            return
        q, steps = sample_rate(n, plan.batch_size), steps_per_round(n, plan.batch_size, plan.local_epochs)
        self.ledger = self._open_ledger(plan, default_delta=min(plan.delta, 1.0 / n))
        # σ is fitted so the rounds still to come, on top of what the ledger already
        # holds (a restarted site), stay within the budget.
        remaining = max(plan.rounds - self.ledger.rounds, 1)
        prior = [(e.sigma, e.sample_rate, e.steps) for e in self.ledger.entries]
        try:
            sigma = calibrate_sigma(self.cfg.epsilon, self.ledger.delta, q, steps * remaining,
                                    kind=self.ledger.kind, prior=prior)
        except BudgetTooSmall as exc:
            raise PlanRefused([str(exc)]) from exc
        self.privacy = PrivacySettings(sigma, q, steps, self.ledger.delta)

    def _open_ledger(self, plan: FederationPlan, default_delta: float):
        """This federation's ledger: δ and accountant stay what they were when it was
        created; a different budget is refused rather than silently applied."""
        from hemafed.core.ledger import LedgerCorrupt, PrivacyLedger

        try:
            ledger = PrivacyLedger(plan.federation_id, state=self.cfg.state_dir)
        except FileNotFoundError:
            return PrivacyLedger(plan.federation_id, self.cfg.epsilon, default_delta, kind=self.cfg.accountant,
                                 state=self.cfg.state_dir)
        except LedgerCorrupt as exc:
            raise PlanRefused([f"the privacy ledger is damaged ({exc}); training is stopped until it is "
                               "restored from a backup"]) from exc
        if ledger.budget_epsilon != self.cfg.epsilon:
            raise PlanRefused([f"this federation's ledger was opened with budget ε = {ledger.budget_epsilon:g}; "
                               f"the configured {self.cfg.epsilon:g} cannot replace it"])
        return ledger

    def _load_data(self, plan: FederationPlan) -> LocalData:
        from hemafed.core.partition import stratified_split
        from hemafed.core.scan import scan_source

        site = scan_source(self.cfg.data, plan.classes, size=plan.input_size)
        if site.report.problems:
            log.warning("%d files skipped while loading %s (run `hemafed scan` for the list)",
                        len(site.report.problems), self.cfg.data)
        train, val = stratified_split(site.labels, plan.val_fraction, seed=plan.seed)
        log.info("local data: %d training and %d validation images", len(train), len(val))
        return LocalData(site.images[train], site.labels[train], site.images[val], site.labels[val])

    # -- a round -------------------------------------------------------------------------------

    async def _on_round_start(self, env: Envelope) -> None:
        from hemafed.core.ledger import BudgetExhausted

        plan, data = self.plan, self.data
        if plan is None or data is None:
            log.warning("round_start before a plan was accepted; ignoring")
            return
        rnd = env.round
        model = self._model(env)
        if model is None:
            return
        self.on_event("round_start", {"round": rnd})
        self._maybe_die(rnd, "train")
        confusion = await asyncio.to_thread(self._evaluate, model)
        started = time.monotonic()
        try:
            result = await asyncio.to_thread(self._train, model, rnd)
        except BudgetExhausted as exc:
            log.warning("round %d: declining, %s", rnd, exc)
            self._log_round(rnd, "declined", reason="budget exhausted")
            self.on_event("declined", {"round": rnd, "reason": str(exc)})
            await self._send(Envelope(P.DECLINE, rnd, {"reason": "budget_exhausted"}))
            return
        self.last_result = result
        eps = self.ledger.spent_epsilon() if self.privacy is not None else None
        log.info("round %d: trained %d steps in %.1f s, %s", rnd, result.steps, time.monotonic() - started,
                 f"ε spent {eps:.3f} of {self.cfg.epsilon:g} at δ={self.privacy.delta:g}" if self.privacy
                 else "NON-PRIVATE")
        self._log_round(rnd, "trained", epsilon=eps, loss=result.mean_loss, train_s=time.monotonic() - started)
        self.on_event("trained", {"round": rnd, "epsilon": eps, "loss": result.mean_loss})
        n = len(data.train_labels)
        if plan.secagg:
            peers = {int(k): parse_public_line(v) for k, v in env.body.get("participants", {}).items()}
            cfg = P.secagg_config(plan, len(result.update))
            self.machine = secagg.SiteSecAgg(cfg, rnd, self.site_id, self.identity.private_key, peers)
            self._maybe_die(rnd, "keys")
            for msg in self.machine.start(result.update, n, confusion.reshape(-1)):
                await self._send(Envelope(P.SECAGG, rnd, {}, (secagg.encode(msg),)))
        else:
            weighted = (result.update.astype(np.float64) * n).astype(np.float32)
            await self._send(Envelope(P.PLAIN_UPDATE, rnd, {"weight": n}, (
                P.weights_blob(weighted), np.ascontiguousarray(confusion.reshape(-1), "<i8").tobytes())))

    def _model(self, env: Envelope):
        from hemafed.core.models import build_model, set_flat_params

        assert self.plan is not None
        model = build_model(self.plan.model, len(self.plan.classes))
        try:
            n_params = sum(p.numel() for p in model.parameters())
            if len(env.blobs) != 1:
                raise ValueError("round_start must carry the global weights")
            self.global_weights = P.blob_to_vector(env.blobs[0], n_params)
            set_flat_params(model, self.global_weights)
        except Exception as exc:  # a bad model must not crash the site
            log.error("round %d: unusable global model (%s); skipping the round", env.round, exc)
            return None
        self._save_model("latest", self.global_weights, env.round)
        return model

    def _evaluate(self, model) -> np.ndarray:
        from hemafed.core.dp_train import evaluate

        assert self.data is not None and self.plan is not None
        return evaluate(model, self.data.val_images, self.data.val_labels, len(self.plan.classes))

    def _train(self, model, rnd: int):
        """Train one round; with DP, the budget check and the durable ledger entry come
        first and last (`train_private_round`), so the spend is on disk before any send."""
        import torch

        from hemafed.core.dp_train import LocalTrainConfig, train_local
        from hemafed.core.private_round import train_private_round

        assert self.plan is not None and self.data is not None
        if self.cfg.torch_threads:
            torch.set_num_threads(self.cfg.torch_threads)
        plan, data = self.plan, self.data
        config = LocalTrainConfig(local_epochs=plan.local_epochs, batch_size=plan.batch_size, lr=plan.lr,
                                  momentum=plan.momentum, clip_norm=plan.clip_norm, dp=plan.dp)

        def progress(step: int, total: int, loss: float) -> None:
            self.on_event("train_progress", {"round": rnd, "step": step, "total": total, "loss": loss})

        if self.privacy is None:
            return train_local(model, data.train_images, data.train_labels, config, noise_multiplier=0.0,
                               progress=progress)
        return train_private_round(self.ledger, rnd, model, data.train_images, data.train_labels, config,
                                   self.privacy.sigma, progress=progress).result

    async def _on_secagg(self, env: Envelope) -> None:
        if self.machine is None or env.round != self.machine.round:
            log.debug("ignoring a secure-aggregation message for round %d", env.round)
            return
        try:
            msg = secagg.decode(env.blobs[0] if env.blobs else b"", max_vector_len=self.machine.cfg.vector_len)
            stage = {secagg.KeyList: "shares", secagg.ShareDelivery: "masked",
                     secagg.UnmaskRequest: "unmask"}.get(type(msg))
            if stage:
                self._maybe_die(env.round, stage)
            outs = self.machine.receive(msg)
        except secagg.SecAggError as exc:
            # Refusing is always safe: the site reveals nothing more this round.
            log.error("round %d: refusing a secure-aggregation message: %s", env.round, exc)
            self.machine = None
            return
        for out in outs:
            await self._send(Envelope(P.SECAGG, env.round, {}, (secagg.encode(out),)))
        if self.machine.finished:
            self._log_round(env.round, f"secagg_{self.machine.stage.value}")
            self.machine = None

    def _on_done(self, env: Envelope) -> Path | None:
        assert self.plan is not None
        try:
            from hemafed.core.models import build_model

            weights = P.blob_to_vector(env.blobs[0], sum(p.numel() for p in build_model(
                self.plan.model, len(self.plan.classes)).parameters()))
        except Exception as exc:
            log.error("final model unusable: %s", exc)
            return None
        path = self._save_model("final", weights, env.round)
        log.info("federation finished; final model saved to %s", path)
        self.on_event("done", {"path": str(path)})
        return path

    # -- bookkeeping -----------------------------------------------------------------------------

    def _save_model(self, name: str, weights: np.ndarray, rnd: int) -> Path:
        assert self.plan is not None
        path = self.cfg.state_dir / "models" / self.plan.federation_id / f"{name}.npz"
        return save_model_file(path, weights, self.plan, rnd)

    def _log_round(self, rnd: int, status: str, **fields: Any) -> None:
        entry = {"round": rnd, "status": status, "time": time.time(), **fields}
        append_line_durable(self.cfg.state_dir / "site_rounds.jsonl", json.dumps(entry))

    def _maybe_die(self, rnd: int, stage: str) -> None:
        if self.die_at == (rnd, stage):
            log.warning("simulated crash at round %d, stage %s", rnd, stage)
            self.on_die()


def _hard_exit() -> None:
    logging.shutdown()
    os._exit(17)


def _size(env: Envelope) -> int:
    return 4 + len(json.dumps({"type": env.type, "round": env.round, "body": dict(env.body)})) + sum(
        len(b) for b in env.blobs)


def save_model_file(path: Path, weights: np.ndarray, plan: FederationPlan, rnd: int) -> Path:
    """A model file the app can load: flat float32 weights plus the registry name and classes."""
    import io

    buf = io.BytesIO()
    meta = {"model": plan.model, "classes": list(plan.classes), "input_size": plan.input_size,
            "round": rnd, "federation_id": plan.federation_id}
    np.savez(buf, weights=weights, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
    atomic_write_bytes(path, buf.getvalue(), mode=0o600)
    return path
