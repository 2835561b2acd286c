"""What a site driver tells its user interface: small typed events, all delivered on the
driver's event-loop thread, in order.

The headless `hemafed site` turns them into log lines; the desktop app forwards them to
the GUI thread through queued Qt signals. The driver never waits on a consumer except
for the plan decision (`PlanReceived` → `SiteRunner.answer_plan`).

They live in core because the site's round state machine (`core.site_round`) produces
most of them; `hemafed.network.site_events` re-exports the same classes.

Every string field that can hold text from the aggregator (`detail`, `message`,
`reasons`) is escaped with `hemafed.core.trust.text.safe_text` before the event is made.

A run's events, in order: ConnectionChanged(connecting) → ConnectionChanged(connected)
→ PlanReceived → PlanAnswered → StageChanged(preparing) → PrepareProgress… →
StageChanged(waiting) → per round: RoundStarted → StageChanged(training) →
TrainProgress… → StageChanged(keys/shares/masked/unmask or waiting) → RoundFinished;
then Finished, always last (its `outcome` says whether the federation finished, the
operator stopped, or a fatal error ended the run; a SiteFailed(fatal=True) precedes
"failed"). ConnectionChanged(reconnecting) and SiteFailed(fatal=False) may come at any
point while the site reconnects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Stages as the operator sees them (`StageChanged.stage`): "preparing" before the first round this site joins.
STAGES = ("preparing", "waiting", "training", "keys", "shares", "masked", "unmask")


@dataclass(frozen=True)
class ConnectionChanged:
    """`state`: "connecting" | "connected" | "reconnecting" | "disconnected"."""

    state: str
    url: str = ""
    detail: str = ""


@dataclass(frozen=True)
class PlanReceived:
    """The aggregator's plan, checked against this site's bounds. `problems` lists what is
    outside the bounds (then the site refuses without asking); `privacy` holds σ, q, steps
    and δ when the plan is private; `epsilon_per_round`: this site's ε after each round
    still to come, at that σ (the ledger's past rounds included). When `awaiting_answer`
    is true the driver waits for `SiteRunner.answer_plan(accept)`; otherwise it has
    decided already (headless auto-accept, a plan the operator accepted earlier in this
    run or an earlier one, or a refusal because of `problems`); `changes` says what differs from
    the plan this site accepted in this federation before, if any."""

    plan: Any  # hemafed.core.rounds.plan.FederationPlan
    privacy: Any | None  # hemafed.core.rounds.site_round.PrivacySettings
    problems: tuple[str, ...] = ()
    epsilon_per_round: tuple[float, ...] = ()
    awaiting_answer: bool = False
    # (field, before, after) when this site accepted another plan in this federation before
    changes: tuple[tuple[str, str, str], ...] = ()


@dataclass(frozen=True)
class PlanAnswered:
    """The site's answer to the plan: refused (`reasons`: why; the refusal went to the aggregator), or
    accepted — the site then prepares (`PrepareProgress`) and tells the aggregator it is ready."""

    accepted: bool
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class PrepareProgress:
    """Preparing for the plan: `done` of `total` images have their fixed features (read from the cache or
    computed); `seconds_left` is an estimate (None until one can be made). The aggregator hears it too."""

    done: int
    total: int
    seconds_left: float | None = None


@dataclass(frozen=True)
class RoundStarted:
    round: int
    rounds: int
    participants: int
    # the participants' identity-key fingerprints (secure plans: the keys the round's masks are agreed with)
    peers: tuple[str, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class RoundWithoutThisSite:
    """The federation started round `round` of `rounds` with `participants` sites, without this one: it was
    still `reason` ("preparing": computing its images' features; "not_ready": not yet ready). It takes part
    from the next round it is ready for."""

    round: int
    rounds: int
    participants: int
    reason: str


@dataclass(frozen=True)
class StageChanged:
    round: int
    stage: str  # one of STAGES


@dataclass(frozen=True)
class TrainProgress:
    round: int
    step: int
    total: int
    loss: float


@dataclass(frozen=True)
class RoundFinished:
    """`status`: "completed" | "abandoned" | "declined" | "left"; `accuracy` is the
    federation-wide validation accuracy of the model this round started from (from the
    aggregator's round_end; None when it did not say). `epsilon_spent`: this site's ε so
    far in this federation, from its ledger (None without DP). "left": this site left the
    round (stopped, or lost its connection); `detail` says whether the round's spend was
    recorded (it is whenever training finished, even if the update never arrived)."""

    round: int
    status: str
    accuracy: float | None = None
    epsilon_spent: float | None = None
    detail: str = ""


# What went wrong (`SiteFailed.code`), so that a user interface can name its own next step.
FAILURE_CODES = ("unreachable", "bad_address", "unknown_key", "certificate", "wrong_aggregator", "plan_refused",
                 "budget", "data", "training", "finished", "internal")


@dataclass(frozen=True)
class SiteFailed:
    """Something went wrong. `fatal`: the driver has stopped (or will not retry this). `what_to_do` is the next
    step in words for the headless site; `code` (one of FAILURE_CODES, or "") says which problem it is."""

    message: str
    fatal: bool
    what_to_do: str = ""
    code: str = ""


# Why a run ended (`Finished.outcome`).
OUTCOMES = ("done", "stopped", "failed")


@dataclass(frozen=True)
class Finished:
    """The last event of every run. `model_path`: the final model (only when `outcome`
    is "done"); `rounds_trained`: rounds this run trained (spend recorded)."""

    model_path: Path | None
    rounds_trained: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    outcome: str = "done"  # one of OUTCOMES


SiteEvent = (ConnectionChanged | PlanReceived | PlanAnswered | PrepareProgress | RoundStarted
             | RoundWithoutThisSite | StageChanged | TrainProgress | RoundFinished | SiteFailed | Finished)
