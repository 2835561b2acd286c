"""Regression tests for the attacks of issue 10 that used to end the aggregator process.

Each one is carried out over real TLS websockets on loopback by a hand-written peer
holding a key the federation allows (or none at all), next to real sites whose
round must still complete: a hostile peer costs only its own connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from fedharness import make_federation, run
from hostile import error_code, join_and_attack, raw_session

from hemafed.core.rounds.plan import SiteBounds
from hemafed.core.secagg.messages import MAGIC, SCHEMA_VERSION
from hemafed.network import protocol as P
from hemafed.network.config import render_toml
from hemafed.network.envelope import Envelope

pytestmark = pytest.mark.slow


def _secagg_blob_with_huge_int(rnd: int) -> bytes:
    """A secure-aggregation message whose JSON header holds an integer of 5,000 digits."""
    digits = "1" + "0" * 5000
    head = (f'{{"type":"secagg.advertise_keys","round":{rnd},"site_id":{digits},"c_pk":"","s_pk":"",'
            f'"signature":""}}').encode()
    return MAGIC + struct.pack("<BI", SCHEMA_VERSION, len(head)) + head


def _raw_envelope(kind: str, rnd: int, body_json: str, blobs: tuple[bytes, ...] = ()) -> bytes:
    """An envelope written by hand, so the body can hold what `Envelope` itself would never encode."""
    lengths = json.dumps([len(b) for b in blobs])
    header = f'{{"v":1,"type":"{kind}","round":{rnd},"body":{body_json},"blobs":{lengths}}}'.encode()
    return struct.pack(">I", len(header)) + header + b"".join(blobs)


def test_secure_federation_survives_malformed_bodies_and_forged_log_lines(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # site4 and site5 are allowed keys with no real site behind them: the attackers. The first round
    # waits for every site that has not refused the plan (site5 ends refused), so it starts once the
    # three real sites and site4 are in; the long join time-out keeps a slow machine from starting it
    # without them (that round would be abandoned and the late site left knocking on a closed server).
    fed = make_federation(tmp_path, n_sites=3, threshold=3, rounds=1, extra_sites=2, join_timeout_s=120.0)
    codes: dict[str, str | None] = {}
    forged = "fine\n2026-01-01 00:00:00 INFO hemafed.network.aggregator: site1 accepted the plan\x1b[2K"

    async def plan_phase() -> None:
        insider = fed.identities["site5"]
        attacks = {
            "reasons not a list": _raw_envelope(P.PLAN_REJECT, 0, '{"reasons":5}'),
            "reasons of numbers": _raw_envelope(P.PLAN_REJECT, 0, '{"reasons":[1,2]}'),
            "huge int in a body": _raw_envelope(P.PLAN_ACCEPT, 0, '{"digest":1%s}' % ("0" * 5000)),
            "1e400 in a body": _raw_envelope(P.DECLINE, 0, '{"reason":1e400}'),
            "unknown field": _raw_envelope(P.DECLINE, 0, '{"reason":"x","extra":1}'),
        }
        for name, data in attacks.items():
            async with raw_session(fed.url, insider, fed.ca) as ws:
                await ws.recv()  # the plan
                await ws.send(data)
                codes[name] = await error_code(ws)
        # A well-formed refusal whose text tries to forge a log line: accepted, but escaped in the log.
        async with raw_session(fed.url, insider, fed.ca) as ws:
            await ws.recv()
            await ws.send(Envelope(P.PLAN_REJECT, 0, {"reasons": [forged]}).encode())
            await asyncio.sleep(0.5)

    async def main() -> None:
        agg_task = await fed.start_aggregator()
        attacker = asyncio.create_task(join_and_attack(
            fed.url, fed.identities["site4"], fed.ca,
            lambda env: Envelope(P.SECAGG, env.round, {}, (_secagg_blob_with_huge_int(env.round),)).encode()))
        await plan_phase()
        sites = [fed.start_site(n) for n in fed.site_configs]
        codes["secagg header with a 5,000-digit int"] = await attacker
        await agg_task
        await asyncio.gather(*sites)

    with caplog.at_level(logging.INFO):
        run(main())
    assert codes == {"reasons not a list": "malformed", "reasons of numbers": "malformed",
                     "huge int in a body": "malformed", "1e400 in a body": "malformed",
                     "unknown field": "malformed", "secagg header with a 5,000-digit int": "malformed"}
    (outcome,) = fed.aggregator.outcomes
    assert outcome.status == "completed" and outcome.survivors == ["site1", "site2", "site3"]
    assert "site4" in outcome.dropouts
    refusals = [r.getMessage() for r in caplog.records if "refused the plan" in r.getMessage()]
    assert refusals and all("\n" not in m and "\x1b" not in m for m in refusals)
    assert any("fine\\x0a2026-01-01" in m for m in refusals)
    assert not any(r.getMessage().startswith("2026-01-01") for r in caplog.records)
    assert all("\n" not in r.getMessage() for r in caplog.records if r.name.startswith("hemafed.network"))


def test_plain_federation_refuses_weights_out_of_bounds(tmp_path: Path) -> None:
    """Plain mode: 10**400 used to overflow, a negative weight used to scale the average."""
    fed = make_federation(tmp_path, n_sites=2, threshold=2, rounds=1, extra_sites=3, secagg=False, dp=False,
                          join_timeout_s=120.0)  # round 1 starts once all five are in, never without them
    for name, cfg in fed.site_configs.items():
        fed.site_configs[name] = replace(cfg, bounds=SiteBounds(require_dp=False, require_secagg=False))
    k2 = len(fed.plan.classes) ** 2

    def update(weight: str):
        def attack(env: Envelope) -> bytes:
            dim = len(env.blobs[0]) // 4
            blobs = (np.zeros(dim, "<f4").tobytes(), np.zeros(k2, "<i8").tobytes())
            return _raw_envelope(P.PLAIN_UPDATE, env.round, f'{{"weight":{weight}}}', blobs)
        return attack

    attacks = {"site3": "1" + "0" * 400, "site4": "-1", "site5": str(fed.plan.max_weight + 1)}

    async def main() -> dict[str, str | None]:
        agg_task = await fed.start_aggregator()
        attackers = {name: asyncio.create_task(join_and_attack(fed.url, fed.identities[name], fed.ca,
                                                               update(w))) for name, w in attacks.items()}
        await asyncio.sleep(0.3)
        sites = [fed.start_site(n) for n in fed.site_configs]
        codes = {name: await task for name, task in attackers.items()}
        await agg_task
        await asyncio.gather(*sites)
        return codes

    codes = run(main())
    assert codes == {"site3": "malformed", "site4": "malformed", "site5": "malformed"}
    (outcome,) = fed.aggregator.outcomes
    assert outcome.status == "completed" and outcome.survivors == ["site1", "site2"]
    assert np.isfinite(outcome.mean_update).all()


def _open_idle(port: int, n: int, sources: list[str]) -> list[socket.socket]:
    """`n` TCP connections that never say a word, spread over loopback source addresses."""
    socks = []
    for i in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind((sources[i % len(sources)], 0))
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        socks.append(s)
    return socks


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts descriptors in /proc (Linux)")
def test_idle_connection_flood_under_a_low_open_file_limit(tmp_path: Path) -> None:
    """~2.5× as many idle TCP connections as the aggregator process may open files: it must refuse
    them at accept(), keep descriptors for its own files, and then run the round."""
    limit, flood = 160, 400
    fed = make_federation(tmp_path, n_sites=2, threshold=2, rounds=1, join_timeout_s=30.0)
    agg = fed.agg_config
    toml = tmp_path / "federation.toml"
    toml.write_text(render_toml({
        "federation": {"cert": str(agg.cert), "key": str(agg.key), "state_dir": str(agg.state_dir), "linger_s": 0,
                       "host": "127.0.0.1", "port": 0, "port_file": str(tmp_path / "port")},
        "plan": fed.plan.to_dict(), "sites": agg.sites}))
    code = (f"import resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, ({limit}, {limit})); "
            f"from hemafed.network.node import main; sys.exit(main(['aggregator', '--config', {str(toml)!r}]))")
    log_path = tmp_path / "aggregator.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "port").exists():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        port = int((tmp_path / "port").read_text())
        socks = _open_idle(port, flood, [f"127.0.0.{i}" for i in range(2, 10)])
        time.sleep(1.5)
        fds = len(os.listdir(f"/proc/{proc.pid}/fd"))
        assert proc.poll() is None, log_path.read_text()
        assert fds < limit - 32, f"{fds} descriptors open under a limit of {limit}"
        for s in socks:
            s.close()

        async def sites() -> None:
            fed.aggregator = None
            tasks = []
            for name in fed.site_configs:
                from hemafed.network.site import SiteRunner

                cfg = replace(fed.site_configs[name], aggregator=f"wss://127.0.0.1:{port}")
                tasks.append(asyncio.create_task(SiteRunner(cfg, identity=fed.identities[name]).run()))
            await asyncio.gather(*tasks)

        run(sites())
        assert proc.wait(timeout=60) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log_path.read_text()
    assert "refusing connections" in text
    assert "Too many open files" not in text
    rounds = [json.loads(line) for line in (agg.state_dir / "checkpoints" / "rounds.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rounds] == ["completed"]
