"""The transport over real loopback websockets with real TLS: no mocks.

Every refusal test keeps a well-behaved site connected and checks it still works
afterwards: a misbehaving peer costs only its own connection.

Tests drive asyncio with `asyncio.run` (no pytest-asyncio).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
from forger import Forger
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from hemafed.core.trust.certs import create_federation_certs
from hemafed.core.trust.identity import IdentityKey
from hemafed.network import handshake
from hemafed.network.client import Backoff, SiteClient
from hemafed.network.envelope import Envelope, Limits
from hemafed.network.errors import (
    AuthenticationRefused,
    CertificateRejected,
    ConnectFailed,
    ConnectionLost,
    NotConnected,
    PeerError,
    ReceiveTimeout,
    UnexpectedMessage,
)
from hemafed.network.server import AggregatorServer, Connected, Disconnected, Message
from hemafed.network.tls import ServerTLS, cert_binding, client_context

T = TypeVar("T")
FAST = Backoff(initial=0.05, factor=2.0, max_delay=0.2, retry_for=5.0)
LIMITS = Limits(max_message=64 << 10, max_header=8 << 10, max_blobs=4)


def run(coro: Awaitable[T], timeout: float = 20) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


@dataclass
class Fed:
    ca: Path
    tls: ServerTLS
    good: IdentityKey
    other: IdentityKey

    def server(self, **kw: object) -> AggregatorServer:
        kw.setdefault("limits", LIMITS)
        kw.setdefault("handshake_timeout", 2.0)
        allowed = {"good": self.good.public_line(), "other": self.other.public_line()}
        return AggregatorServer(allowed, tls=self.tls, **kw)  # type: ignore[arg-type]

    def client(self, server: AggregatorServer, identity: IdentityKey, **kw: object) -> SiteClient:
        kw.setdefault("limits", LIMITS)
        kw.setdefault("backoff", FAST)
        return SiteClient(server.url, identity, ca_file=str(self.ca), **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Fed:
    made = create_federation_certs(tmp_path_factory.mktemp("certs"), ["127.0.0.1", "localhost"])
    return Fed(made.ca_file, ServerTLS(made.cert_file, made.key_file), IdentityKey.generate(), IdentityKey.generate())


async def expect(server: AggregatorServer, kind: type[T], timeout: float = 5) -> T:
    event = await server.recv(timeout)
    assert isinstance(event, kind), event
    return event


async def still_works(server: AggregatorServer, client: SiteClient, site: str = "good") -> None:
    """The well-behaved site can still talk both ways."""
    await client.send(Envelope("update", 3, {"ok": True}, (b"\x01\x02",)))
    msg = await expect(server, Message)
    assert msg.site == site and msg.envelope.blobs == (b"\x01\x02",)
    await server.send(site, Envelope("plan", 4))
    assert (await client.recv(5)).type == "plan"


@contextlib.asynccontextmanager
async def raw_session(server: AggregatorServer, identity: IdentityKey, ca: Path) -> AsyncIterator[ClientConnection]:
    """A hand-driven, authenticated connection that can send whatever bytes a test wants."""
    async with connect(server.url, ssl=client_context(ca), compression=None) as ws:
        hello = Envelope.decode(await ws.recv(), LIMITS)
        binding = cert_binding(ws.transport.get_extra_info("ssl_object").getpeercert(binary_form=True))
        await ws.send(handshake.answer(hello, identity, binding).encode())
        assert Envelope.decode(await ws.recv(), LIMITS).type == "welcome"
        yield ws


async def refusal(ws: ClientConnection) -> tuple[Envelope | None, int | None]:
    """The error envelope (if any) and close code a refused raw connection gets."""
    error = None
    try:
        while True:
            env = Envelope.decode(await ws.recv(), LIMITS)
            if env.type == "error":
                error = env
    except ConnectionClosed as exc:
        return error, exc.rcvd.code if exc.rcvd else None


def test_known_site_connects_and_exchanges_messages(fed: Fed) -> None:
    async def main() -> None:
        async with fed.server() as server:
            assert server.url.startswith("wss://127.0.0.1:") and server.port != 0
            async with fed.client(server, fed.good) as client:
                assert client.site == "good"
                joined = await expect(server, Connected)
                assert joined.site == "good" and joined.fingerprint == fed.good.fingerprint
                assert server.connected() == {"good"}
                assert server.site_keys["good"].public_bytes_raw() == fed.good.public_bytes
                await still_works(server, client)
                # Near the model-sized limit: more than the handshake allows, so the
                # limit was raised after authentication.
                big = Envelope("masked-input", 3, {}, (b"\x00" * (LIMITS.max_message - 200),))
                await client.send(big)
                assert (await expect(server, Message)).envelope == big
            left = await expect(server, Disconnected)
            assert left.site == "good"
            assert server.connected() == set()

    run(main())


def test_unknown_key_is_refused_and_not_retried(fed: Fed) -> None:
    async def main() -> None:
        async with fed.server() as server, fed.client(server, fed.good) as good:
            await expect(server, Connected)
            stranger = IdentityKey.generate()
            with pytest.raises(AuthenticationRefused) as info:
                await fed.client(server, stranger).connect()
            assert info.value.error_code == "unknown_key"
            assert stranger.fingerprint in info.value.message
            await still_works(server, good)
            assert server.connected() == {"good"}

    run(main())


def test_bad_signature_is_refused(fed: Fed) -> None:
    async def main() -> None:
        async with fed.server() as server, fed.client(server, fed.good) as good:
            await expect(server, Connected)
            forger = Forger(IdentityKey.generate().private_key, claimed=fed.other.public_key)
            with pytest.raises(AuthenticationRefused) as info:
                await fed.client(server, forger).connect()
            assert info.value.error_code == "bad_signature"
            assert "other" not in server.connected()
            await still_works(server, good)

    run(main())


def test_signature_for_another_aggregator_is_refused(fed: Fed, tmp_path: Path) -> None:
    """The signature binds the aggregator's certificate: a relayed answer does not verify."""

    async def main() -> None:
        async with fed.server() as server:
            async with connect(server.url, ssl=client_context(fed.ca), compression=None) as ws:
                hello = Envelope.decode(await ws.recv(), LIMITS)
                await ws.send(handshake.answer(hello, fed.good, cert_binding(b"another server")).encode())
                error, code = await refusal(ws)
            assert error is not None and error.body["code"] == "bad_signature" and code == 4001
            assert server.connected() == set()

    run(main())


