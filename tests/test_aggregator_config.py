"""The aggregator's resource caps in federation.toml: defaults, values, and refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from hemafed.core.identity import IdentityKey
from hemafed.core.plan import FederationPlan, PlanError
from hemafed.network.config import AggregatorConfig, render_toml


def _write(tmp_path: Path, **federation: object) -> Path:
    path = tmp_path / "federation.toml"
    path.write_text(render_toml({"federation": {"insecure": True, **federation},
                                 "plan": FederationPlan(threshold=2, min_sites=2).to_dict(),
                                 "sites": {"a": IdentityKey.generate().public_line()}}))
    return path


def test_caps_default_and_can_be_set(tmp_path: Path) -> None:
    cfg = AggregatorConfig.load(_write(tmp_path))
    assert cfg.server_options() == {"max_unauthenticated": 256, "max_unauthenticated_per_address": 32,
                                    "send_timeout": 60.0}
    cfg = AggregatorConfig.load(_write(tmp_path, max_unauthenticated=64, max_unauthenticated_per_address=4,
                                       send_timeout_s=5))
    assert cfg.server_options() == {"max_unauthenticated": 64, "max_unauthenticated_per_address": 4,
                                    "send_timeout": 5.0}


@pytest.mark.parametrize("field,value", [("max_unauthenticated", 0), ("max_unauthenticated_per_address", -1),
                                         ("send_timeout_s", "fast"), ("max_unauthenticated", True)])
def test_bad_caps_are_refused_with_the_field_named(tmp_path: Path, field: str, value: object) -> None:
    with pytest.raises(PlanError, match=field):
        AggregatorConfig.load(_write(tmp_path, **{field: value}))
