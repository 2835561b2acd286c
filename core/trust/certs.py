"""A small certificate authority for federations without a PKI.

`create_federation_certs` makes a self-signed CA (EC P-256) and one server
certificate for the aggregator's host names / IP addresses, and writes

    ca.pem       the CA certificate: every site pins this file
    server.pem   the aggregator's certificate (leaf, then CA)
    server.key   the aggregator's private key (owner-only)

The CA private key is used once and discarded unless asked for: a renewal then
means a new CA that every site pins again, which is safer than a long-lived
signing key lying next to the aggregator. P-256 rather than Ed25519 because every
TLS stack (Python's ssl included) accepts it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..atomic import atomic_write_bytes

CA_FILE = "ca.pem"
CERT_FILE = "server.pem"
KEY_FILE = "server.key"
CA_KEY_FILE = "ca.key"


@dataclass(frozen=True)
class FederationCerts:
    ca_file: Path
    cert_file: Path
    key_file: Path
    ca_key_file: Path | None
    ca_fingerprint: str  # SHA-256 of the CA certificate, hex with colons, to confirm over the phone


def create_federation_certs(
    out: str | os.PathLike[str],
    hosts: Sequence[str],
    *,
    name: str = "hemafed federation",
    ca_days: int = 3650,
    server_days: int = 825,
    keep_ca_key: bool = False,
    force: bool = False,
) -> FederationCerts:
    """Create the CA and the server certificate valid for `hosts` (DNS names or IP addresses)."""
    if not hosts:
        raise ValueError("give at least one host name or IP address for the server certificate")
    out = Path(out)
    files = [out / CA_FILE, out / CERT_FILE, out / KEY_FILE] + ([out / CA_KEY_FILE] if keep_ca_key else [])
    existing = [str(p) for p in files if p.exists()]
    if existing and not force:
        raise FileExistsError(f"refusing to overwrite {', '.join(existing)} (use --force)")
    out.mkdir(parents=True, exist_ok=True)

    now = dt.datetime.now(dt.UTC)
    # Back-date a little so a site whose clock runs slightly behind still accepts it.
    not_before = now - dt.timedelta(hours=1)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(now + dt.timedelta(days=ca_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host.strip().lower()))
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(now + dt.timedelta(days=min(server_days, ca_days)))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    pem = serialization.Encoding.PEM
    atomic_write_bytes(out / CA_FILE, ca_cert.public_bytes(pem), 0o644)
    atomic_write_bytes(out / CERT_FILE, server_cert.public_bytes(pem) + ca_cert.public_bytes(pem), 0o644)
    atomic_write_bytes(out / KEY_FILE, _private_pem(server_key), 0o600)
    ca_key_file = None
    if keep_ca_key:
        ca_key_file = out / CA_KEY_FILE
        atomic_write_bytes(ca_key_file, _private_pem(ca_key), 0o600)
    return FederationCerts(
        ca_file=out / CA_FILE,
        cert_file=out / CERT_FILE,
        key_file=out / KEY_FILE,
        ca_key_file=ca_key_file,
        ca_fingerprint=_colon_hex(ca_cert.fingerprint(hashes.SHA256())),
    )


def certificate_fingerprint(path: str | os.PathLike[str]) -> str:
    """SHA-256 of the (first) certificate in a PEM file, hex with colons: what `hemafed certs` printed and
    `openssl x509 -noout -fingerprint -sha256` prints, to confirm over the phone. ValueError: not a certificate."""
    certs = x509.load_pem_x509_certificates(Path(path).read_bytes())
    if not certs:
        raise ValueError("no certificate in the file")
    return _colon_hex(certs[0].fingerprint(hashes.SHA256()))


def _colon_hex(digest: bytes) -> str:
    text = digest.hex().upper()
    return ":".join(text[i:i + 2] for i in range(0, len(text), 2))


def leaf_certificate_der(cert_file: str | os.PathLike[str]) -> bytes:
    """The first certificate of a PEM file, DER-encoded (what TLS presents as the leaf)."""
    certs = x509.load_pem_x509_certificates(Path(cert_file).read_bytes())
    return certs[0].public_bytes(serialization.Encoding.DER)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )

