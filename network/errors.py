"""The one exception tree of the transport.

    NetworkError (a hemafed.core.errors.HemafedError)
    ├── ProtocolError            a message broke the protocol; the peer gets `code` + `public`, never `detail`
    │   ├── MalformedEnvelope    the envelope could not be decoded (bad framing, JSON, types, sizes)
    │   ├── MessageTooLarge      over a configured size cap
    │   ├── UnexpectedMessage    well-formed but wrong type / round / stage (raised by the driver's validator)
    │   └── HandshakeFailed      handshake refused (unknown key, bad signature, wrong challenge)
    ├── ConnectionLost           transient: the connection dropped (peer gone, keepalive, server restart)
    │   └── PeerError            ...because the peer said we broke the protocol (`error` envelope / close code)
    ├── AuthenticationRefused    FATAL: the aggregator refused our identity; reconnecting will not help
    ├── ConnectFailed            transient: could not (re)connect within the retry budget
    ├── CertificateRejected      FATAL: the server's certificate is not signed by the pinned CA (or wrong host)
    ├── NotConnected             transient: send to a site (or from a client) that has no open connection
    └── ReceiveTimeout           nothing arrived in time (also a builtin `TimeoutError`)

FATAL ones are also `hemafed.core.errors.FatalError`, transient ones `TransientError`:
a site driver stops on the first and reconnects with back-off on the second.

`ProtocolError.code` is a short stable identifier shared by both ends (it travels in
the `error` envelope); `public` is the one-line text the peer may see; `detail` is for
the local log only.
"""

from __future__ import annotations

from hemafed.core.errors import FatalError, HemafedError, TransientError

# Codes that travel on the wire; both ends know them. Public text is deliberately
# short and generic: it explains what the peer did wrong, never what we run.
PUBLIC_TEXT: dict[str, str] = {
    "malformed": "malformed message",
    "too_large": "message too large",
    "unexpected": "unexpected message for the current round or stage",
    "unknown_key": "this site's key is not in the federation's allowed list",
    "bad_signature": "signature check failed",
    "handshake": "authentication handshake failed",
    "timeout": "timed out",
    "replaced": "replaced by a newer connection from the same site",
    "shutdown": "aggregator shutting down",
    "finished": "the federation has finished",
    "internal": "internal error",
}

# WebSocket close codes: 4000-4999 are reserved for applications (RFC 6455 §7.4.2).
CLOSE_CODES: dict[str, int] = {
    "malformed": 4002,
    "too_large": 1009,
    "unexpected": 4003,
    "unknown_key": 4001,
    "bad_signature": 4001,
    "handshake": 4001,
    "timeout": 4008,
    "replaced": 4004,
    "shutdown": 1001,
    "finished": 4009,
    "internal": 1011,
}


class NetworkError(HemafedError):
    """Base of every error raised by `hemafed.network`."""


class ProtocolError(NetworkError):
    """A message broke the protocol.

    `detail` is logged locally; the peer only ever sees `code` and `public`.
    """

    code = "malformed"

    def __init__(self, detail: str, *, public: str | None = None, code: str | None = None) -> None:
        super().__init__(detail)
        if code is not None:
            self.code = code
        self.detail = detail
        self.public = public if public is not None else PUBLIC_TEXT.get(self.code, "protocol error")

    @property
    def close_code(self) -> int:
        return CLOSE_CODES.get(self.code, 4000)


class MalformedEnvelope(ProtocolError):
    code = "malformed"


class MessageTooLarge(ProtocolError):
    code = "too_large"


class UnexpectedMessage(ProtocolError):
    """Raise this from a validator for a wrong type, round or stage."""

    code = "unexpected"


class HandshakeFailed(ProtocolError):
    code = "handshake"


class ConnectionLost(TransientError, NetworkError):
    """The connection dropped; `code`/`reason` are the WebSocket close code and reason if any."""

    def __init__(self, message: str, code: int | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


class PeerError(ConnectionLost):
    """The peer reported that we broke the protocol. `message` is the peer's text (untrusted)."""

    def __init__(self, error_code: str, message: str, close_code: int | None = None) -> None:
        super().__init__(f"{message} ({error_code})", close_code, message)
        self.error_code = error_code
        self.message = message


class AuthenticationRefused(FatalError, NetworkError):
    """The aggregator refused this site's identity: fix the configuration, do not retry.

    Not a `ConnectionLost`: code that reconnects on a lost connection must not retry this.
    `message` is the aggregator's text (untrusted: escape it before showing it).
    """

    what_to_do = ("send this site's public key (`hemafed keys show`) to the federation's admin and "
                  "confirm its fingerprint by phone; start the site again once it is on the list")

    def __init__(self, error_code: str, message: str, close_code: int | None = None) -> None:
        super().__init__(f"{message} ({error_code})")
        self.error_code = error_code
        self.message = message
        self.code = close_code
        self.reason = message


class ConnectFailed(TransientError, NetworkError):
    """No connection could be made within the retry budget."""

    what_to_do = "check that the aggregator is running and that its address and port are reachable from here"


class CertificateRejected(FatalError, NetworkError):
    """TLS verification failed: wrong CA, wrong host name or expired certificate. Not retried."""

    what_to_do = ("check that ca_file is the federation's ca.pem from the admin and that the aggregator URL "
                  "uses the host name in its certificate; ask the admin if the certificate was renewed")


class NotConnected(TransientError, NetworkError):
    """There is no open connection to send on."""


class ReceiveTimeout(NetworkError, TimeoutError):
    """Nothing arrived before the deadline."""
