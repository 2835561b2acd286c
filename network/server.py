"""The aggregator's side of the transport: a websockets server that authenticates
sites and turns their traffic into one queue of events for the round driver.

The driver never touches a socket. It reads `Message` / `Connected` /
`Disconnected` events from `recv()`, sends with `send()` / `broadcast()`, and may
set `validator` to a function that raises `ProtocolError` (usually
`UnexpectedMessage`) for a message of the wrong type, round or stage. Such a
message never reaches the queue: the site gets an `error` envelope with a generic
text, its connection alone is closed, the details go to the local log, and every
other site carries on.

Isolation and resource caps (figures in docs/deployment.md):

* every site has its own send queue and writer task; `send`/`broadcast` only enqueue,
  so a site that stops reading is dropped after `send_timeout` (or when its queue is
  full) and never holds up a broadcast to the others;
* at most `per_site_backlog` of one site's messages wait for the driver; a site that
  floods beyond that is refused;
* peers that have not authenticated yet are capped in all and per address, checked
  as soon as TLS is up; a TCP connection that never starts TLS is closed after
  `handshake_timeout`; the open-file soft limit is raised to the hard limit at start;
* inbound memory per connection is bounded by websockets' `max_queue` frames of at
  most the (handshake or model-sized) message limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from hemafed.core.trust.identity import allowed_sites, fingerprint
from hemafed.network import handshake
from hemafed.network.envelope import (
    AUTH,
    HANDSHAKE_LIMITS,
    HELLO,
    WELCOME,
    Envelope,
    Limits,
    error_envelope,
)
from hemafed.network.errors import (
    NotConnected,
    ProtocolError,
    ReceiveTimeout,
    UnexpectedMessage,
)
from hemafed.network.schema import SafeLogFilter, safe_text
from hemafed.network.tls import ServerTLS

log = logging.getLogger(__name__)
log.addFilter(SafeLogFilter())

_LOOPBACK = re.compile(r"(127\.\d+\.\d+\.\d+|::1|localhost)\Z")
_RESERVED = frozenset({HELLO, AUTH, WELCOME})


@dataclass(frozen=True)
class Message:
    site: str
    envelope: Envelope


@dataclass(frozen=True)
class Connected:
    site: str
    fingerprint: str


@dataclass(frozen=True)
class Disconnected:
    site: str
    reason: str


Event = Message | Connected | Disconnected
Validator = Callable[[str, Envelope], None]


class AggregatorServer:
    """Accepts authenticated sites; see the module docstring for the driver's view.

    `allowed` maps site name -> public key (a `hemafed-ed25519 ...` line or a key).
    TLS is required unless `insecure=True` (plain ws://, for local tests only).
    """

    def __init__(
        self,
        allowed: Mapping[str, str | Ed25519PublicKey],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: ServerTLS | None = None,
        insecure: bool = False,
        federation: str = "hemafed",
        limits: Limits | None = None,
        handshake_timeout: float = 10.0,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        queue_size: int = 1024,
        max_unauthenticated: int = 256,
        max_unauthenticated_per_address: int = 32,
        send_timeout: float = 60.0,
        send_queue: int = 64,
        per_site_backlog: int = 16,
        max_queue: int = 4,
    ) -> None:
        if tls is None and not insecure:
            raise ValueError("the aggregator needs a TLS certificate; plain ws:// only with insecure=True")
        self.host = host
        self.port = port
        self.tls = tls
        self.federation = federation
        self.limits = limits or Limits()
        self.handshake_timeout = handshake_timeout
        self.validator: Validator | None = None
        self._allowed = allowed_sites(allowed)
        self._binding = tls.binding() if tls is not None else b""
        self._ping = (ping_interval, ping_timeout)
        self._conns: dict[str, ServerConnection] = {}
        # Bounded so a flood from one site pushes back on its socket instead of memory.
        self._queue: asyncio.Queue[Event] = asyncio.Queue(queue_size)
        self._changed = asyncio.Condition()
        self._server: Server | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self.send_timeout = send_timeout
        self._send_queue = send_queue
        self._per_site_backlog = per_site_backlog
        self._max_queue = max_queue
        self._outboxes: dict[ServerConnection, asyncio.Queue[bytes]] = {}
        self._writers: dict[ServerConnection, asyncio.Task[None]] = {}
        self._backlog: Counter[str] = Counter()
        # bytes and messages received from each site since start, its handshake answers included (what a site's
        # outbound log adds up to, network.outbound)
        self.received_bytes: Counter[str] = Counter()
        self.received_messages: Counter[str] = Counter()
        self.gate = AdmissionGate(max_unauthenticated, max_unauthenticated_per_address)

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        if self.tls is None and not _LOOPBACK.match(self.host):
            log.warning("serving plain ws:// on %s: traffic is neither encrypted nor authenticated", self.host)
        soft, hard = raise_open_file_limit()
        # Keep descriptors for our own files (checkpoints, status, logs) and for every allowed site.
        room = soft - _FD_RESERVE - 2 * len(self._allowed) if soft > 0 else self.gate.total
        if self.gate.total > room:
            log.warning("open-file limit %d: lowering the cap on unauthenticated connections from %d to %d",
                        soft, self.gate.total, max(room, 1))
            self.gate.total = max(room, 1)
        log.info("open-file limit %s (hard %s); at most %d unauthenticated connections, %d per address",
                 soft, hard, self.gate.total, self.gate.per_address)
        self._server = await serve(
            self._handle,
            ssl=self.tls.context() if self.tls is not None else None,
            # Until a site has authenticated it may send only the handshake's few bytes;
            # the model-sized limit is switched on per connection after the check.
            max_size=HANDSHAKE_LIMITS.max_message,
            # Weights and masked vectors do not compress, and inflating is a DoS lever.
            compression=None,
            open_timeout=self.handshake_timeout,
            ping_interval=self._ping[0],
            ping_timeout=self._ping[1],
            server_header=None,
            # Inbound frames buffered per connection before reading pauses: bounds memory per peer.
            max_queue=self._max_queue,
            sock=_listen(self.host, self.port, self.gate),
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("aggregator listening on %s (federation %r)", self.url, self.federation)

    async def close(self, drain: float = 2.0) -> None:
        """Stop serving; first give queued messages (final weights) up to `drain` seconds to go out."""
        await self.flush(drain)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> AggregatorServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def url(self) -> str:
        scheme = "wss" if self.tls is not None else "ws"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    # -- the driver's API --------------------------------------------------------

    def connected(self) -> set[str]:
        return set(self._conns)

    @property
    def site_keys(self) -> dict[str, Ed25519PublicKey]:
        """Every allowed site's identity key by name (e.g. to check signed secure-aggregation keys)."""
        return {name: Ed25519PublicKey.from_public_bytes(raw) for raw, name in self._allowed.items()}

    async def recv(self, timeout: float | None = None) -> Event:
        """The next event from any site; raises `ReceiveTimeout` after `timeout` seconds."""
        try:
            async with asyncio.timeout(timeout):
                event = await self._queue.get()
        except TimeoutError:
            raise ReceiveTimeout(f"no message within {timeout} s") from None
        if isinstance(event, Message):
            self._backlog[event.site] -= 1
            if self._backlog[event.site] <= 0:
                del self._backlog[event.site]
        return event

    async def send(self, site: str, env: Envelope) -> None:
        """Queue `env` for `site`; raises `NotConnected` if it is gone (or its queue is full: then it is dropped)."""
        self._enqueue(site, env.encode())

    async def broadcast(self, env: Envelope, sites: Iterable[str] | None = None) -> set[str]:
        """Queue `env` for `sites` (default: all connected); returns the sites it was queued for.

        Never waits for a slow site: each site's writer sends on its own, within
        `send_timeout`. A site that is gone is not an error here: dropouts are normal
        mid-round, and the driver learns of them from `Disconnected` events.
        """
        data = env.encode()
        reached = set()
        for site in sorted(self.connected() if sites is None else set(sites)):
            with contextlib.suppress(NotConnected):
                self._enqueue(site, data)
                reached.add(site)
        return reached

    async def flush(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for every queued message to be sent; True if all were."""
        boxes = [q.join() for q in self._outboxes.values()]
        if not boxes:
            return True
        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(*boxes)
            return True
        except TimeoutError:
            return False

    async def wait_for_sites(self, n: int, timeout: float | None = None) -> set[str]:
        """Wait until at least `n` sites are connected or `timeout` passes; returns who is connected."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(lambda: len(self._conns) >= n)
        return self.connected()

    async def reject(self, site: str, error: ProtocolError, round: int = 0) -> None:
        """Refuse a site for something the driver found wrong later: error envelope, close.

        Runs in the background: a peer that does not read cannot hold up the driver."""
        ws = self._conns.get(site)
        if ws is not None:
            self._background(self._refuse(ws, error, site, round))

    def _background(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    # -- one connection ----------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        peer = _peer(ws)
        site = await self._authenticate(ws, peer)
        if site is None:
            return
        reason = "closed"
        try:
            while True:
                data = await ws.recv()
                self._count(site, data)
                env: Envelope | None = None
                try:
                    env = Envelope.decode(data, self.limits)
                    if env.type in _RESERVED:
                        raise UnexpectedMessage(f"handshake message {env.type!r} after authentication")
                    self._validate(site, env)
                    if self._backlog[site] >= self._per_site_backlog:
                        raise UnexpectedMessage(f"{self._backlog[site]} messages from {site} already wait")
                except ProtocolError as exc:
                    reason = f"refused: {exc.code}"
                    await self._refuse(ws, exc, site, env.round if env is not None else 0)
                    return
                self._backlog[site] += 1
                await self._queue.put(Message(site, env))
        except ConnectionClosed as exc:
            reason = _describe_close(exc)
            if exc.sent is not None and exc.sent.code == 1009:
                # websockets refused the frame from its header, before buffering it.
                log.warning("site %s refused: message over the %d-byte limit", site, self.limits.max_message)
                reason = "refused: too_large"
        finally:
            writer = self._writers.pop(ws, None)
            if writer is not None:
                writer.cancel()
            self._outboxes.pop(ws, None)
            await self._forget(site, ws, reason)

    async def _authenticate(self, ws: ServerConnection, peer: str) -> str | None:
        challenge = handshake.Challenge.fresh(self.federation, self._binding)
        try:
            async with asyncio.timeout(self.handshake_timeout):
                await ws.send(challenge.envelope().encode())
                answer = await ws.recv()
                env = Envelope.decode(answer, HANDSHAKE_LIMITS)
                site, raw = handshake.check(challenge, env, self._allowed)
                self._count(site, answer)
        except TimeoutError:
            await self._refuse(ws, ProtocolError("no answer to the challenge", code="timeout"), f"peer {peer}")
            return None
        except ProtocolError as exc:
            await self._refuse(ws, exc, f"peer {peer}")
            return None
        except ConnectionClosed as exc:
            log.info("peer %s left during the handshake (%s)", peer, _describe_close(exc))
            return None

        ws.protocol.max_message_size = self.limits.max_message  # see start(); set before the welcome
        with contextlib.suppress(AttributeError, OSError):
            self.gate.release(ws.transport.get_extra_info("socket").fileno())
        old = self._conns.get(site)
        self._conns[site] = ws
        self._outboxes[ws] = asyncio.Queue(self._send_queue)
        self._writers[ws] = asyncio.create_task(self._writer(site, ws, self._outboxes[ws]))
        if old is not None:
            log.info("site %s reconnected from %s; closing its previous connection", site, peer)
            await self._queue.put(Disconnected(site, "replaced"))
            # In the background: the old peer is often a dead socket, and its closing
            # handshake could hold up the new connection for close_timeout.
            self._background(_close(old, ProtocolError("replaced", code="replaced")))
        try:
            await ws.send(handshake.welcome(site).encode())
        except ConnectionClosed:
            await self._forget(site, ws, "left during the handshake")
            return None
        log.info("site %s connected from %s (%s)", site, peer, fingerprint(raw))
        await self._queue.put(Connected(site, fingerprint(raw)))
        async with self._changed:
            self._changed.notify_all()
        return site

    def _count(self, site: str, data: str | bytes) -> None:
        self.received_bytes[site] += len(data)
        self.received_messages[site] += 1

    def _validate(self, site: str, env: Envelope) -> None:
        if self.validator is None:
            return
        try:
            self.validator(site, env)
        except ProtocolError:
            raise
        except Exception as exc:
            # A bug in the driver's check must not take the server down, nor leak to the peer.
            log.exception("validator failed on %s from %s", env.type, site)
            raise ProtocolError(f"validator raised {exc!r}", code="internal") from exc

    async def _refuse(self, ws: ServerConnection, error: ProtocolError, who: str, round: int = 0) -> None:
        log.warning("refused %s: %s (%s)", who, safe_text(error.detail, 300), error.code)
        try:
            async with asyncio.timeout(_REFUSE_TIMEOUT):
                with contextlib.suppress(ConnectionClosed):
                    await ws.send(error_envelope(error.code, error.public, round).encode())
                await _close(ws, error)
        except TimeoutError:
            ws.transport.abort()  # a peer that does not read gets no orderly goodbye

    async def _forget(self, site: str, ws: ServerConnection, reason: str) -> None:
        if self._conns.get(site) is not ws:
            return  # replaced by a newer connection, which already reported the change
        del self._conns[site]
        log.info("site %s disconnected (%s)", site, reason)
        await self._queue.put(Disconnected(site, reason))
        async with self._changed:
            self._changed.notify_all()

    def _enqueue(self, site: str, data: bytes) -> None:
        ws = self._conns.get(site)
        box = self._outboxes.get(ws) if ws is not None else None
        if ws is None or box is None:
            raise NotConnected(f"site {site!r} is not connected")
        try:
            box.put_nowait(data)
        except asyncio.QueueFull:
            log.warning("site %s has %d messages waiting to be sent; dropping it", site, box.qsize())
            ws.transport.abort()
            raise NotConnected(f"site {site!r} is not reading") from None

    async def _writer(self, site: str, ws: ServerConnection, box: asyncio.Queue[bytes]) -> None:
        """Send `site`'s queued messages in order; one that takes over `send_timeout` drops the site."""
        try:
            while True:
                data = await box.get()
                try:
                    async with asyncio.timeout(self.send_timeout):
                        await ws.send(data)
                finally:
                    box.task_done()
        except TimeoutError:
            log.warning("site %s did not take a %d-byte message within %.0f s; dropping it", site, len(data),
                        self.send_timeout)
            ws.transport.abort()
        except ConnectionClosed:
            pass
        finally:
            while not box.empty():  # nobody will send these; let flush() return
                box.get_nowait()
                box.task_done()


_REFUSE_TIMEOUT = 5.0
_FD_RESERVE = 64  # descriptors kept for the process's own files


class AdmissionGate:
    """Counts TCP connections that have not authenticated yet, in all and per address.

    Checked in `accept()` itself (see `_GatedListener`), before TLS: a refused
    connection is closed at once and never holds a file descriptor, whatever stage
    (TCP, TLS, HTTP, challenge) the peer stalls in.
    """

    def __init__(self, total: int, per_address: int) -> None:
        if total < 1 or per_address < 1:
            raise ValueError("connection caps must be at least 1")
        self.total, self.per_address = total, per_address
        self._pending: dict[int, str] = {}  # file descriptor -> address
        self._by_address: Counter[str] = Counter()
        self.refused = 0
        self._last_log = 0.0

    @property
    def pending(self) -> int:
        return len(self._pending)

    def admit(self, fd: int, address: str) -> bool:
        if len(self._pending) >= self.total or self._by_address[address] >= self.per_address:
            self.refused += 1
            now = time.monotonic()
            if now - self._last_log > 10.0:  # a flood must not flood the log too
                self._last_log = now
                log.warning("refusing connections: %d unauthenticated (%d from %s); %d refused so far",
                            len(self._pending), self._by_address[address], address, self.refused)
            return False
        self._pending[fd] = address
        self._by_address[address] += 1
        return True

    def release(self, fd: int) -> None:
        """The connection on `fd` authenticated or closed: it no longer counts."""
        address = self._pending.pop(fd, None)
        if address is not None:
            self._by_address[address] -= 1
            if self._by_address[address] <= 0:
                del self._by_address[address]


class _CountedSocket(socket.socket):
    """An accepted connection that leaves the gate when it closes (before its descriptor can be reused)."""

    gate: AdmissionGate | None = None

    def close(self) -> None:
        if self.gate is not None and self.fileno() >= 0:
            self.gate.release(self.fileno())
        super().close()

    def detach(self) -> int:
        if self.gate is not None and self.fileno() >= 0:
            self.gate.release(self.fileno())
        return super().detach()


class _GatedListener(socket.socket):
    """A listening socket whose `accept()` (called by asyncio's accept loop) applies the gate."""

    gate: AdmissionGate

    def accept(self) -> tuple[socket.socket, Any]:
        fd, addr = self._accept()  # type: ignore[attr-defined]
        conn = _CountedSocket(self.family, self.type, self.proto, fileno=fd)
        address = str(addr[0]) if isinstance(addr, tuple) and addr else str(addr)
        if not self.gate.admit(fd, address):
            conn.close()
            raise ConnectionAbortedError("over the unauthenticated-connection cap")  # asyncio skips it
        conn.gate = self.gate
        return conn, addr


def _listen(host: str, port: int, gate: AdmissionGate, backlog: int = 128) -> _GatedListener:
    family, type_, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                           flags=socket.AI_PASSIVE)[0]
    sock = _GatedListener(family, type_, proto)
    try:
        sock.gate = gate
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and hasattr(socket, "IPV6_V6ONLY"):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def raise_open_file_limit(target: int = 65536) -> tuple[int, int]:
    """Raise the soft open-file limit towards the hard one (at most `target`); return (soft, hard)."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return (-1, -1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = target if hard == resource.RLIM_INFINITY else min(hard, target)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, want, exc)
    return resource.getrlimit(resource.RLIMIT_NOFILE)


async def _close(ws: ServerConnection, error: ProtocolError) -> None:
    # A close reason is at most 123 bytes of UTF-8 (RFC 6455 §5.5).
    reason = error.public.encode()[:123].decode(errors="ignore")
    with contextlib.suppress(ConnectionClosed):
        await ws.close(error.close_code, reason)


def _peer(ws: ServerConnection) -> str:
    addr = ws.remote_address
    return f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) and len(addr) >= 2 else str(addr)


def _describe_close(exc: ConnectionClosed) -> str:
    frame = exc.rcvd or exc.sent
    if frame is None:
        return "connection dropped"
    if frame.code in (1000, 1001):
        return "closed normally" if exc.rcvd is not None else "closed by the aggregator"
    return f"code {frame.code}" + (f": {frame.reason}" if frame.reason else "")
