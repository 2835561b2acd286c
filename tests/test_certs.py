from __future__ import annotations

import ipaddress
import os
import stat

import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store

from hemafed.core.trust.certs import create_federation_certs
from hemafed.gui.cli import main


def test_creates_ca_and_server_cert_valid_for_the_hosts(tmp_path):
    made = create_federation_certs(tmp_path, ["agg.example.org", "127.0.0.1"])
    ca = x509.load_pem_x509_certificate(made.ca_file.read_bytes())
    chain = x509.load_pem_x509_certificates(made.cert_file.read_bytes())
    leaf = chain[0]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["agg.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]

    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(x509.DNSName("agg.example.org"))
    verifier.verify(leaf, chain[1:])
    other = create_federation_certs(tmp_path / "other", ["agg.example.org"])
    with pytest.raises(x509.verification.VerificationError):
        PolicyBuilder().store(Store([x509.load_pem_x509_certificate(other.ca_file.read_bytes())])) \
            .build_server_verifier(x509.DNSName("agg.example.org")).verify(leaf, [])
    assert made.ca_key_file is None and not (tmp_path / "ca.key").exists()
    assert len(made.ca_fingerprint.split(":")) == 32


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_private_keys_are_owner_only(tmp_path):
    made = create_federation_certs(tmp_path, ["localhost"], keep_ca_key=True)
    assert stat.S_IMODE(os.stat(made.key_file).st_mode) == 0o600
    assert made.ca_key_file is not None and stat.S_IMODE(os.stat(made.ca_key_file).st_mode) == 0o600


def test_refuses_to_overwrite(tmp_path):
    create_federation_certs(tmp_path, ["localhost"])
    with pytest.raises(FileExistsError):
        create_federation_certs(tmp_path, ["localhost"])
    create_federation_certs(tmp_path, ["localhost"], force=True)


def test_cli_certs_and_keys(tmp_path, capsys):
    assert main(["certs", "--out", str(tmp_path / "c"), "--host", "localhost", "--host", "127.0.0.1"]) == 0
    out = capsys.readouterr().out
    assert "ca.pem" in out and "CA fingerprint" in out
    assert main(["certs", "--out", str(tmp_path / "c"), "--host", "localhost"]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err

    state = str(tmp_path / "state")
    assert main(["keys", "init", "--state", state, "--comment", "site 1"]) == 0
    out = capsys.readouterr().out
    assert "SHA256:" in out and "hemafed-ed25519 " in out and "site 1" in out
    assert main(["keys", "init", "--state", state]) == 1
    assert main(["keys", "show", "--state", state]) == 0
    shown = capsys.readouterr().out
    assert out.split("fingerprint: ")[1].split()[0] in shown
