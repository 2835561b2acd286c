"""Isolation and resource caps of the aggregator's transport, over real loopback TLS.

A site that stops reading is dropped after the send deadline without holding up a
broadcast to the others; idle unauthenticated TCP connections are refused at
accept() beyond the caps (per address and in all), and never keep a legitimate
site from a different address out.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable
from typing import TypeVar

import pytest
from websockets.asyncio.client import connect

from hemafed.core.trust.certs import create_federation_certs
from hemafed.core.trust.identity import IdentityKey
from hemafed.network import handshake
from hemafed.network.client import Backoff, SiteClient
from hemafed.network.envelope import Envelope, Limits
from hemafed.network.server import AggregatorServer, Connected, Disconnected
from hemafed.network.tls import ServerTLS, cert_binding, client_context

T = TypeVar("T")
LIMITS = Limits(max_message=2 << 20, max_header=8 << 10, max_blobs=4)
FAST = Backoff(initial=0.05, factor=2.0, max_delay=0.2, retry_for=5.0)


def run(coro: Awaitable[T], timeout: float = 30) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory):
    return create_federation_certs(tmp_path_factory.mktemp("certs"), ["127.0.0.1"])


def _server(certs, keys: dict[str, IdentityKey], **kw: object) -> AggregatorServer:
    return AggregatorServer({n: k.public_line() for n, k in keys.items()},
                            tls=ServerTLS(certs.cert_file, certs.key_file), limits=LIMITS,
                            handshake_timeout=2.0, **kw)  # type: ignore[arg-type]


async def _next(server: AggregatorServer, kind: type, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while True:
        event = await server.recv(timeout=max(deadline - time.monotonic(), 0.01))
        if isinstance(event, kind):
            return event


def test_a_site_that_stops_reading_does_not_stall_a_broadcast(certs) -> None:
    good, stuck = IdentityKey.generate(), IdentityKey.generate()
    blob = bytes(1 << 20)
    n_messages = 40  # 40 MiB: far beyond what socket buffers hold for a peer that does not read

    async def main() -> None:
        async with _server(certs, {"good": good, "stuck": stuck}, send_timeout=1.0) as server:
            url = server.url
            # The stuck site authenticates, then never reads again (and buffers at most one frame).
            async with connect(url, ssl=client_context(certs.ca_file), compression=None, max_size=None,
                               max_queue=1) as ws:
                ws.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                hello = Envelope.decode(await ws.recv(), LIMITS)
                binding = cert_binding(ws.transport.get_extra_info("ssl_object").getpeercert(binary_form=True))
                await ws.send(handshake.answer(hello, stuck, binding).encode())
                await ws.recv()  # welcome
                async with SiteClient(url, good, ca_file=str(certs.ca_file), limits=LIMITS, backoff=FAST) as client:
                    await client.connect()
                    assert {(await _next(server, Connected)).site for _ in range(2)} == {"good", "stuck"}
                    started = time.monotonic()
                    for i in range(n_messages):
                        reached = await server.broadcast(Envelope("weights", i, {}, (blob,)))
                        assert "good" in reached
                    queued_in = time.monotonic() - started
                    for i in range(n_messages):
                        assert (await client.recv(timeout=10)).round == i
                    received_in = time.monotonic() - started
                    gone = await _next(server, Disconnected, timeout=10)
                    assert gone.site == "stuck"
                    assert server.connected() == {"good"}
        assert queued_in < 0.5, f"broadcasting took {queued_in:.2f} s"
        assert received_in < 8.0

    run(main())


def _idle(port: int, n: int, source: str) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind((source, 0))
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        socks.append(s)
    return socks


def test_idle_connections_are_capped_per_address_and_in_all(certs) -> None:
    good = IdentityKey.generate()

    async def main() -> None:
        async with _server(certs, {"good": good}, max_unauthenticated=12,
                           max_unauthenticated_per_address=5) as server:
            flood = _idle(server.port, 40, "127.0.0.2")
            await asyncio.sleep(0.5)
            assert server.gate.pending == 5 and server.gate.refused >= 35
            # A site from another address still gets in, and then no longer counts as unauthenticated.
            async with SiteClient(server.url, good, ca_file=str(certs.ca_file), limits=LIMITS,
                                  backoff=FAST) as client:
                await client.connect()
                assert (await _next(server, Connected)).site == "good"
                assert server.gate.pending == 5
                flood += _idle(server.port, 40, "127.0.0.3") + _idle(server.port, 40, "127.0.0.4")
                await asyncio.sleep(0.5)
                assert server.gate.pending == 12  # the total cap
            for s in flood:
                s.close()
            # Closed connections leave the count (the server notices within the handshake time-out).
            deadline = time.monotonic() + 5
            while server.gate.pending and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert server.gate.pending == 0

    run(main())


def test_the_open_file_soft_limit_is_raised_at_start(certs) -> None:
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = min(soft, 256)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
    try:
        async def main() -> int:
            async with _server(certs, {"x": IdentityKey.generate()}):
                return resource.getrlimit(resource.RLIMIT_NOFILE)[0]

        raised = run(main())
        want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
        assert raised == max(want, lowered)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
