from __future__ import annotations

import os
import stat

import pytest

from hemafed.core.trust.identity import (
    IdentityError,
    IdentityKey,
    allowed_sites,
    fingerprint,
    init_identity,
    key_path,
    load_identity,
    parse_public_line,
    public_raw,
    short_fingerprint,
    verify,
)

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")


def _mode(path: os.PathLike[str]) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@posix_only
def test_init_writes_owner_only_key_and_loads_it_back(tmp_path):
    created = init_identity(tmp_path)
    assert created.path == key_path(tmp_path)
    assert _mode(created.path) == 0o600
    assert _mode(created.path.parent) == 0o700
    loaded = load_identity(tmp_path)
    assert loaded.public_bytes == created.public_bytes
    assert verify(loaded.public_key, created.sign(b"x"), b"x")
    assert not any(p.name.endswith(".tmp") for p in created.path.parent.iterdir())


def test_default_location_is_the_state_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("HEMAFED_STATE_DIR", str(tmp_path / "st"))
    ident = init_identity()
    assert ident.path is not None and ident.path.is_relative_to(tmp_path / "st")


def test_refuses_to_overwrite_unless_forced(tmp_path):
    first = init_identity(tmp_path)
    with pytest.raises(IdentityError, match="already exists"):
        init_identity(tmp_path)
    assert load_identity(tmp_path).public_bytes == first.public_bytes
    second = init_identity(tmp_path, force=True)
    assert second.public_bytes != first.public_bytes
    assert load_identity(tmp_path).public_bytes == second.public_bytes


@posix_only
def test_load_refuses_a_key_others_can_read(tmp_path):
    ident = init_identity(tmp_path)
    os.chmod(ident.path, 0o644)
    with pytest.raises(IdentityError, match=r"too open.*chmod 600"):
        load_identity(tmp_path)


def test_load_explains_a_missing_key(tmp_path):
    with pytest.raises(IdentityError, match="hemafed keys init"):
        load_identity(tmp_path)


def test_load_refuses_a_garbage_file(tmp_path):
    path = key_path(tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not a key")
    os.chmod(path, 0o600)
    with pytest.raises(IdentityError, match="not a readable private key"):
        load_identity(tmp_path)


def test_public_line_round_trip_with_comment():
    ident = IdentityKey.generate()
    line = ident.public_line("St  Mary's\nhaematology")
    assert "\n" not in line and line.startswith("hemafed-ed25519 ")
    assert public_raw(parse_public_line(line)) == ident.public_bytes
    assert public_raw(parse_public_line(ident.public_line())) == ident.public_bytes


@pytest.mark.parametrize(
    "line, match",
    [
        ("ssh-ed25519 AAAA", "not a hemafed public key"),
        ("hemafed-ed25519", "not a hemafed public key"),
        ("hemafed-ed25519 !!!notbase64", "base64"),
        ("hemafed-ed25519 AAAA", "32 bytes"),
    ],
)
def test_parse_public_line_rejects(line, match):
    with pytest.raises(IdentityError, match=match):
        parse_public_line(line)


def test_fingerprints_are_stable_and_readable():
    ident = IdentityKey.generate()
    fp = fingerprint(ident.public_key)
    assert fp.startswith("SHA256:") and len(fp) == 7 + 43
    assert fp == fingerprint(ident.public_bytes) == ident.fingerprint
    short = short_fingerprint(ident.public_key)
    assert len(short.split()) == 5 and all(len(g) == 4 for g in short.split())


def test_allowed_sites_maps_keys_to_names_and_refuses_ambiguity():
    a, b = IdentityKey.generate(), IdentityKey.generate()
    table = allowed_sites({"site-a": a.public_line("x"), "site_b": b.public_key})
    assert table == {a.public_bytes: "site-a", b.public_bytes: "site_b"}
    with pytest.raises(IdentityError, match="same key"):
        allowed_sites({"a": a.public_line(), "b": a.public_line()})
    with pytest.raises(IdentityError, match="site name"):
        allowed_sites({"bad name": a.public_line()})
