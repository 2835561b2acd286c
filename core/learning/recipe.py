"""The recommended federation plan: the recipe measured in docs/RESULTS.md and chosen on validation
data (docs/accuracy-levers.md), for a given privacy budget.

DP-FedSGD (one Poisson-sampled DP-SGD step per round over all sites) on the fixed features of
`RECIPE["model"]`, with distributed DP: each site adds a noise share inside secure aggregation. The noise
multiplier is the one that makes the plan's rounds spend exactly `epsilon` at every site, so
whoever writes the plan (the admin, or `hemafed aggregator` from `epsilon` in federation.toml)
computes it here and every site checks it against its own budget. The rounds, and with them the server's
step, follow the budget too (`schedule`): a small budget is better spent on fewer, less noisy rounds.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..privacy.calibration import BudgetTooSmall
from ..rounds.plan import FederationPlan, PlanError, default_threshold
from .models import MODELS
from .site_trainer import fedsgd_plan_sigma

RECIPE: dict[str, Any] = {
    "model": "scatter_synth_inv_cc_ms4p_lf_cells_hed_bw_64",
    "algorithm": "fedsgd",
    "rounds": 500,  # above ε = 2.5; fewer at smaller budgets (`BUDGET_SCHEDULE`)
    "sample_rate": 0.1713,  # q: ≈ 2,048 of BloodMNIST's 11,959 training images per round
    "momentum": 0.9,
    "clip_norm": 1.0,
}
# The server's learning rate falls as the noise grows: lr·σ = 2.6, at most 1 (validation, 3 seeds, the
# centred scatter_synth_inv_28: best lr 1.0 at ε = 8 (σ 2.6), 0.7 at ε = 5 (σ 3.8), 0.5 at ε = 3 (σ 5.8);
# docs/accuracy-levers.md). So each step moves the head by about the same amount of noise whatever ε is.
LR_TIMES_SIGMA = 2.6
# Models whose head wants smaller steps: the 64-px multi-scale features (4,747 numbers against 2,699) took half the
# learning rate at ε = 8 and 3 (central DP-SGD screen, validation, 3 seeds; docs/accuracy-levers.md, sixth pass).
MODEL_LR_TIMES_SIGMA = {"scatter_synth_inv_cc_ms_64": 1.3, "scatter_synth_inv_cc_ms4_64": 1.3,
                        "scatter_synth_inv_cc_ms4p_64": 1.3, "scatter_synth_inv_cc_ms4p_looks_64": 1.3,
                        "scatter_synth_inv_cc_ms4p_looks_hed_64": 1.3, "scatter_synth_inv_cc_ms4p_lf_looks_hed_64": 1.3,
                        "scatter_synth_inv_cc_ms4p_lf_looks_hed_bw_64": 1.3,
                        "scatter_synth_inv_cc_ms4p_lf_looks_hed_s56_bw_64": 1.3,
                        "scatter_synth_inv_cc_ms4p_lf_cells_hed_bw_64": 1.3}


# Fewer, less noisy rounds at small budgets, each with twice the model's step (thirteenth pass of
# docs/accuracy-levers.md, validation, 3 seeds, the recipe's model through the product): at ε = 1, 125 rounds at
# lr·σ = 2.6 gave 91.8 % against 90.3 % for 500 rounds at 1.3; at ε = 2, 250 rounds at 2.6 gave 94.1 % against
# 93.5 %; at ε = 3 every schedule screened lay within 0.3 points, so from there on the recipe keeps its 500 rounds.
# Screened again for the block-weighted head (fifteenth pass) at ε = 1: 90, 125 and 170 rounds within 0.2 points,
# lr·σ 2.0–3.4 within 0.2. (largest ε, rounds, lr·σ) for `SCHEDULED_MODELS` only: no other model's was screened.
BUDGET_SCHEDULE: tuple[tuple[float, int, float], ...] = ((1.5, 125, 2.6), (2.5, 250, 2.6))
# the recipe's model (its encoder's lr·σ and schedule taken over from the looks encoder's and checked at ε = 8, 3
# and 1: twenty-third pass), the looks encoder's, and the same head with a second scattering block, screened with the
# same schedule (seventeenth pass)
SCHEDULED_MODELS = frozenset({RECIPE["model"], "scatter_synth_inv_cc_ms4p_lf_looks_hed_bw_64",
                              "scatter_synth_inv_cc_ms4p_lf_looks_hed_s56_bw_64"})


def schedule(epsilon: float | None = None, model: str | None = None) -> tuple[int, float]:
    """The recipe's (rounds, lr·σ) for a budget of `epsilon` per site and `model`: `BUDGET_SCHEDULE` for the
    models it was screened for (`SCHEDULED_MODELS`) at small budgets, else `RECIPE["rounds"]` and the model's lr·σ
    (`MODEL_LR_TIMES_SIGMA`, else `LR_TIMES_SIGMA`); `epsilon` None: no budget (a non-private plan)."""

    if model in SCHEDULED_MODELS and epsilon is not None:
        for most, rounds, k in BUDGET_SCHEDULE:
            if epsilon <= most:
                return rounds, k
    return RECIPE["rounds"], _model_k(model)


def _model_k(model: str | None) -> float:
    return MODEL_LR_TIMES_SIGMA.get(model or "", LR_TIMES_SIGMA)


def rounds_for(epsilon: float | None, model: str | None = None) -> int:
    """The recipe's rounds for a budget of `epsilon` per site (`schedule`)."""
    return schedule(epsilon, model)[0]


