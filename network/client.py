"""A site's side of the transport: connect, authenticate, send and receive envelopes.

Reconnecting is automatic but never silent: when the connection drops, the call
that was running raises `ConnectionLost` (the site's round state is gone, the
aggregator counts it as a dropout), and the next `send()` / `recv()` reconnects
with exponential back-off and jitter before it proceeds (a driver that must not
resend stale round messages passes `reconnect=False` and reconnects itself). A
refusal of the site's identity (`AuthenticationRefused`) or of the server's
certificate (`CertificateRejected`) is a configuration problem and is never
retried. Text the aggregator sends (error messages, close reasons) is escaped
with `safe_text` before it is put in an exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from hemafed.core.trust.identity import IdentityKey
from hemafed.core.trust.text import safe_text
from hemafed.network import handshake
from hemafed.network.envelope import ERROR, WELCOME, Envelope, Limits, error_envelope
from hemafed.network.errors import (
    CLOSE_CODES,
    AuthenticationRefused,
    CertificateRejected,
    ConnectFailed,
    ConnectionLost,
    MalformedEnvelope,
    NotConnected,
    PeerError,
    ProtocolError,
    ReceiveTimeout,
)
from hemafed.network.tls import cert_binding, client_context

log = logging.getLogger(__name__)

_PERMANENT_REFUSALS = frozenset({"unknown_key", "bad_signature", "handshake"})
_REFUSED_CLOSE = CLOSE_CODES["unknown_key"]  # 4001: the handshake was refused (the error frame may be lost)
RetryFn = Callable[[str, float], None]  # (why the attempt failed, seconds until the next one)
# Called with every message's exact bytes just before they are sent (the handshake's answer included, with the
# aggregator's URL and certificate digest as details); an exception stops the message (`network.outbound`).
SentFn = Callable[..., object]  # (envelope, bytes, details or None)
# Close codes that mean "the aggregator refused something we sent" (1001, going away, is not one).
_CODE_NAMES = {CLOSE_CODES[k]: k for k in ("handshake", "malformed", "unexpected", "replaced", "timeout",
                                           "too_large", "internal")}


@dataclass(frozen=True)
class Backoff:
    """Exponential back-off with jitter: attempt k waits about `initial * factor**k`
    (half fixed, half random so restarted sites do not stampede), at most
    `max_delay`; gives up after `retry_for` seconds in all (None: never)."""

    initial: float = 0.5
    factor: float = 2.0
    max_delay: float = 30.0
    retry_for: float | None = 300.0

    def delay(self, attempt: int) -> float:
        d = min(self.max_delay, self.initial * self.factor**attempt)
        return d / 2 + random.uniform(0, d / 2)


class SiteClient:
    """One site's connection to the aggregator at `url` (wss://host:port)."""

    def __init__(
        self,
        url: str,
        identity: IdentityKey,
        *,
        ca_file: str | None = None,
        insecure: bool = False,
        federation: str | None = None,
        limits: Limits | None = None,
        backoff: Backoff | None = None,
        open_timeout: float = 10.0,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        on_send: SentFn | None = None,
    ) -> None:
        scheme = urlsplit(url).scheme
        if scheme == "ws" and not insecure:
            raise ValueError(f"{url} is plain ws://: unencrypted and unauthenticated, allowed only with --insecure")
        if scheme not in {"ws", "wss"}:
            raise ValueError(f"{url}: the aggregator URL must start with wss://")
        self.url = url
        self.identity = identity
        self.federation = federation
        self.limits = limits or Limits()
        self.backoff = backoff or Backoff()
        self.open_timeout = open_timeout
        self._ssl = client_context(ca_file) if scheme == "wss" else None
        self._ping = (ping_interval, ping_timeout)
        self._ws: ClientConnection | None = None
        self._closed = False
        self.site: str | None = None  # the name the aggregator knows this site by
        self.on_send = on_send
        self.peer_certificate_sha256: str | None = None  # the aggregator's TLS certificate (hex), once connected

    @property
    def connected(self) -> bool:
        return self._ws is not None

    async def __aenter__(self) -> SiteClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self, on_retry: RetryFn | None = None) -> str:
        """Connect and authenticate, retrying with back-off; returns this site's name.

        `on_retry(why, delay)` is called before each wait (a driver shows "reconnecting").
        Raises `AuthenticationRefused` / `CertificateRejected` (never retried), a
        `ProtocolError` when the server speaks something else or serves another
        federation, and `ConnectFailed` when the retry budget is spent.
        """
        if self._ws is not None:
            assert self.site is not None
            return self.site
        self._closed = False
        start = time.monotonic()
        attempt = 0
        while True:
            try:
                self._ws, self.site = await self._attempt()
                log.info("connected to %s as site %s", self.url, self.site)
                return self.site
            except AuthenticationRefused as exc:
                # the aggregator wrote this text: escape it before anyone logs or shows it
                refused = AuthenticationRefused(safe_text(exc.error_code, 40), safe_text(exc.message, 300), exc.code)
                if refused.error_code in _PERMANENT_REFUSALS:
                    raise refused from None
                why: BaseException = refused  # "shutdown", "internal", ...: the aggregator may be restarting
            except ssl.SSLCertVerificationError as exc:
                raise CertificateRejected(f"{self.url}: server certificate not trusted: {exc.verify_message}") from None
            except ProtocolError:
                raise  # a server speaking something else, or another federation: retrying will not help
            except ConnectionClosed as exc:
                if exc.rcvd is not None and exc.rcvd.code == _REFUSED_CLOSE:
                    raise AuthenticationRefused("handshake", safe_text(exc.rcvd.reason or "authentication refused"),
                                                exc.rcvd.code) from None
                why = exc
            except (OSError, TimeoutError, InvalidHandshake, ConnectionLost) as exc:
                why = exc
            except InvalidURI as exc:
                raise ValueError(str(exc)) from None
            delay = self.backoff.delay(attempt)
            attempt += 1
            budget = self.backoff.retry_for
            words = connect_problem(why, self.url)
            if budget is not None and time.monotonic() + delay - start > budget:
                raise ConnectFailed(f"could not connect to {self.url} within {budget:g} s: {words}") from None
            log.info("connecting to %s failed (%s); retrying in %.1f s", self.url, safe_text(str(why)), delay)
            if on_retry is not None:
                on_retry(words, delay)
            await asyncio.sleep(delay)

    async def send(self, env: Envelope, *, reconnect: bool = True) -> None:
        """Send one envelope; with `reconnect=False` a dropped connection raises
        `NotConnected` instead of reconnecting (round messages must not reach a new session)."""
        if not reconnect and self._ws is None:
            raise NotConnected("not connected to the aggregator")
        ws = await self._ensure()
        data = env.encode()
        if self.on_send is not None:
            self.on_send(env, data, None)
        try:
            await ws.send(data)
        except ConnectionClosed as exc:
            raise self._lost(exc) from None

    async def recv(self, timeout: float | None = None) -> Envelope:
        """The next message from the aggregator; `ReceiveTimeout` after `timeout` seconds.

        An `error` envelope from the aggregator raises `PeerError` (the aggregator
        closes the connection after sending one).
        """
        ws = await self._ensure()
        try:
            async with asyncio.timeout(timeout):
                data = await ws.recv()
        except TimeoutError:
            raise ReceiveTimeout(f"no message from the aggregator within {timeout} s") from None
        except ConnectionClosed as exc:
            raise self._lost(exc) from None
        try:
            env = Envelope.decode(data, self.limits)
        except ProtocolError as exc:
            log.warning("malformed message from the aggregator: %s", exc.detail)
            await self._drop(ws, exc)
            raise
        if env.type == ERROR:
            self._ws = None
            with contextlib.suppress(ConnectionClosed):
                await ws.close()
            code, message = env.body.get("code"), env.body.get("message")
            raise PeerError(
                safe_text(code, 40) if isinstance(code, str) else "unknown",
                safe_text(message, 300) if isinstance(message, str) else "the aggregator reported an error",
            )
        return env

    async def close(self) -> None:
        self._closed = True
        ws, self._ws = self._ws, None
        if ws is not None:
            await ws.close()

    # -- internals ---------------------------------------------------------------

    async def _ensure(self) -> ClientConnection:
        if self._ws is None:
            if self._closed:
                raise NotConnected("the client was closed")
            await self.connect()
        assert self._ws is not None
        return self._ws

    async def _attempt(self) -> tuple[ClientConnection, str]:
        ws = await connect(
            self.url,
            ssl=self._ssl,
            open_timeout=self.open_timeout,
            max_size=self.limits.max_message,
            compression=None,
            ping_interval=self._ping[0],
            ping_timeout=self._ping[1],
            user_agent_header=None,
        )
        try:
            async with asyncio.timeout(self.open_timeout):
                hello = Envelope.decode(await ws.recv(), self.limits)
                ssl_object = ws.transport.get_extra_info("ssl_object")
                binding = cert_binding(ssl_object.getpeercert(binary_form=True) if ssl_object else None)
                auth = handshake.answer(hello, self.identity, binding, self.federation)
                data = auth.encode()
                if self.on_send is not None:
                    self.on_send(auth, data, {"aggregator": self.url, "certificate_sha256": binding.hex()})
                await ws.send(data)
                reply = Envelope.decode(await ws.recv(), self.limits)
            if reply.type == ERROR:
                raise handshake.refusal(reply)
            site = reply.body.get("site")
            if reply.type != WELCOME or not isinstance(site, str):
                raise MalformedEnvelope(f"expected {WELCOME!r} from the aggregator, got {reply.type!r}")
            self.peer_certificate_sha256 = binding.hex() or None
        except BaseException:
            with contextlib.suppress(Exception):
                await ws.close()
            raise
        return ws, site

    async def _drop(self, ws: ClientConnection, error: ProtocolError) -> None:
        self._ws = None
        env = error_envelope(error.code, error.public)
        data = env.encode()
        if self.on_send is not None:
            self.on_send(env, data, None)
        with contextlib.suppress(ConnectionClosed):
            await ws.send(data)
        with contextlib.suppress(ConnectionClosed):
            await ws.close(error.close_code, error.public[:120])

    def _lost(self, exc: ConnectionClosed) -> ConnectionLost:
        self._ws = None
        rcvd = exc.rcvd
        reason = safe_text(rcvd.reason, 120) if rcvd is not None else ""
        if rcvd is not None and rcvd.code in _CODE_NAMES:
            return PeerError(_CODE_NAMES[rcvd.code], reason or "refused by the aggregator", rcvd.code)
        if rcvd is not None:
            return ConnectionLost(f"connection to the aggregator closed (code {rcvd.code} {reason})".strip(),
                                  rcvd.code, reason)
        return ConnectionLost("connection to the aggregator lost")


def connect_problem(exc: BaseException, url: str) -> str:
    """Why a connection attempt failed, in words an operator can act on (not an errno)."""
    import errno
    import socket
    from urllib.parse import urlsplit

    where = urlsplit(url).netloc or url
    host = urlsplit(url).hostname or where
    if isinstance(exc, socket.gaierror):
        return f"the host name {host} is not known here (check the address for a typo, or this network's DNS)"
    if isinstance(exc, ConnectionRefusedError) or getattr(exc, "errno", None) == errno.ECONNREFUSED:
        return (f"nothing answers at {where} (connection refused): the aggregator is not running there, or its "
                "federation has finished")
    if isinstance(exc, TimeoutError) or getattr(exc, "errno", None) == errno.ETIMEDOUT:
        return f"no answer from {where} (a firewall may block the port, or the address is wrong)"
    if getattr(exc, "errno", None) in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return f"this computer has no route to {host} (is it on the hospital network, or the VPN?)"
    if isinstance(exc, AuthenticationRefused):
        return "the aggregator is restarting or shutting down"
    if isinstance(exc, InvalidHandshake | ConnectionClosed):
        return f"{where} answered, but not as a hemafed aggregator (check the port)"
    return safe_text(str(exc))
