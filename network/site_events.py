"""The site driver's typed events (defined in `hemafed.core.rounds.site_events`, where the
round state machine makes them); see that module for their order and meaning.
`log_event` is the headless site's log line for each."""

import logging

from hemafed.core.rounds.site_events import (
    OUTCOMES,
    STAGES,
    ConnectionChanged,
    Finished,
    PlanAnswered,
    PlanReceived,
    PrepareProgress,
    RoundFinished,
    RoundStarted,
    RoundWithoutThisSite,
    SiteEvent,
    SiteFailed,
    StageChanged,
    TrainProgress,
)

__all__ = ["OUTCOMES", "STAGES", "ConnectionChanged", "Finished", "PlanAnswered", "PlanReceived", "PrepareProgress",
           "RoundFinished", "RoundStarted", "RoundWithoutThisSite", "SiteEvent", "SiteFailed", "StageChanged",
           "TrainProgress", "describe", "log_event"]


def log_event(event: SiteEvent, logger: logging.Logger | None = None) -> None:
    """The headless site's log line for one event (the app shows the same events)."""
    logger = logger or logging.getLogger("hemafed.site")
    level, text = describe(event)
    if text:
        logger.log(level, "%s", text)


def describe(event: SiteEvent) -> tuple[int, str]:
    """(log level, one line in words) for an event; "" for events too frequent to log."""
    if isinstance(event, ConnectionChanged):
        level = logging.WARNING if event.state == "reconnecting" else logging.INFO
        return level, f"{event.state} {event.url}" + (f" ({event.detail})" if event.detail else "")
    if isinstance(event, PlanReceived):
        plan, privacy = event.plan, event.privacy
        if privacy is not None:
            noise = (f"σ={privacy.sigma:.3f}, q={privacy.sample_rate:.4f}, {privacy.steps} steps/round, "
                     f"δ={privacy.delta:g}")
        else:  # not prepared (refused by the bounds) or a plan without DP
            noise = f"{getattr(plan, 'dp_mode', 'local')} DP (not checked)" if plan.dp else "NON-PRIVATE"
        text = f"plan for federation {plan.federation_id}: {plan.rounds} rounds of {plan.model}, {noise}"
        if event.epsilon_per_round:
            text += f", ε after the last round {event.epsilon_per_round[-1]:.3f}"
        if event.problems:
            text += "; outside this site's bounds: " + "; ".join(event.problems)
        return logging.INFO, text
    if isinstance(event, PlanAnswered):
        if event.accepted:
            return logging.INFO, "accepted the plan"
        return logging.ERROR, "refused the plan: " + "; ".join(event.reasons)
    if isinstance(event, PrepareProgress):
        left = "" if event.seconds_left is None else f", about {event.seconds_left / 60:.0f} min left"
        first_or_last = event.done == 0 or event.done >= event.total
        return (logging.INFO if first_or_last else logging.DEBUG), \
            f"preparing this site's images: {event.done} of {event.total}{left}"
    if isinstance(event, RoundWithoutThisSite):
        why = "still preparing its images" if event.reason == "preparing" else "not ready yet"
        return logging.WARNING, (f"round {event.round}/{event.rounds} started with {event.participants} sites, without "
                                 f"this one ({why}); it takes part once ready")
    if isinstance(event, RoundStarted):
        return logging.INFO, f"round {event.round}/{event.rounds} started with {event.participants} sites"
    if isinstance(event, StageChanged):
        return logging.DEBUG, f"round {event.round}: {event.stage}"
    if isinstance(event, TrainProgress):
        return logging.DEBUG, ""
    if isinstance(event, RoundFinished):
        acc = "" if event.accuracy is None else f", federated validation accuracy {event.accuracy:.3f}"
        eps = "" if event.epsilon_spent is None else f", ε spent {event.epsilon_spent:.3f}"
        detail = f" ({event.detail})" if event.detail else ""
        level = logging.INFO if event.status == "completed" else logging.WARNING
        return level, f"round {event.round} {event.status}{acc}{eps}{detail}"
    if isinstance(event, SiteFailed):
        todo = f" — what to do: {event.what_to_do}" if event.what_to_do else ""
        return (logging.ERROR if event.fatal else logging.WARNING), f"{event.message}{todo}"
    if isinstance(event, Finished):
        if event.outcome == "done":
            return logging.INFO, f"federation finished; final model saved to {event.model_path}"
        return logging.INFO, f"site {event.outcome} after training {event.rounds_trained} rounds"
    return logging.DEBUG, repr(event)
