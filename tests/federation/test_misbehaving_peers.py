"""A running federation refuses strangers, forgers and malformed or out-of-place
messages, each with a clear error, and finishes its rounds regardless."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from fedharness import make_federation, run
from forger import Forger
from hostile import LIMITS, error_code, raw_session

from hemafed.core.rounds.plan import SiteBounds
from hemafed.core.trust.identity import IdentityKey
from hemafed.network import protocol as P
from hemafed.network.client import Backoff, SiteClient
from hemafed.network.envelope import Envelope
from hemafed.network.errors import AuthenticationRefused
from hemafed.network.site import SiteRunner

pytestmark = pytest.mark.slow

def test_federation_carries_on_through_bad_peers(tmp_path: Path) -> None:
    # site4's key is allowed but no real site uses it: the test misbehaves with it
    fed = make_federation(tmp_path, n_sites=3, threshold=3, rounds=2, extra_sites=1, join_timeout_s=3.0)
    codes: dict[str, str | None] = {}

    async def attack() -> None:
        url, ca = fed.url, fed.ca
        stranger = SiteClient(url, IdentityKey.generate(), ca_file=ca, backoff=Backoff(retry_for=1))
        with pytest.raises(AuthenticationRefused) as info:
            await stranger.connect()
        codes["unknown key"] = info.value.error_code
        forger = Forger(IdentityKey.generate().private_key, claimed=fed.identities["site1"].public_key)
        with pytest.raises(AuthenticationRefused) as info:
            await SiteClient(url, forger, ca_file=ca, backoff=Backoff(retry_for=1)).connect()
        codes["bad signature"] = info.value.error_code
        insider = fed.identities["site4"]
        async with raw_session(url, insider, ca) as ws:
            await ws.send(b"\x00\x00\x00\x05{nope")
            codes["malformed"] = await error_code(ws)
        async with raw_session(url, insider, ca) as ws:
            await ws.send(Envelope(P.SECAGG, 1, {}, (b"\x00" * (LIMITS.max_message + 16),)).encode())
            codes["oversized"] = await error_code(ws)
        async with raw_session(url, insider, ca) as ws:
            await ws.send(Envelope(P.DECLINE, 99, {"reason": "none"}).encode())
            codes["wrong round"] = await error_code(ws)

    async def main() -> None:
        agg_task = await fed.start_aggregator()
        sites = [fed.start_site(n) for n in fed.site_configs]
        await attack()
        await agg_task
        await asyncio.gather(*sites)

    run(main())
    assert codes == {"unknown key": "unknown_key", "bad signature": "bad_signature", "malformed": "malformed",
                     "oversized": "too_large", "wrong round": "unexpected"}
    outcomes = fed.aggregator.outcomes
    assert [o.status for o in outcomes] == ["completed", "completed"]
    assert all(o.survivors == ["site1", "site2", "site3"] for o in outcomes)


class PoisonedSite(SiteRunner):
    """A participant whose update is NaN (a bug or an attack)."""

    def _contribution(self, rnd, weights, progress):
        result = super()._contribution(rnd, weights, progress)
        result.update[:] = np.nan
        return result


def test_plain_aggregation_refuses_a_non_finite_update(tmp_path: Path) -> None:
    """Without secure aggregation the aggregator reads updates itself: NaN is refused, not summed."""
    fed = make_federation(tmp_path, n_sites=3, threshold=2, rounds=1, secagg=False, dp=False)
    for name, cfg in fed.site_configs.items():
        fed.site_configs[name] = replace(cfg, bounds=SiteBounds(require_dp=False, require_secagg=False))

    async def main() -> None:
        agg_task = await fed.start_aggregator()
        tasks = [fed.start_site(n, cls=PoisonedSite if n == "site3" else SiteRunner) for n in fed.site_configs]
        await agg_task
        await asyncio.gather(*tasks[:2])
        tasks[2].cancel()

    run(main())
    (outcome,) = fed.aggregator.outcomes
    assert outcome.status == "completed" and outcome.survivors == ["site1", "site2"]
    assert outcome.dropouts == ["site3"]
    assert np.isfinite(outcome.mean_update).all()
