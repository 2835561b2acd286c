"""A site's privacy report: what its ethics board and data-protection officer file (HTML; PDF by `gui.app.report_pdf`).

Everything in it is read from the site's own records — the store (`core.privacy.store`: the privacy ledger, the
plans the operator accepted with the review they read, the round log, the outbound log, audits of the plan) and
its identity key — never from the aggregator. Plain words first, details after:

1. in plain words: who, which federation, what was promised and spent, what left the computer, the audit;
2. the federation: its name, the aggregator's address and TLS certificate fingerprint, this site's key, the
   keys of the sites it agreed masks with (and a pinned roster, when the site has one);
3. the plan as the operator accepted it: digest, date, operator, and the review's words;
4. the guarantee and its trust assumptions (local or distributed DP, t, c);
5. every round of the ledger with ε after it;
6. what left this computer: totals of the outbound log per kind, per protection and per round;
7. the empirical audit of this plan (`hemafed audit --site`), if one was run;
8. the software: version and the digest of the installed package.

`network.report_signature` signs the finished document with the site's identity key.
"""

from __future__ import annotations

import html
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from math import log10 as math_log10
from pathlib import Path

from hemafed.core.atomic import atomic_write_bytes
from hemafed.core.errors import HemafedError
from hemafed.core.privacy.ledger import LedgerEntry, PrivacyLedger
from hemafed.core.privacy.store import OutboundRecord, SiteStore
from hemafed.core.rounds.plan import FederationPlan
from hemafed.core.trust.identity import IdentityKey, short_fingerprint
from hemafed.network import outbound as O
from hemafed.network.privacy_statement import privacy_statement
from hemafed.network.provenance import package_digest, version


class ReportUnavailable(HemafedError, ValueError):
    """Nothing to report yet (no accepted plan and no ledger), or the federation named is unknown here."""


@dataclass
class SiteReport:
    """The facts a report holds (`gather`); `to_html` writes them."""

    generated: float
    site_fingerprint: str
    site_short: str
    federation_id: str
    acceptance: dict | None  # SiteStore.accepted_plans() row of the latest acceptance, or None
    plan: FederationPlan | None
    aggregator_url: str
    aggregator_certificate: str | None  # SHA-256 hex of its TLS certificate, as this site saw it
    peers: list[str]  # fingerprints of the sites this one agreed masks with
    roster: list[str]  # a pinned roster's fingerprints (empty: none pinned)
    budget: float | None
    delta: float | None
    accountant: str
    entries: list[LedgerEntry]
    outbound: list[OutboundRecord]
    audit: dict | None  # the latest audit result of the accepted plan
    version: str
    package_digest: str
    notes: list[str] = field(default_factory=list)

    @property
    def spent(self) -> float:
        return self.entries[-1].epsilon if self.entries else 0.0


def gather(state: Path, identity: IdentityKey, federation: str | None = None, roster: list[str] | None = None,
           now: float | None = None) -> SiteReport:
    """The facts of this site's report for `federation` (default: the one whose plan it accepted last)."""
    store = SiteStore(state)
    accepted = store.accepted_plans()
    if federation is None:
        if accepted:
            federation = accepted[-1]["federation_id"]
        else:
            ledgers = _ledger_ids(store)
            if len(ledgers) != 1:
                raise ReportUnavailable("this site has not accepted a plan yet" if not ledgers else
                                        f"this site has ledgers of several federations ({', '.join(ledgers)}): "
                                        "name one")
            federation = ledgers[0]
    mine = [a for a in accepted if a["federation_id"] == federation]
    acceptance = mine[-1] if mine else None
    plan = FederationPlan.from_dict(acceptance["plan"]) if acceptance else None
    try:
        ledger = PrivacyLedger(federation, state=state)
        entries, budget, delta, kind = list(ledger.entries), ledger.budget_epsilon, ledger.delta, ledger.kind
    except FileNotFoundError:
        if acceptance is None:
            raise ReportUnavailable(f"nothing recorded here for federation {federation!r}") from None
        entries, budget, delta, kind = [], None, None, "rdp"
    records = store.outbound(federation)
    aggregator = json.loads(acceptance["aggregator"]) if acceptance else {}
    certificate = aggregator.get("certificate_sha256")
    if certificate is None:  # from the handshake's record, when the acceptance predates it
        for r in records:
            if r.kind == "auth":
                certificate = json.loads(r.detail).get("certificate_sha256") or certificate
                aggregator.setdefault("url", json.loads(r.detail).get("aggregator", ""))
    peers = sorted({p for e in store.round_log(federation) if e["status"] == "started" for p in e.get("peers", [])})
    audits = store.audits(plan.digest()) if plan is not None else []
    return SiteReport(
        generated=time.time() if now is None else now, site_fingerprint=identity.fingerprint,
        site_short=short_fingerprint(identity.public_key), federation_id=federation, acceptance=acceptance,
        plan=plan, aggregator_url=aggregator.get("url", ""), aggregator_certificate=certificate, peers=peers,
        roster=sorted(roster or []), budget=budget, delta=delta, accountant=kind, entries=entries,
        outbound=records, audit=audits[-1]["result"] if audits else None, version=version(),
        package_digest=package_digest())


def _ledger_ids(store: SiteStore) -> list[str]:
    with store.connect() as con:
        return [row[0] for row in con.execute("SELECT federation_id FROM ledgers ORDER BY created")]


# ---------------------------------------------------------------------------------------------- writing it


def _when(t: float | None) -> str:
    return "—" if t is None else time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t))


def _day(t: float) -> str:
    return time.strftime("%d %B %Y", time.localtime(t)).lstrip("0")


def _num(x: float | None) -> str:
    """1e-05 as 10⁻⁵ (a power of ten), anything else as %g."""
    if x is None:
        return "—"
    exponent = round(math_log10(x)) if x > 0 else None
    if exponent is not None and abs(x - 10.0 ** exponent) < 1e-12 * 10.0 ** exponent and exponent < -2:
        return "10" + str(exponent).translate(str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹"))
    return f"{x:g}"


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _markdown_bold(text: str) -> str:
    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", _e(text)).replace("*", "")


def _size(n: int) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _table(headers: list[str], rows: list[list[str]], widths: list[int] | None = None, align: str = "",
           nowrap: bool = False) -> str:
    head = "".join(f'<th align="left"{f" width={widths[i]}%" if widths else ""}>{h}</th>'
                   for i, h in enumerate(headers))
    wrap = " nowrap" if nowrap else ""
    body = "".join("<tr>" + "".join(f'<td{" align=right" if i < len(align) and align[i] == "r" else ""}{wrap}>{c}'
                                    "</td>" for i, c in enumerate(row)) + "</tr>" for row in rows)
    return (f'<table class="grid" width="100%" cellspacing="0" cellpadding="3" border="1" '
            f'style="border-collapse: collapse">'
            f"<thead><tr>{head}</tr></thead>{body}</table>")


STYLE = """
body { font-family: 'DejaVu Sans', 'Helvetica', sans-serif; font-size: 9.5pt; color: #1a1a1a; }
h1 { font-size: 17pt; margin-bottom: 2px; }
h2 { font-size: 12.5pt; margin-top: 16px; margin-bottom: 4px; color: #16365c; }
p { margin-top: 3px; margin-bottom: 5px; }
.sub { color: #555555; font-size: 8.5pt; }
.box { background-color: #eef3f9; }
table.grid { border-color: #b8c4d0; border-style: solid; }
th { background-color: #dde6f0; font-weight: bold; }
td.k { font-weight: bold; width: 28%; }
.mono { font-family: 'DejaVu Sans Mono', monospace; font-size: 8.5pt; }
.ok { color: #1c6b2a; font-weight: bold; }
.bad { color: #a11d1d; font-weight: bold; }
"""


def plain_words(r: SiteReport) -> list[str]:
    """The report's first section: what happened and what it means, without the details."""
    out = []
    plan, acc = r.plan, r.acceptance
    if acc:
        name = f"<b>{_e(acc['operator'])}</b>" if acc["operator"] else "the site's operator (no name was set)"
        how = (f"{name} reviewed the federation's plan in the app and accepted it" if acc["decided"] == "operator"
               else f"the headless site run by {name} accepted the federation's plan automatically, because it was "
                    "within the limits set in the site's configuration")
        out.append(f"This hospital site (identity key {_e(r.site_short)}) joined the federation "
                   f"<b>{_e(r.federation_id)}</b>. On {_e(_day(acc['time']))} {how}, before anything was trained or "
                   "sent.")
    else:
        out.append(f"This hospital site (identity key {_e(r.site_short)}) took part in the federation "
                   f"<b>{_e(r.federation_id)}</b>; no record of the plan's acceptance is kept (it predates this "
                   "version).")
    if r.entries and r.budget is not None:
        out.append(f"It trained in <b>{len(r.entries)} rounds</b>, the last on {_e(_day(r.entries[-1].time))}. Its "
                   f"privacy loss is <b>ε = {r.spent:.3g}</b> of the budget ε = {r.budget:g} set for this "
                   f"federation (δ = {_num(r.delta)}): smaller ε is stronger protection of each patient image. "
                   "Each round was written to the site's privacy ledger before anything left the computer.")
    if plan is not None and plan.dp and plan.secagg and plan.dp_mode == "distributed":
        out.append("The images never left this computer. What did leave, each round, was one clipped, noised "
                   "sum of gradients, masked so that the aggregator can only open the sum over at least "
                   f"{plan.threshold} hospitals; the noise in that sum is what the ε above measures.")
    elif plan is not None and plan.dp:
        out.append("The images never left this computer. Each round's update carried the full differential-"
                   "privacy noise added here" + (", and was masked by secure aggregation." if plan.secagg else "."))
    if r.outbound:
        updates = [x for x in r.outbound if x.kind in O.UPDATE_KINDS]
        unmasked = [x for x in updates if x.protection not in (O.NOISED_MASKED, O.MASKED)]
        out.append(f"<b>{len(r.outbound)} messages</b> ({_size(sum(x.bytes for x in r.outbound))}) left this "
                   "computer, each recorded here with its size and a fingerprint of its exact bytes; "
                   + (f"{len(updates)} of them carried a model update, every one masked"
                      + (" and noised" if all(x.protection == O.NOISED_MASKED for x in updates) else "") + "."
                      if updates and not unmasked else
                      f"<span class=bad>{len(unmasked)} model updates left unmasked</span>." if unmasked else
                      "none carried a model update."))
    if r.audit is not None:
        a = r.audit
        eps_hat = a.get("epsilon_lower_bound", 0.0)
        held = eps_hat <= a.get("claimed_epsilon", 0.0)
        out.append(f"An empirical privacy audit of this plan (a simulated run with {a['gradient']['canaries']:,} "
                   f"planted test records) measured <b>ε̂ = {eps_hat:.2f}</b> at 95 % confidence, "
                   + ("<span class=ok>below the ε the accounting claims</span>: it found nothing wrong. "
                      if held else "<span class=bad>above the ε the accounting claims</span>. ")
                   + "ε̂ is a lower bound: it can show a claim is false, never that it is true.")
    else:
        out.append("No empirical audit of this plan has been recorded at this site (<span class=mono>hemafed audit "
                   "--site</span> runs one).")
    return out


def to_html(r: SiteReport) -> str:
    """The report as one HTML document (the PDF is rendered from it)."""
    plan, acc = r.plan, r.acceptance
    parts = [f"<html><head><meta charset='utf-8'><title>Privacy report — {_e(r.federation_id)}</title>"
             f"<style>{STYLE}</style></head><body>",
             f"<h1>Privacy report of a hospital site</h1>"
             f"<p class=sub>federation {_e(r.federation_id)} · site key {_e(r.site_fingerprint)} · written "
             f"{_e(_when(r.generated))} · signed with this site's identity key (check: <span class=mono>hemafed "
             f"report --verify FILE</span>)</p>",
             "<h2>1. In plain words</h2>", *(f"<p>{p}</p>" for p in plain_words(r))]

    parts.append("<h2>2. The federation</h2>")
    rows = [["federation", _e(r.federation_id)],
            ["aggregator", _e(r.aggregator_url or "—")],
            ["aggregator's TLS certificate (SHA-256)",
             f"<span class=mono>{_e(_grouped(r.aggregator_certificate))}</span>" if r.aggregator_certificate
             else "— (not recorded)"],
            ["this site's identity key", f"<span class=mono>{_e(r.site_fingerprint)}</span><br>read out by phone "
                                         f"as {_e(r.site_short)}"],
            ["sites this one agreed masks with", "<br>".join(f"<span class=mono>{_e(p)}</span>" for p in r.peers)
             or "— (none recorded)"]]
    if r.roster:
        rows.append(["pinned roster (the only peers accepted)",
                     "<br>".join(f"<span class=mono>{_e(p)}</span>" for p in r.roster)])
    parts.append(_kv(rows))

    parts.append("<h2>3. The plan as the operator accepted it</h2>")
    if acc and plan is not None:
        parts.append(_kv([["plan digest", f"<span class=mono>{_e(acc['digest'])}</span>"],
                          ["accepted", _e(_when(acc["time"]))],
                          ["by", _e(acc["operator"] or "— (no operator name set in the app or site.toml)")],
                          ["how", "after reviewing it in the app" if acc["decided"] == "operator" else
                           "automatically by the headless site: the plan was within the bounds of its site.toml"]]))
        parts.append("<p>The review shown for this plan (in the app, before accepting), word for word:</p>")
        parts.append(_kv([[_e(k), _safe_markup(v)] for k, v in acc["review"]]))
    else:
        parts.append("<p>No acceptance is recorded for this federation.</p>")

    parts.append("<h2>4. The guarantee and what it assumes</h2>")
    if plan is not None:
        statement = privacy_statement(dp=plan.dp, secagg=plan.secagg, epsilon=r.budget, delta=r.delta or plan.delta,
                                      threshold=plan.threshold if plan.secagg else None,
                                      accountant=r.accountant.upper(), dp_mode=plan.dp_mode,
                                      colluders=plan.dp_colluders)
        parts += [f"<p>{_markdown_bold(p)}</p>" for p in statement.split("\n\n")]
        if plan.dp and plan.dp_mode == "distributed":
            parts.append(f"<p><b>Trust assumptions, in short:</b> distributed DP with t = {plan.threshold} and "
                         f"c = {plan.dp_colluders}: the aggregator follows the protocol, at most "
                         f"{plan.dp_colluders} site(s) pool their noise shares with it, and no round's sum is opened "
                         f"over fewer than {plan.threshold} sites. A site that trusts no one requires local DP "
                         "instead (its bounds in site.toml).</p>")
    else:
        parts.append("<p>The plan was not recorded; see the ledger below for what each round recorded.</p>")

    parts.append("<h2>5. Every round in the privacy ledger</h2>")
    parts += _ledger_section(r)

    parts.append("<h2>6. What left this computer</h2>")
    parts += _outbound_section(r)

    parts.append("<h2>7. Empirical privacy audit</h2>")
    parts += _audit_section(r)

    parts.append("<h2>8. The software</h2>")
    parts.append(_kv([["hemafed version", _e(r.version)],
                      ["installed package (SHA-256 of its files)",
                       f"<span class=mono>{_e(_grouped(r.package_digest))}</span>"],
                      ["this report written", _e(_when(r.generated))]]))
    parts.append("<p class=sub>The signature appended to this file covers every byte before it. "
                 "<span class=mono>hemafed report --verify FILE --expect FINGERPRINT</span> checks it and that the "
                 "key is this site's; a single changed byte makes the check fail.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


_ALLOWED_TAGS = re.compile(r"&lt;(/?(?:b|i|br))&gt;")


def _safe_markup(text: str) -> str:
    """The review's text with its own few tags (<b>, <i>, <br>) kept and everything else escaped: parts of it come
    from the plan, i.e. from the aggregator."""
    return _ALLOWED_TAGS.sub(r"<\1>", _e(text))


def _kv(rows: list[list[str]]) -> str:
    body = "".join(f"<tr><td class=k width=30%>{k}</td><td>{v}</td></tr>" for k, v in rows)
    return (f'<table class="grid" width="100%" cellspacing="0" cellpadding="3" border="1" '
            f'style="border-collapse: collapse">{body}</table>')


def _grouped(hexdigest: str | None) -> str:
    return " ".join(hexdigest[i:i + 8] for i in range(0, len(hexdigest), 8)) if hexdigest else ""


def _ledger_section(r: SiteReport) -> list[str]:
    if not r.entries:
        return ["<p>No round is recorded in this federation's ledger.</p>"]
    first = r.entries[0]
    shared = {(e.sigma, e.sample_rate, e.steps, e.dp_mode, e.threshold, e.colluders) for e in r.entries}
    out = [f"<p>{len(r.entries)} rounds from {_e(_day(first.time))} to {_e(_day(r.entries[-1].time))}, accounted "
           f"with {_e(r.accountant.upper())} at δ = {_num(r.delta)}; budget ε = {r.budget:g}, spent "
           f"ε = {r.spent:.4g}.</p>"]
    if len(shared) == 1:
        out.append(f"<p>Every round: noise multiplier σ = {first.sigma:.4g}, sampling rate q = {first.sample_rate:g}, "
                   f"{first.steps} step(s); " + _e(first.protection) + ".</p>")
        per_row = 3
        cells = [[str(e.round) + (f" (run {e.attempt})" if e.attempt > 1 else ""),
                  _e(time.strftime("%d %b %H:%M", time.localtime(e.time))).replace(" ", "&nbsp;"), f"{e.epsilon:.4f}"]
                 for e in r.entries]
        rows = []
        for i in range(0, len(cells), per_row):
            chunk = cells[i:i + per_row]
            rows.append([c for cell in chunk for c in cell] + [""] * (3 * (per_row - len(chunk))))
        out.append(_table(["round", "recorded", "ε after"] * per_row, rows, align="rlr" * per_row,
                          widths=[9, 14, 10] * per_row, nowrap=True))
    else:
        out.append(_table(["round", "recorded", "σ", "q", "steps", "protection", "ε after"],
                          [[str(e.round), _e(_when(e.time)), f"{e.sigma:.4g}", f"{e.sample_rate:g}", str(e.steps),
                            _e(e.dp_mode + (f", t = {e.threshold}, c = {e.colluders}" if e.threshold else "")),
                            f"{e.epsilon:.4f}"] for e in r.entries], align="rlrrrlr"))
    return out


def _outbound_section(r: SiteReport) -> list[str]:
    records = r.outbound
    if not records:
        return ["<p>No message is recorded as sent for this federation.</p>"]
    out = [f"<p>The site's outbound log lists <b>{len(records)} messages, {_size(sum(x.bytes for x in records))}</b> "
           f"in all, from {_e(_when(records[0].time))} to {_e(_when(records[-1].time))}; each row of the log holds "
           "the time, round, stage, kind, exact size and SHA-256 of the bytes sent (<span class=mono>hemafed site "
           "--outbound</span> or the app's <i>What left this computer</i> page list them one by one).</p>"]
    by_kind = O.totals(records, lambda x: (x.kind, x.protection))
    out.append(_table(["kind", "what it carries", "protection", "count", "bytes"],
                      [[f"<span class=mono>{_e(k)}</span>", _e(O.describe(k)), _e(p), str(t.messages), f"{t.bytes:,}"]
                       for (k, p), t in by_kind.items()], widths=[28, 39, 15, 8, 10], align="lllrr"))
    by_round = O.totals(records, lambda x: x.round)
    rounds = [k for k in by_round if k]  # round 0: joining and handshakes
    joining = by_round.get(0)
    if joining is not None:
        out.append(f"<p>Before round 1 (connecting and joining): {joining.messages} messages, {joining.bytes:,} "
                   "bytes.</p>")
    if rounds:
        sizes = sorted({(by_round[k].messages, by_round[k].bytes) for k in rounds})
        if len(sizes) <= 3:
            out.append("<p>Per round: " + "; ".join(
                f"{sum(1 for k in rounds if (by_round[k].messages, by_round[k].bytes) == s)} rounds of "
                f"{s[0]} messages and {s[1]:,} bytes" for s in sizes) + ".</p>")
        else:
            out.append(_table(["round", "messages", "bytes"],
                              [[str(k), str(by_round[k].messages), f"{by_round[k].bytes:,}"] for k in rounds],
                              align="rrr"))
    return out


def _bound(b: dict) -> str:
    if not b["guesses"]:
        return f"{b['epsilon_lower_bound']:.3f} — no better than chance"
    return f"{b['epsilon_lower_bound']:.3f} — {b['correct']} of {b['guesses']} guesses right"


def _audit_section(r: SiteReport) -> list[str]:
    a = r.audit
    if a is None:
        return ["<p>No audit of this plan is recorded at this site. <span class=mono>hemafed audit --site STATE_DIR"
                "</span> runs one (a simulation of this plan on public images with planted test records) and "
                "records it here.</p>"]
    g, i = a["gradient"], a.get("input") or {}
    rows = [["ε the ledger accounting claims", f"{a['claimed_epsilon']:.3f} (δ = {a['delta']:g})"],
            ["ε̂ from gradient canaries (the aggregator's view)", f"{_bound(g)}, {g['canaries']:,} canaries"],
            ["ε̂ from input canaries (the final model alone)", f"{_bound(i)}, {i['canaries']:,} canaries" if i else "—"],
            ["confidence", f"{g['confidence']:.0%}"],
            ["noise measured / noise promised", f"{a['noise_ratio']:.3f}"],
            ["run", f"{_e(a.get('when', ''))}, {a['seconds'] / 60:.1f} min, {_e(a.get('version', ''))}"]]
    return [_kv(rows),
            "<p>ε̂ is a <b>lower bound</b> on the true ε: a run whose planted records are recognised too well proves "
            "the privacy claim false (ε̂ above ε); a run where they are not cannot prove it true, and a correct "
            "implementation is expected to give ε̂ well below ε (the accounting covers the worst case over every "
            "possible attack and dataset; one run can only test part of it). docs/privacy.md explains it.</p>"]


# ---------------------------------------------------------------------------------------------- the files

PdfRenderer = Callable[[str, str, str], bytes]  # (html, title, footer) -> PDF bytes: gui.app.report_pdf.html_to_pdf


def export_report(report: SiteReport, identity: IdentityKey, paths: list[Path],
                  pdf: PdfRenderer | None = None) -> list[Path]:
    """Write the signed report to each of `paths` (.pdf needs `pdf`, .html or .htm need nothing); returns them."""
    from hemafed.network.report_signature import sign_document

    page = to_html(report)
    written = []
    for path in paths:
        suffix = Path(path).suffix.lower()
        if suffix == ".pdf":
            if pdf is None:
                raise ValueError("a PDF needs the desktop app's Qt (pip install 'hemafed[gui]'); write .html instead")
            footer = f"hemafed privacy report · {report.federation_id} · site {report.site_short}"
            data = sign_document(pdf(page, f"Privacy report — {report.federation_id}", footer), identity, "pdf")
        elif suffix in (".html", ".htm"):
            data = sign_document(page.encode(), identity, "html")
        else:
            raise ValueError(f"{path}: the report is written as .pdf or .html")
        atomic_write_bytes(Path(path), data, mode=0o644)
        written.append(Path(path))
    return written
