"""`ssl.SSLContext`s for the aggregator (certificate + key) and for sites (pinned CA)."""

from __future__ import annotations

import hashlib
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from hemafed.core.trust.certs import leaf_certificate_der


@dataclass(frozen=True)
class ServerTLS:
    """The aggregator's certificate chain and key, plus what the handshake binds to."""

    cert_file: Path
    key_file: Path

    def context(self) -> ssl.SSLContext:
        return server_context(self.cert_file, self.key_file)

    def binding(self) -> bytes:
        return cert_binding(leaf_certificate_der(self.cert_file))


def server_context(cert_file: str | os.PathLike[str], key_file: str | os.PathLike[str]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


def client_context(ca_file: str | os.PathLike[str] | None) -> ssl.SSLContext:
    """Trust only `ca_file` (the federation's pinned CA), check the host name, TLS >= 1.2.

    `None` falls back to the system's trust store, for federations with a real PKI.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname by default
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file is None:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        ctx.load_verify_locations(cafile=os.fspath(ca_file))
    return ctx


def cert_binding(leaf_der: bytes | None) -> bytes:
    """What the site's signature binds to: SHA-256 of the server's leaf certificate
    (empty without TLS). A signature made for one aggregator is useless to another,
    even one holding a certificate from the same CA."""
    return hashlib.sha256(leaf_der).digest() if leaf_der else b""
