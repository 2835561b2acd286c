"""What a site driver tells its user interface: small typed events, all delivered on the
driver's event-loop thread, in order.

The headless `hemafed site` turns them into log lines; the desktop app forwards them to
the GUI thread through queued Qt signals. The driver never waits on a consumer except
for the plan decision (`PlanReceived` → `SiteRunner.answer_plan`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Stages of one round as the operator sees them (`StageChanged.stage`).
STAGES = ("waiting", "training", "keys", "shares", "masked", "unmask")


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
    and δ when the plan is private. The driver waits for `answer_plan(accept)`."""

    plan: Any  # hemafed.core.plan.FederationPlan
    privacy: Any | None  # hemafed.network.site.PrivacySettings
    problems: tuple[str, ...] = ()
    epsilon_per_round: tuple[float, ...] = ()


@dataclass(frozen=True)
class PlanAnswered:
    accepted: bool
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class RoundStarted:
    round: int
    rounds: int
    participants: int


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
    federation-wide validation accuracy of the model this round started from."""

    round: int
    status: str
    accuracy: float | None = None
    epsilon_spent: float | None = None
    detail: str = ""


@dataclass(frozen=True)
class SiteFailed:
    """Something went wrong. `fatal`: the driver has stopped (or will not retry this)."""

    message: str
    fatal: bool
    what_to_do: str = ""


@dataclass(frozen=True)
class Finished:
    model_path: Path | None
    rounds_trained: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


SiteEvent = (ConnectionChanged | PlanReceived | PlanAnswered | RoundStarted | StageChanged | TrainProgress
             | RoundFinished | SiteFailed | Finished)