@pytest.mark.parametrize(
    "payload",
    [b"\x00\x00\x00\x05{nope", struct.pack(">I", 1000) + b"{}", "a text frame"],
    ids=["bad-json", "truncated", "text-frame"],
)
def test_malformed_frame_is_refused(fed: Fed, payload: bytes | str) -> None:
    async def main() -> None:
        async with fed.server() as server, fed.client(server, fed.good) as good:
            await expect(server, Connected)
            async with raw_session(server, fed.other, fed.ca) as ws:
                await expect(server, Connected)
                await ws.send(payload)
                error, code = await refusal(ws)
            assert error is not None and error.body == {"code": "malformed", "message": "malformed message"}
            assert code == 4002
            left = await expect(server, Disconnected)
            assert left == Disconnected("other", "refused: malformed")
            await still_works(server, good)

    run(main())


def test_oversized_frame_is_refused(fed: Fed) -> None:
    async def main() -> None:
        async with fed.server() as server, fed.client(server, fed.good) as good:
            await expect(server, Connected)
            other = fed.client(server, fed.other)
            await other.connect()
            await expect(server, Connected)
            await other.send(Envelope("masked-input", 3, {}, (b"\x00" * (LIMITS.max_message + 1),)))
            with pytest.raises(PeerError) as info:
                await other.recv(5)
            assert info.value.error_code == "too_large" and info.value.code == 1009
            assert await expect(server, Disconnected) == Disconnected("other", "refused: too_large")
            await still_works(server, good)
            await other.close()

    run(main())


def test_oversized_frame_before_authentication_is_refused(fed: Fed) -> None:
    async def main() -> None:
        async with fed.server() as server, fed.client(server, fed.good) as good:
            await expect(server, Connected)
            async with connect(server.url, ssl=client_context(fed.ca), compression=None) as ws:
                await ws.recv()  # the challenge
                await ws.send(b"\x00" * (32 << 10))  # over the handshake's 16 KiB, under the model limit
                _, code = await refusal(ws)
            assert code == 1009
            await still_works(server, good)

    run(main())


