"""An in-process federation over real loopback websockets with real TLS, for tests."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from hemafed.core.rounds.plan import FederationPlan
from hemafed.core.trust.certs import create_federation_certs
from hemafed.core.trust.identity import IdentityKey, init_identity
from hemafed.network.aggregator import Aggregator
from hemafed.network.config import AggregatorConfig, SiteConfig
from hemafed.network.site import SiteRunner


class SimulatedCrash(Exception):
    """Raised inside a site instead of killing the process."""


def _crash() -> None:
    raise SimulatedCrash


@dataclass
class Federation:
    root: Path
    plan: FederationPlan
    agg_config: AggregatorConfig
    site_configs: dict[str, SiteConfig]
    identities: dict[str, IdentityKey]
    ca: Path
    aggregator: Aggregator | None = None
    runners: dict[str, SiteRunner] = field(default_factory=dict)

    async def start_aggregator(self, cls: type[Aggregator] = Aggregator, port: int | None = None) -> asyncio.Task:
        """The aggregator on `port` (default: the config's, 0 unless a test fixed one)."""
        self.aggregator = cls(replace(self.agg_config, port=self.agg_config.port if port is None else port))
        task = asyncio.create_task(self.aggregator.run())
        await asyncio.wait_for(self.aggregator.listening.wait(), 120)
        return task

    @property
    def url(self) -> str:
        assert self.aggregator is not None and self.aggregator.server is not None
        return self.aggregator.server.url

    def start_site(self, name: str, die_at: tuple[int, str] | None = None,
                   cls: type[SiteRunner] = SiteRunner) -> asyncio.Task:
        cfg = replace(self.site_configs[name], aggregator=self.url)
        runner = cls(cfg, identity=self.identities[name], die_at=die_at, on_die=_crash)
        self.runners[name] = runner
        return asyncio.create_task(runner.run(), name=name)


def make_federation(root: Path, n_sites: int, threshold: int, rounds: int, *, images_per_site: int = 64,
                    extra_sites: int = 0, **plan_overrides: Any) -> Federation:
    certs = create_federation_certs(root / "tls", ["127.0.0.1"])
    settings: dict[str, Any] = {
        "federation_id": "test-fed", "model": "cnn4_28",
                "algorithm": "fedavg", "dp_mode": "local", "noise_multiplier": 0.0, "rounds": rounds,
                "batch_size": 16, "lr": 0.1,
        "threshold": threshold, "min_sites": threshold, "max_sites": max(n_sites + extra_sites, 2),
        "max_weight": 4096, "update_clip": 1.0, "train_timeout_s": 120.0, "stage_timeout_s": 30.0,
        "join_timeout_s": 5.0}
    plan = FederationPlan(**(settings | plan_overrides))
    rng = np.random.default_rng(0)
    keys, configs, identities = {}, {}, {}
    for i in range(1, n_sites + extra_sites + 1):
        name = f"site{i}"
        state = root / name
        identities[name] = init_identity(state)
        keys[name] = identities[name].public_line(name)
        if i > n_sites:
            continue  # an allowed key with no site behind it (tests use it to misbehave)
        data = state / "data.npz"
        labels = np.arange(images_per_site) % len(plan.classes)
        images = rng.integers(0, 255, (images_per_site, 28, 28, 3), dtype=np.uint8)
        images[..., 0] = (labels * 30)[:, None, None]  # a learnable colour cue
        np.savez(data, train_images=images, train_labels=labels.reshape(-1, 1))
        configs[name] = SiteConfig(data=data, state_dir=state, aggregator="", epsilon=30.0,
                                   federation=plan.federation_id, ca_file=certs.ca_file)
    agg = AggregatorConfig(plan=plan, sites=keys, state_dir=root / "aggregator", host="127.0.0.1", port=0, linger_s=0,
                           cert=certs.cert_file, key=certs.key_file)
    return Federation(root, plan, agg, configs, identities, certs.ca_file)


def run(coro: Any, timeout: float = 240) -> Any:
    async def guarded() -> Any:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(guarded())


def weighted_mean(updates: dict[str, np.ndarray], weights: dict[str, int], clip: float) -> np.ndarray:
    total = sum(weights.values())
    return sum(np.clip(updates[s].astype(np.float64), -clip, clip) * weights[s] for s in updates) / total
