"""The federation plan: the only thing (besides weights) the aggregator sends to sites.

It names a model from the built-in registry and sets the training and privacy
knobs. No code travels. A site checks a plan against the bounds its operator
accepts (`SiteBounds`) before joining.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .. import secagg
from ..data.classes import BLOODMNIST_CLASSES
from ..errors import HemafedError
from .calibration_sums import CALIBRATION_GRID, CELL_SCORE_EDGES


class PlanError(HemafedError, ValueError):
    """A plan that is malformed, inconsistent, or outside what a site accepts."""


def default_threshold(sites: int) -> int:
    """The secure-aggregation threshold t the recipe gives `sites` allowed sites: all but one, at least 2.

    Distributed DP sizes each noise share for t survivors, so with all n sites in a round the released sum
    carries n/(t − c) times the accounted variance; t = n − 1 keeps that near 1 (1.25 for 10 sites, against 2
    for a strict majority) while a round still survives one dropout (docs/privacy.md, "The threshold t")."""
    return max(2, int(sites) - 1)


def model_input_size(model: str) -> int:
    """The input size a model name states: every registry name ends in `_<pixels>` (tests/test_models.py checks it
    against each model's own), 28 for a name without it (a site refuses a model it does not know anyway)."""
    size = model.rsplit("_", 1)[-1]
    return int(size) if size.isdigit() and 0 < int(size) <= 1024 else 28


@dataclass(frozen=True)
class FederationPlan:
    """The defaults are the recommended recipe (`core.learning.recipe.recommended_plan(8, 11_959, 10)`, checked by
    tests/test_recipe.py): DP-FedSGD on `scatter_synth_inv_cc_ms4p_lf_cells_hed_bw_64`'s fixed features (64-px
    images in a canonical lamp and focus, seen at 28 and 64 px: wavelet scattering of the stains' densities, weighed
    three times, beside the procedural encoder trained on cell-like scenes and to ignore microscope looks; the cell
    check), 500 rounds, distributed DP at ε = 8 per site for 10 sites holding BloodMNIST's 11,959 training images
    between them."""

    federation_id: str = "bloodmnist-demo"
    model: str = "scatter_synth_inv_cc_ms4p_lf_cells_hed_bw_64"
    # the images' side in pixels; 0 (the default): the model's own (`model_input_size`), so a plan that names a model
    # never disagrees with it unless it says so
    input_size: int = 0
    classes: tuple[str, ...] = BLOODMNIST_CLASSES
    rounds: int = 500
    local_epochs: int = 1
    # fedavg: each site's expected local batch; fedsgd: the expected batch over the whole federation, q·ΣN from
    # the sizes the sites declared, which the server divides the noisy sum by (a public constant, so no record
    # count need leave a site)
    batch_size: int = 2049
    lr: float = 0.1  # fedavg: the sites' local learning rate
    momentum: float = 0.9
    clip_norm: float = 1.0
    update_clip: float = 1.0  # secure aggregation clips each update coordinate to ±update_clip
    max_weight: int = 1 << 20  # largest sample count a site may report inside the masked sum
    delta: float = 1e-5
    dp: bool = True
    secagg: bool = True
    threshold: int = default_threshold(10)
    min_sites: int = default_threshold(10)
    max_sites: int = 10
    server_optimizer: str = "fedavg"  # fedavg plans: "fedavg" | "fedadam"
    server_lr: float = 0.5  # the recipe's min(1, 1.3/σ) for the default model and σ (core.learning.recipe)
    # "fedsgd": one Poisson-sampled DP-SGD step per round at rate `sample_rate` (the same q for every record at
    # every site), the server steps with momentum `momentum` at `server_lr`; "fedavg": local epochs per round
    algorithm: str = "fedsgd"
    sample_rate: float = 0.1713  # fedsgd: Poisson rate q per record (≈ 2,048 of 11,959 images per round)
    # "local": each site adds the full noise σ·C to what it sends (trusts no one); "distributed": each site
    # adds a Skellam share σ²Δ²/(t − dp_colluders) inside secure aggregation (core.privacy.distributed_noise)
    dp_mode: str = "distributed"
    dp_colluders: int = 1  # distributed: shares discounted for collusion (1: each site knows its own share)
    # fedsgd: σ common to all sites (0: each site calibrates its own, fedavg with local DP only); the default is
    # what spends ε = 8 over the default's rounds at δ = 1e-5
    noise_multiplier: float = 2.59765625
    ema: float = 0.0  # fedsgd: EMA decay of the released weights (post-processing, no privacy cost)
    # fedsgd, a head centred by the features' average (`CenteredLinear`): the first rounds send noisy sums of the
    # sampled records' features instead of gradients, and their average is the centre; this many of them (at most a
    # tenth of the rounds, at least one: `center_rounds_used`). Each is clipped, noised and accounted as a training
    # round: the same ε, spent on a less noisy centre (docs/accuracy-levers.md, fourteenth pass).
    center_rounds: int = 10
    val_fraction: float = 0.1
    train_timeout_s: float = 1800.0
    stage_timeout_s: float = 120.0
    join_timeout_s: float = 600.0
    # how long the first round waits for a site that is connected and still preparing (computing its images'
    # fixed features) once the join time-out has passed
    prepare_timeout_s: float = 1800.0
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))
        if self.input_size == 0:
            object.__setattr__(self, "input_size", model_input_size(self.model))
        problems = self.problems()
        if problems:
            raise PlanError("invalid federation plan: " + "; ".join(problems))

    def problems(self) -> list[str]:
        out = []
        if not self.federation_id or len(self.federation_id) > 64 or not all(
            c.isalnum() or c in "-_." for c in self.federation_id
        ):
            out.append("federation_id must be 1-64 characters of letters, digits, '-', '_', '.'")
        for name in ("rounds", "local_epochs", "batch_size", "input_size", "min_sites", "max_sites"):
            if getattr(self, name) < 1:
                out.append(f"{name} must be at least 1")
        for name in ("lr", "clip_norm", "update_clip", "server_lr", "train_timeout_s", "stage_timeout_s",
                     "join_timeout_s", "prepare_timeout_s"):
            if not getattr(self, name) > 0:
                out.append(f"{name} must be positive")
        if not 0 < self.delta < 1:
            out.append("delta must be in (0, 1)")
        if not 0 <= self.momentum < 1:
            out.append("momentum must be in [0, 1)")
        if not 0 < self.val_fraction < 0.5:
            out.append("val_fraction must be in (0, 0.5)")
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            out.append("classes must be at least two distinct names")
        if self.server_optimizer not in ("fedavg", "fedadam"):
            out.append("server_optimizer must be 'fedavg' or 'fedadam'")
        if self.algorithm not in ("fedavg", "fedsgd"):
            out.append("algorithm must be 'fedavg' or 'fedsgd'")
        if self.dp_mode not in ("local", "distributed"):
            out.append("dp_mode must be 'local' or 'distributed'")
        if not 0 <= self.sample_rate <= 1:
            out.append("sample_rate must be in [0, 1]")
        if self.algorithm == "fedsgd" and self.sample_rate <= 0:
            out.append("a fedsgd plan needs a sample_rate q in (0, 1]")
        if self.algorithm == "fedsgd" and not (self.dp and self.secagg):
            out.append("algorithm 'fedsgd' runs with differential privacy and secure aggregation on; a "
                       "non-private or plain-aggregation baseline uses algorithm 'fedavg'")
        if not 0 <= self.ema < 1:
            out.append("ema must be in [0, 1)")
        if self.center_rounds < 1:
            out.append("center_rounds must be at least 1")
        if self.noise_multiplier < 0:
            out.append("noise_multiplier must be ≥ 0")
        if self.dp and self.dp_mode == "distributed":
            if not self.secagg:
                out.append("distributed DP needs secure aggregation (the noise is only complete in the sum)")
            if self.algorithm != "fedsgd" or self.noise_multiplier <= 0:
                out.append("distributed DP needs algorithm 'fedsgd' and a plan-wide noise_multiplier > 0 "
                           "(every site's share must be of the same σ)")
            if not 0 <= self.dp_colluders < self.threshold:
                out.append("dp_colluders must be in [0, threshold)")
        if self.secagg and not 2 <= self.threshold <= self.max_sites:
            out.append("threshold t must be between 2 and max_sites")
        if self.min_sites > self.max_sites:
            out.append("min_sites cannot exceed max_sites")
        if self.secagg and self.min_sites < self.threshold:
            out.append("min_sites must be at least the secure-aggregation threshold t")
        return out

    @property
    def center_rounds_used(self) -> int:
        """How many first rounds estimate a centred head's centre: `center_rounds`, at most a tenth of the rounds,
        at least 1."""
        return max(1, min(self.center_rounds, self.rounds // 10))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["classes"] = list(self.classes)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FederationPlan:
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise PlanError(f"unknown plan fields: {', '.join(unknown)}")
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            default = known[key].default
            expected = type(default)
            if key == "classes":
                if not isinstance(value, list | tuple) or not all(isinstance(c, str) for c in value):
                    raise PlanError("classes must be a list of names")
                value = tuple(value)
            elif expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            elif not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise PlanError(f"plan field {key} must be {expected.__name__}, got {type(value).__name__}")
            kwargs[key] = value
        return cls(**kwargs)

    def secagg_config(self, dim: int) -> secagg.SecAggConfig:
        """The secure-aggregation parameters every site and the aggregator derive from this plan for a model of
        `dim` parameters (they must agree exactly). The extras: the validation confusion counts, then the
        validation NLL sums at each temperature of `CALIBRATION_GRID` (core.learning.confidence), then the cell check's
        validation counts above each edge of `CELL_SCORE_EDGES` (core.learning.cell_check)."""
        k = len(self.classes)
        return secagg.SecAggConfig(federation_id=self.federation_id, threshold=self.threshold, dim=dim,
                                   n_extras=k * k + len(CALIBRATION_GRID) + len(CELL_SCORE_EDGES),
                                   clip=self.update_clip, max_sites=self.max_sites,
                                   max_weight=self.max_weight)

    def digest(self) -> str:
        """A short hash sites and the aggregator compare to be sure they run the same plan."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class SiteBounds:
    """What a hospital's operator accepts; a plan outside these is refused before joining."""

    require_dp: bool = True
    require_secagg: bool = True
    # True: this hospital adds the full noise itself and refuses a distributed-DP plan (whose guarantee
    # rests on the other hospitals' shares and the aggregator's semi-honesty)
    require_local_dp: bool = False
    min_threshold: int = 2
    max_rounds: int = 1000  # DP-FedSGD plans run hundreds of one-step rounds; the ε budget is the real limit
    max_local_epochs: int = 10
    max_delta: float = 1e-4
    max_clip_norm: float = 10.0
    models: tuple[str, ...] = field(default=())  # empty: any registered model

    def violations(self, plan: FederationPlan) -> list[str]:
        out = []
        if self.require_dp and not plan.dp:
            out.append("the plan turns differential privacy off")
        if self.require_secagg and not plan.secagg:
            out.append("the plan turns secure aggregation off")
        if self.require_local_dp and plan.dp and plan.dp_mode != "local":
            out.append(f"the plan uses {plan.dp_mode} DP; this site requires local DP (it adds the full noise "
                       "itself)")
        if plan.secagg and plan.threshold < self.min_threshold:
            out.append(f"threshold t={plan.threshold} is below the accepted minimum {self.min_threshold}")
        if plan.rounds > self.max_rounds:
            out.append(f"{plan.rounds} rounds exceed the accepted {self.max_rounds}")
        if plan.local_epochs > self.max_local_epochs:
            out.append(f"{plan.local_epochs} local epochs exceed the accepted {self.max_local_epochs}")
        if plan.delta > self.max_delta:
            out.append(f"delta={plan.delta:g} exceeds the accepted {self.max_delta:g}")
        if plan.clip_norm > self.max_clip_norm:
            out.append(f"clip norm {plan.clip_norm:g} exceeds the accepted {self.max_clip_norm:g}")
        if self.models and plan.model not in self.models:
            out.append(f"model {plan.model!r} is not in the accepted list")
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SiteBounds:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PlanError(f"unknown bounds fields: {', '.join(unknown)}")
        if "models" in data:
            data = {**data, "models": tuple(data["models"])}
        return cls(**data)


def load_toml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PlanError(f"cannot read {path}: {exc}") from exc
