"""One source of truth for what the app says about its site: a status folded from the site driver's typed
events (`network.site_events`). The Federation page's panel and banner and the window's status bar all show
this one value, so they cannot disagree; a new Join starts from a fresh one, so nothing of an earlier
federation shows for a new one. Pure Python, no Qt (tests fold scripted runs through it)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from hemafed.network import site_events as ev

# What the site is doing, in the operator's words (the panel's "now").
PHASE_WORDS = {
    "idle": "not joined",
    "connecting": "connecting to the aggregator…",
    "reviewing": "waiting for you to review the plan",
    "preparing": "preparing this hospital's images (once per set of images)",
    "waiting": "waiting for the next round",
    "left_out": "the federation is running without this hospital for now",
    "training": "training on this hospital's images",
    "keys": "secure aggregation: exchanging keys",
    "shares": "secure aggregation: sharing key pieces",
    "masked": "secure aggregation: sending the masked update",
    "unmask": "secure aggregation: helping to unmask the sum",
    "finished": "finished: the final model is saved",
    "stopped": "left the federation",
    "failed": "stopped: see the message above",
}
CONNECTION_WORDS = {
    "connecting": "connecting…",
    "connected": "connected",
    "reconnecting": "connection lost, reconnecting…",
    "disconnected": "not connected",
}


@dataclass(frozen=True)
class SiteStatus:
    joined: bool = False  # a site driver runs for this window
    connection: str = "disconnected"
    connection_detail: str = ""
    phase: str = "idle"
    round: int = 0
    rounds: int = 0
    participants: int = 0
    epsilon_spent: float | None = None
    prepared: tuple[int, int, float | None] | None = None  # images done, in all, seconds left
    step: tuple[int, int] | None = None  # the round's training steps done, in all
    loss: float | None = None
    problem: ev.SiteFailed | None = None  # what the banner says; None: nothing wrong
    note: str = ""  # information that is not a problem (the federation goes on without this site)
    rounds_trained: int = 0
    model_path: str | None = None

    @property
    def words(self) -> str:
        return PHASE_WORDS.get(self.phase, self.phase)

    def headline(self) -> str:
        """One line for the window's status bar."""
        if not self.joined:
            if self.phase == "finished":
                return "federation finished: model saved"
            if self.phase == "failed" and self.problem is not None:
                return "stopped: " + _short(self.problem.message)
            if self.phase == "stopped":
                return "left the federation"
            return "not joined"
        if self.connection in ("connecting", "reconnecting") and self.phase not in ("training", "preparing"):
            return CONNECTION_WORDS[self.connection]
        where = f"round {self.round} of {self.rounds}: " if self.round and self.rounds else ""
        return f"joined — {where}{self.words}"


def joining() -> SiteStatus:
    """The status of a Join that just started (nothing of an earlier run carries over)."""
    return SiteStatus(joined=True, connection="connecting", phase="connecting")


def fold(status: SiteStatus, e: object) -> SiteStatus:
    """The status after event `e`."""
    if isinstance(e, ev.ConnectionChanged):
        problem = status.problem
        if e.state == "connected" and problem is not None and not problem.fatal:
            problem = None  # it was trying to get through, and now it has
        phase = status.phase
        if e.state == "connected" and phase == "connecting":
            phase = "waiting"
        return replace(status, connection=e.state, connection_detail=e.detail, problem=problem, phase=phase)
    if isinstance(e, ev.PlanReceived):
        return replace(status, rounds=e.plan.rounds, phase="reviewing" if e.awaiting_answer else status.phase,
                       note="")
    if isinstance(e, ev.PlanAnswered):
        return replace(status, phase="preparing" if e.accepted else "failed")
    if isinstance(e, ev.PrepareProgress):
        return replace(status, phase="preparing", prepared=(e.done, e.total, e.seconds_left))
    if isinstance(e, ev.RoundWithoutThisSite):
        why = "it is still preparing its images" if e.reason == "preparing" else "it is not ready yet"
        return replace(status, rounds=e.rounds, note=f"Round {e.round} of {e.rounds} started with {e.participants} "
                                                     f"hospitals, without this one: {why}. It takes part as soon as "
                                                     "it is ready.")
    if isinstance(e, ev.RoundStarted):
        problem = status.problem if status.problem is None or status.problem.fatal else None
        return replace(status, round=e.round, rounds=e.rounds, participants=e.participants, phase="training",
                       step=None, loss=None, note="", problem=problem)
    if isinstance(e, ev.StageChanged):
        return replace(status, phase=e.stage)
    if isinstance(e, ev.TrainProgress):
        return replace(status, step=(e.step, e.total), loss=e.loss if e.loss == e.loss else status.loss)
    if isinstance(e, ev.RoundFinished):
        problem = status.problem
        if e.status == "completed" and problem is not None and not problem.fatal:
            problem = None  # a round went through: whatever was retried has cleared
        return replace(status, epsilon_spent=e.epsilon_spent if e.epsilon_spent is not None else status.epsilon_spent,
                       problem=problem)
    if isinstance(e, ev.SiteFailed):
        return replace(status, problem=e, phase="failed" if e.fatal else status.phase)
    if isinstance(e, ev.Finished):
        phase = {"done": "finished", "stopped": "stopped"}.get(e.outcome, "failed")
        problem = status.problem
        if e.outcome in ("done", "stopped") and problem is not None and not problem.fatal:
            problem = None
        if e.outcome == "failed" and problem is None:
            problem = ev.SiteFailed("The site stopped.", True, "see the log, then press Join again", code="internal")
        return replace(status, joined=False, connection="disconnected", phase=phase, problem=problem,
                       rounds_trained=e.rounds_trained,
                       model_path=str(e.model_path) if e.model_path is not None else status.model_path)
    return status


def _short(text: str, n: int = 80) -> str:
    text = text.rstrip(".")
    return text if len(text) <= n else text[:n - 1] + "…"
