"""The two configuration files: the aggregator's `federation.toml` and a site's `site.toml`.

Relative paths are taken relative to the file that names them, so a folder of
configs can be moved as a whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hemafed.core.rounds.plan import FederationPlan, PlanError, SiteBounds, load_toml


def _plan(section: dict[str, Any], n_sites: int, path: Path) -> FederationPlan:
    """The [plan] as written; or, when it gives `epsilon` (each site's budget) and `expected_images`
    (the training images all sites hold together), the recommended recipe for that budget, with
    σ computed here (`core.recipe`) and any other fields in the section overriding the recipe."""
    if "epsilon" not in section and "expected_images" not in section:
        return FederationPlan.from_dict(section)
    from hemafed.core.learning.recipe import recommended_plan  # only when asked: it loads torch (start-up time)

    fields = dict(section)
    epsilon, images = fields.pop("epsilon", None), fields.pop("expected_images", None)
    if epsilon is None or images is None:
        raise PlanError(f"{path}: [plan] needs both epsilon (each site's budget) and expected_images (about "
                        "how many training images all sites hold together) to use the recommended recipe")
    dp_mode = fields.pop("dp_mode", "distributed")
    try:
        return recommended_plan(epsilon, images, n_sites, dp_mode, **fields)
    except PlanError as exc:
        raise PlanError(f"{path}: {exc}") from exc


@dataclass(frozen=True)
class AggregatorConfig:
    plan: FederationPlan
    sites: dict[str, str]  # site name -> "hemafed-ed25519 ..." public-key line
    state_dir: Path
    host: str = "127.0.0.1"
    port: int = 8765
    cert: Path | None = None
    key: Path | None = None
    insecure: bool = False
    port_file: Path | None = None  # where to write the bound port (useful with port 0)
    # Resource caps (docs/deployment.md): peers that have not authenticated yet, in all and
    # per address; how long one message to a site may take to send before that site is dropped.
    max_unauthenticated: int = 256
    max_unauthenticated_per_address: int = 32
    send_timeout_s: float = 60.0

    def server_options(self) -> dict[str, Any]:
        return {"max_unauthenticated": self.max_unauthenticated,
                "max_unauthenticated_per_address": self.max_unauthenticated_per_address,
                "send_timeout": self.send_timeout_s}

    @classmethod
    def load(cls, path: str | Path) -> AggregatorConfig:
        path = Path(path)
        data = load_toml(path)
        section = _section(data, "federation", path)
        sites = _section(data, "sites", path)
        if not sites or not all(isinstance(v, str) for v in sites.values()):
            raise PlanError(f"{path}: [sites] must map each site name to its public-key line")
        plan = _plan(_section(data, "plan", path), len(sites), path)
        base = path.parent
        insecure = bool(section.get("insecure", False))
        cert, key = _opt_path(base, section.get("cert")), _opt_path(base, section.get("key"))
        if not insecure and (cert is None or key is None):
            raise PlanError(f"{path}: TLS needs [federation] cert and key (or insecure = true for local tests)")
        return cls(
            plan=plan, sites=dict(sites), state_dir=base / section.get("state_dir", "aggregator-state"),
            host=str(section.get("host", "127.0.0.1")), port=int(section.get("port", 8765)),
            cert=cert, key=key, insecure=insecure, port_file=_opt_path(base, section.get("port_file")),
            max_unauthenticated=_positive(section, "max_unauthenticated", 256, path),
            max_unauthenticated_per_address=_positive(section, "max_unauthenticated_per_address", 32, path),
            send_timeout_s=float(_positive(section, "send_timeout_s", 60.0, path)),
        )


@dataclass(frozen=True)
class SiteConfig:
    data: Path
    state_dir: Path
    aggregator: str
    epsilon: float
    federation: str | None = None
    ca_file: Path | None = None
    insecure: bool = False
    accountant: str = "rdp"
    bounds: SiteBounds = field(default_factory=SiteBounds)
    torch_threads: int | None = None
    roster: Path | None = None  # roster.json signed by the federation key (see hemafed.core.trust.roster)
    roster_key: str | None = None  # the federation key's public line, confirmed by phone
    peers: tuple[str, ...] = ()  # or: the peers' fingerprints / key lines, listed by this site itself
    # Seeds this site's randomness (samples, noise, rounding) so a simulation replays exactly. Anyone who knows
    # the seed can then remove the noise: `hemafed simulate` sets it for its simulated hospitals; a hospital
    # never should (the site logs a warning when it is set).
    simulation_seed: int | None = None
    # Who operates this site: recorded with each plan they accept and printed in the site's privacy report.
    operator: str = ""

    def pinned_roster(self):
        """The roster this site pins (a `hemafed.core.trust.roster.Roster`), or None when it pins none."""
        from hemafed.core.trust.roster import RosterError, load_signed_roster, roster_from_fingerprints  # rarely used

        if self.roster is not None:
            if not self.roster_key:
                raise RosterError("site.toml names a roster but no roster_key to verify it with")
            return load_signed_roster(self.roster, self.roster_key, self.federation)
        return roster_from_fingerprints(self.peers) if self.peers else None

    @classmethod
    def load(cls, path: str | Path) -> SiteConfig:
        path = Path(path)
        data = load_toml(path)
        section = _section(data, "site", path)
        base = path.parent
        for required in ("data", "aggregator", "epsilon"):
            if required not in section:
                raise PlanError(f"{path}: [site] needs '{required}'")
        return cls(
            data=base / section["data"], state_dir=base / section.get("state_dir", "site-state"),
            aggregator=str(section["aggregator"]), epsilon=float(section["epsilon"]),
            federation=section.get("federation"), ca_file=_opt_path(base, section.get("ca_file")),
            insecure=bool(section.get("insecure", False)), accountant=str(section.get("accountant", "rdp")),
            bounds=SiteBounds.from_dict(dict(data.get("bounds", {}))),
            torch_threads=section.get("torch_threads"),
            roster=_opt_path(base, section.get("roster")), roster_key=section.get("roster_key"),
            peers=tuple(section.get("peers", ())),
            simulation_seed=_opt_int(section, "simulation_seed", path),
            operator=str(section.get("operator", "")),
        )


def _section(data: dict[str, Any], name: str, path: Path) -> dict[str, Any]:
    value = data.get(name)
    if not isinstance(value, dict):
        raise PlanError(f"{path}: missing [{name}] section")
    return value


def _positive(section: dict[str, Any], name: str, default: float, path: Path) -> Any:
    value = section.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise PlanError(f"{path}: [federation] {name} must be a positive number")
    return value


def _opt_int(section: dict[str, Any], name: str, path: Path) -> int | None:
    value = section.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise PlanError(f"{path}: [site] {name} must be an integer")
    return value


def _opt_path(base: Path, value: str | None) -> Path | None:
    return None if value is None else base / value


def toml_value(value: Any) -> str:
    """Render a scalar or list for the small TOML files hemafed writes itself."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def render_toml(sections: dict[str, dict[str, Any]]) -> str:
    out = []
    for name, values in sections.items():
        out.append(f"[{name}]")
        out += [f"{k} = {toml_value(v)}" for k, v in values.items() if v is not None]
        out.append("")
    return "\n".join(out)