def lr_times_sigma(model: str | None = None, epsilon: float | None = None, rounds: int | None = None) -> float:
    """The product lr·σ the recipe keeps for `model` at a budget of `epsilon` over `rounds` rounds: the schedule's
    when the plan runs the schedule's rounds for its budget (`schedule`), else the model's own
    (`MODEL_LR_TIMES_SIGMA`, else `LR_TIMES_SIGMA`): a larger step was only measured with fewer rounds."""

    scheduled, k = schedule(epsilon, model)
    return k if rounds == scheduled else _model_k(model)


def server_lr_for(sigma: float, model: str | None = None, epsilon: float | None = None,
                  rounds: int | None = None) -> float:
    """The recipe's server learning rate for a plan-wide noise multiplier σ: min(1, `lr_times_sigma`/σ)."""
    return round(min(1.0, lr_times_sigma(model, epsilon, rounds) / sigma), 3) if sigma > 0 else 1.0


def schedule_text(model: str | None = None) -> str:
    """The recipe's rounds and server step in words, e.g. for RESULTS.md."""
    base, k = schedule(None, model)
    text = f"{base} rounds at lr = min(1, {k}/σ)"
    if model not in SCHEDULED_MODELS:
        return text
    parts, low = [], 0.0
    for most, rounds, k_low in BUDGET_SCHEDULE:
        parts.append(f"{rounds} rounds at lr = min(1, {k_low}/σ) for {low:g} < ε ≤ {most:g}" if low else
                     f"{rounds} rounds at lr = min(1, {k_low}/σ) for ε ≤ {most:g}")
        low = most
    return "; ".join(parts) + f"; {text} above"


def with_budget(plan: FederationPlan, epsilon: float, dp_mode: str = "distributed",
                dim: int | None = None, recipe_lr: bool = False) -> FederationPlan:
    """`plan` (algorithm "fedsgd") with the σ shared by all sites that makes its rounds spend exactly
    `epsilon` per site under `dp_mode`'s mechanism, and with `recipe_lr` the server lr for that σ
    (`server_lr_for`, the schedule's step when the plan runs the schedule's rounds). `dim`: the model's
    parameters, centre included (built from the registry when not given). Raises `BudgetTooSmall`, or
    `KeyError` for a model the registry lacks."""

    sigma = fedsgd_plan_sigma(plan, float(epsilon), dim, dp_mode)
    plan = replace(plan, dp_mode=dp_mode, noise_multiplier=sigma)
    if not recipe_lr:
        return plan
    return replace(plan, server_lr=server_lr_for(sigma, plan.model, float(epsilon), plan.rounds))


def recommended_plan(epsilon: float, images: int, sites: int, dp_mode: str = "distributed",
                     **fields: Any) -> FederationPlan:
    """The recipe for `sites` allowed sites holding about `images` training images together, spending
    `epsilon` per site over its rounds. `fields` override the recipe or set any other plan field
    (`federation_id`, `rounds`, `threshold`, `delta`, ...), type-checked as in federation.toml; `rounds`
    defaults to the schedule's for the budget (`schedule`).
    The expected batch the server divides by is q·images; `threshold` defaults to all sites but one
    (`default_threshold`)."""

    if not (isinstance(epsilon, int | float) and not isinstance(epsilon, bool) and 0 < epsilon < 1000):
        raise PlanError(f"epsilon must be a number in (0, 1000), got {epsilon!r}")
    if not (isinstance(images, int) and not isinstance(images, bool) and images > 0):
        raise PlanError(f"the expected number of training images must be a positive integer, got {images!r}")
    if dp_mode not in ("distributed", "local"):
        raise PlanError(f"dp_mode must be 'distributed' or 'local', got {dp_mode!r}")
    for name in ("noise_multiplier", "batch_size", "dp_mode"):
        if name in fields:
            raise PlanError(f"{name} is derived from the budget here; leave it out (or give the whole plan "
                            "without epsilon)")
    values = {**RECIPE, **{k: v for k, v in fields.items() if v is not None}}
    if fields.get("rounds") is None:
        values["rounds"] = rounds_for(float(epsilon), values.get("model"))
    if isinstance(values.get("model"), str) and values["model"] in MODELS:
        values.setdefault("input_size", MODELS[values["model"]].input_size)
    threshold = values.get("threshold", default_threshold(sites))
    values.setdefault("min_sites", threshold)
    values.setdefault("max_sites", max(sites, 2))
    values["threshold"] = threshold
    plan = FederationPlan.from_dict(values)
    plan = replace(plan, batch_size=max(1, round(plan.sample_rate * images)))
    try:
        return with_budget(plan, epsilon, dp_mode, recipe_lr="server_lr" not in values)
    except (BudgetTooSmall, KeyError) as exc:  # KeyError: a model name the registry does not know
        raise PlanError(str(exc).strip("'\"")) from exc
