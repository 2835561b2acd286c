"""Roster pinning: a signed roster verifies only under the federation key, and a site's secure-aggregation
machine refuses a round whose participant list holds a key off the roster."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hemafed.core.secagg import ConsistencyError, SecAggConfig, SiteSecAgg
from hemafed.core.trust.identity import IdentityKey
from hemafed.core.trust.roster import RosterError, load_signed_roster, roster_from_fingerprints, write_roster
from hemafed.gui.cli import main as cli_main


def _sites(n: int) -> tuple[dict[int, IdentityKey], dict[str, str]]:
    keys = {i: IdentityKey.generate() for i in range(1, n + 1)}
    return keys, {f"site{i}": k.public_line(f"site{i}") for i, k in keys.items()}


def _cfg() -> SecAggConfig:
    return SecAggConfig(federation_id="fed", threshold=2, dim=4, n_extras=1, clip=1.0, max_sites=8, max_weight=100)


def test_signed_roster_pins_the_round(tmp_path: Path) -> None:
    admin = IdentityKey.generate()
    keys, lines = _sites(3)
    path = write_roster(tmp_path / "roster.json", admin, "fed", lines)
    roster = load_signed_roster(path, admin.public_line(), "fed")
    peers = {i: k.public_key for i, k in keys.items()}
    SiteSecAgg(_cfg(), 1, 1, keys[1].private_key, peers, roster=roster)
    intruder = dict(peers)
    intruder[2] = IdentityKey.generate().public_key
    with pytest.raises(ConsistencyError, match="roster"):
        SiteSecAgg(_cfg(), 1, 1, keys[1].private_key, intruder, roster=roster)


def test_roster_refused_when_altered_resigned_or_for_another_federation(tmp_path: Path) -> None:
    admin = IdentityKey.generate()
    _, lines = _sites(3)
    path = write_roster(tmp_path / "roster.json", admin, "fed", lines)
    with pytest.raises(RosterError, match="roster of federation 'fed'"):
        load_signed_roster(path, admin.public_line(), "other-fed")
    # the aggregator host holds no federation key: a roster it re-signs with its own key is refused
    with pytest.raises(RosterError, match="not signed"):
        load_signed_roster(path, IdentityKey.generate().public_line(), "fed")
    data = json.loads(path.read_text())
    data["sites"]["evil"] = IdentityKey.generate().public_line("evil")
    path.write_text(json.dumps(data))
    with pytest.raises(RosterError, match="not signed"):
        load_signed_roster(path, admin.public_line(), "fed")
    path.write_text("{not json")
    with pytest.raises(RosterError, match="cannot read"):
        load_signed_roster(path, admin.public_line(), "fed")


def test_fingerprint_roster_from_site_toml_entries() -> None:
    keys, lines = _sites(2)
    roster = roster_from_fingerprints([keys[1].fingerprint, lines["site2"]])
    assert keys[1].public_bytes in roster and keys[2].public_bytes in roster
    assert IdentityKey.generate().public_bytes not in roster and len(roster) == 2
    with pytest.raises(RosterError):
        roster_from_fingerprints(["SHA256:short"])
    with pytest.raises(RosterError, match="empty"):
        roster_from_fingerprints([])


def test_roster_sign_command(tmp_path: Path, capsys) -> None:
    admin_state = tmp_path / "admin"
    assert cli_main(["keys", "init", "--state", str(admin_state)]) == 0
    _, lines = _sites(2)
    fed = tmp_path / "federation.toml"
    fed.write_text("[plan]\nfederation_id = \"fed\"\n\n[sites]\n" + "".join(
        f'{name} = "{line}"\n' for name, line in lines.items()))
    out = tmp_path / "roster.json"
    capsys.readouterr()
    assert cli_main(["roster", "sign", "--admin-state", str(admin_state), "--config", str(fed), "--out",
                     str(out)]) == 0
    printed = capsys.readouterr().out
    key_line = next(line for line in printed.splitlines() if line.startswith("hemafed-ed25519"))
    roster = load_signed_roster(out, key_line, "fed")
    assert len(roster) == 2 and roster.federation_id == "fed"
