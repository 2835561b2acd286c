"""A hand-written hostile peer over real TLS websockets: authenticates with a key the
federation allows, then sends whatever bytes a test wants, at whatever stage."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from hemafed.core.trust.identity import IdentityKey
from hemafed.network import handshake
from hemafed.network import protocol as P
from hemafed.network.envelope import Envelope, Limits
from hemafed.network.tls import cert_binding, client_context

LIMITS = Limits.for_model(1_000_000)


@contextlib.asynccontextmanager
async def raw_session(url: str, identity: IdentityKey, ca: Path, *,
                      max_queue: int | None = 16) -> AsyncIterator[ClientConnection]:
    """An authenticated connection that sends whatever bytes the test wants."""
    async with connect(url, ssl=client_context(ca), compression=None, max_size=None, max_queue=max_queue) as ws:
        hello = Envelope.decode(await ws.recv(), LIMITS)
        binding = cert_binding(ws.transport.get_extra_info("ssl_object").getpeercert(binary_form=True))
        await ws.send(handshake.answer(hello, identity, binding).encode())
        assert Envelope.decode(await ws.recv(), LIMITS).type == "welcome"
        yield ws


async def error_code(ws: ClientConnection) -> str | None:
    """The code of the error envelope the aggregator sends before closing (None: closed without one)."""
    code = None
    try:
        while True:
            env = Envelope.decode(await ws.recv(), LIMITS)
            if env.type == "error":
                code = env.body["code"]
    except ConnectionClosed as exc:
        if code is None and exc.rcvd is not None and exc.rcvd.code == 1009:
            code = "too_large"
    return code


async def join_and_attack(url: str, identity: IdentityKey, ca: Path,
                          attack: Callable[[Envelope], bytes]) -> str | None:
    """Accept the plan like a real site, wait for round_start, send `attack(round_start)`; the error code."""
    async with raw_session(url, identity, ca) as ws:
        while True:
            env = Envelope.decode(await ws.recv(), LIMITS)
            if env.type == P.PLAN:
                await ws.send(Envelope(P.PLAN_ACCEPT, 0, {"digest": env.body["digest"]}).encode())
            elif env.type == P.ROUND_START:
                await ws.send(attack(env))
                return await error_code(ws)