def test_message_for_the_wrong_round_is_refused_via_the_validator(fed: Fed) -> None:
    async def main() -> None:
        async with fed.server() as server, fed.client(server, fed.good) as good:
            await expect(server, Connected)
            other = fed.client(server, fed.other)
            await other.connect()
            await expect(server, Connected)

            def validator(site: str, env: Envelope) -> None:
                if env.round != 3:
                    raise UnexpectedMessage(f"{site} sent {env.type} for round {env.round} during round 3")

            server.validator = validator
            await other.send(Envelope("update", 2))
            with pytest.raises(PeerError) as info:
                await other.recv(5)
            assert info.value.error_code == "unexpected"
            assert "round 2" not in info.value.message  # the detail stays in the aggregator's log
            assert await expect(server, Disconnected) == Disconnected("other", "refused: unexpected")
            await still_works(server, good)

            # The refused site may come back (next recv/send reconnects) and is heard again.
            await other.send(Envelope("update", 3, {"again": True}))
            assert await expect(server, Connected) == Connected("other", fed.other.fingerprint)
            assert (await expect(server, Message)).envelope.body == {"again": True}
            await other.close()

    run(main())


def test_validator_bug_closes_only_that_connection(fed: Fed) -> None:
    async def main() -> None:
        async with fed.server() as server, fed.client(server, fed.good) as good:
            await expect(server, Connected)
            other = fed.client(server, fed.other)
            await other.connect()
            await expect(server, Connected)
            server.validator = lambda site, env: 1 / 0 if site == "other" else None  # type: ignore[func-returns-value]
            await other.send(Envelope("update", 3))
            with pytest.raises(PeerError) as info:
                await other.recv(5)
            assert info.value.error_code == "internal" and "ZeroDivision" not in str(info.value)
            await expect(server, Disconnected)
            await still_works(server, good)
            await other.close()

    run(main())


def test_handshake_timeout(fed: Fed) -> None:
    async def main() -> None:
        async with fed.server(handshake_timeout=0.3) as server:
            async with connect(server.url, ssl=client_context(fed.ca), compression=None) as ws:
                error, code = await refusal(ws)  # never answers the challenge
            assert error is not None and error.body["code"] == "timeout" and code == 4008

    run(main())


def test_reconnecting_site_replaces_its_old_connection(fed: Fed) -> None:
    async def main() -> None:
        async with fed.server() as server:
            first = fed.client(server, fed.good)
            await first.connect()
            await expect(server, Connected)
            second = fed.client(server, fed.good)
            await second.connect()
            assert await expect(server, Disconnected) == Disconnected("good", "replaced")
            await expect(server, Connected)
            with pytest.raises(PeerError) as info:
                await first.recv(5)
            assert info.value.error_code == "replaced"
            assert server.connected() == {"good"}
            await still_works(server, second)
            await first.close()
            await second.close()

    run(main())


def test_reconnect_after_server_restart_with_backoff(fed: Fed) -> None:
    async def main() -> None:
        server = fed.server()
        await server.start()
        port = server.port
        client = fed.client(server, fed.good)
        await client.connect()
        await expect(server, Connected)
        await server.close()
        with pytest.raises(ConnectionLost):
            await client.recv(5)

        async def restart_later() -> AggregatorServer:
            await asyncio.sleep(0.4)  # the client is retrying meanwhile
            again = fed.server(port=port)
            await again.start()
            return again

        restarting = asyncio.create_task(restart_later())
        await client.send(Envelope("update", 5))  # reconnects first
        server = await restarting
        try:
            assert (await expect(server, Connected)).site == "good"
            assert (await expect(server, Message)).envelope.round == 5
        finally:
            await client.close()
            await server.close()

    run(main())


def test_connect_gives_up_after_the_retry_budget(fed: Fed) -> None:
    async def main() -> None:
        server = fed.server()
        await server.start()
        await server.close()  # nothing listens on that port any more
        client = fed.client(server, fed.good, backoff=Backoff(initial=0.05, max_delay=0.1, retry_for=0.5))
        with pytest.raises(ConnectFailed, match=r"within 0\.5 s"):
            await client.connect()

    run(main())


def test_client_refuses_a_server_not_signed_by_the_pinned_ca(fed: Fed, tmp_path: Path) -> None:
    rogue = create_federation_certs(tmp_path / "rogue", ["127.0.0.1"])

    async def main() -> None:
        allowed = {"good": fed.good.public_line()}
        async with AggregatorServer(allowed, tls=ServerTLS(rogue.cert_file, rogue.key_file)) as server:
            client = SiteClient(server.url, fed.good, ca_file=str(fed.ca), backoff=FAST)
            with pytest.raises(CertificateRejected, match="not trusted"):
                await client.connect()
            assert server.connected() == set()

    run(main())


def test_client_checks_the_host_name(tmp_path: Path) -> None:
    only_localhost = create_federation_certs(tmp_path, ["localhost"])
    ident = IdentityKey.generate()

    async def main() -> None:
        tls = ServerTLS(only_localhost.cert_file, only_localhost.key_file)
        async with AggregatorServer({"s": ident.public_line()}, tls=tls) as server:
            client = SiteClient(server.url, ident, ca_file=str(only_localhost.ca_file), backoff=FAST)
            with pytest.raises(CertificateRejected):
                await client.connect()  # the URL says 127.0.0.1, the certificate only localhost

    run(main())


def test_plain_ws_only_when_asked(fed: Fed) -> None:
    allowed = {"good": fed.good.public_line()}
    with pytest.raises(ValueError, match="insecure"):
        AggregatorServer(allowed)
    with pytest.raises(ValueError, match="insecure"):
        SiteClient("ws://127.0.0.1:1", fed.good)
    with pytest.raises(ValueError, match="wss://"):
        SiteClient("http://127.0.0.1:1", fed.good, insecure=True)

    async def main() -> None:
        async with AggregatorServer(allowed, insecure=True, limits=LIMITS) as server:
            assert server.url.startswith("ws://")
            async with SiteClient(server.url, fed.good, insecure=True, backoff=FAST) as client:
                await expect(server, Connected)
                await still_works(server, client)
            # A wss:// client does not silently fall back to plain text.
            with pytest.raises(ConnectFailed):
                await SiteClient(server.url.replace("ws://", "wss://"), fed.good, ca_file=str(fed.ca),
                                 backoff=Backoff(initial=0.05, retry_for=0.3)).connect()

    run(main())


def test_driver_api_waits_broadcasts_and_times_out(fed: Fed) -> None:
    async def main() -> None:
        async with fed.server() as server:
            assert await server.wait_for_sites(1, timeout=0.1) == set()
            with pytest.raises(ReceiveTimeout):
                await server.recv(0.05)
            with pytest.raises(TimeoutError):  # ReceiveTimeout is also the builtin
                await server.recv(0.05)
            async with fed.client(server, fed.good) as a, fed.client(server, fed.other) as b:
                assert await server.wait_for_sites(2, timeout=5) == {"good", "other"}
                reached = await server.broadcast(Envelope("plan", 1, {"lr": 0.1}), ["good", "other", "ghost"])
                assert reached == {"good", "other"}
                assert (await a.recv(5)).body == {"lr": 0.1}
                assert (await b.recv(5)).body == {"lr": 0.1}
                with pytest.raises(NotConnected):
                    await server.send("ghost", Envelope("plan", 1))
                with pytest.raises(ReceiveTimeout):
                    await a.recv(0.05)
                await server.reject("other", UnexpectedMessage("driver says no"))
                with pytest.raises(PeerError):
                    await b.recv(5)
            await b.close()

    run(main())


def test_wrong_federation_name_is_not_retried(fed: Fed) -> None:
    async def main() -> None:
        async with fed.server(federation="lab-a") as server:
            client = fed.client(server, fed.good, federation="lab-b")
            with pytest.raises(Exception, match="lab-a"):
                await client.connect()

    run(main())


def test_closed_client_does_not_reconnect(fed: Fed) -> None:
    async def main() -> None:
        async with fed.server() as server:
            client = fed.client(server, fed.good)
            await client.connect()
            await client.close()
            with pytest.raises(NotConnected):
                await client.send(Envelope("update", 1))

    run(main())


def test_ssl_context_pins_only_the_given_ca(fed: Fed) -> None:
    ctx = client_context(fed.ca)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert len(ctx.get_ca_certs()) == 1


def test_layering() -> None:
    """network/ never loads Qt; core's identity and certificates need neither asyncio nor sockets."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import hemafed.core.trust.identity, hemafed.core.trust.certs\n"
        "assert 'asyncio' not in sys.modules and 'websockets' not in sys.modules, 'core pulled in I/O'\n"
        "import hemafed.network.server, hemafed.network.client\n"
        "assert not any(m.startswith('PySide6') for m in sys.modules), 'network pulled in Qt'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
