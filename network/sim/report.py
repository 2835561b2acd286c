"""Writing a simulation's results folder: metrics.json, accuracy.png, epsilon.png, report.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hemafed.network.privacy_statement import privacy_statement


def write_metrics(out: Path, metrics: dict[str, Any]) -> Path:
    path = out / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2, sort_keys=False))
    return path


def write_plots(out: Path, metrics: dict[str, Any]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = metrics["rounds"]
    xs = [r["round"] for r in rounds]
    tested = [(r["round"], r["test_accuracy"]) for r in rounds if r.get("test_accuracy") is not None]
    many = len(rounds) > 60
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    ax.plot([0, *(x for x, _ in tested)], [metrics["initial_test_accuracy"], *(y for _, y in tested)],
            marker="." if many else "o", label="global model, held-out test split")
    fed = [(r["round"], r["fed_val_accuracy"]) for r in rounds if r.get("fed_val_accuracy") is not None]
    if fed:
        ax.plot([x - 1 for x, _ in fed], [y for _, y in fed], marker=None if many else "s", linestyle="--",
                label="federated validation (model sent in round)")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(metrics["title"])
    ax.legend(loc="lower right")
    fig.tight_layout()
    acc_path = out / "accuracy.png"
    fig.savefig(acc_path)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    sites = sorted({s for r in rounds for s in r.get("epsilon", {})})
    for site in sites:
        ax.plot(xs, [r.get("epsilon", {}).get(site) for r in rounds], marker=None if many else ".", label=site)
    budget = metrics["plan"].get("epsilon_budget")
    if budget:
        ax.axhline(budget, color="red", linestyle=":", label=f"budget ε = {budget:g}")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"ε spent (δ = {metrics['plan']['delta']:g})")
    ax.grid(alpha=0.3)
    ax.set_title("privacy spent per hospital")
    if sites:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    eps_path = out / "epsilon.png"
    fig.savefig(eps_path)
    plt.close(fig)
    return [acc_path, eps_path]


def _spans(rounds: list[int]) -> str:
    """1, 2, 3, 7, 9, 10 → "1–3, 7, 9–10"."""
    out, start = [], None
    for i, r in enumerate(rounds):
        if start is None:
            start = r
        if i + 1 == len(rounds) or rounds[i + 1] != r + 1:
            out.append(f"{start}" if start == r else f"{start}–{r}")
            start = None
    return ", ".join(out)


def _participation(metrics: dict[str, Any]) -> list[str]:
    """Which hospitals missed which rounds (a late join, a dropout, a decline), in words."""
    total = len(metrics["rounds"])
    everyone = metrics["final"].get("rounds_with_every_site", total)
    missed = metrics.get("missed_rounds", {})
    if not missed:
        return [f"**Every hospital took part in every round** ({total} of {total})."]
    lines = [f"**Rounds with every hospital: {everyone} of {total}.** Hospitals missing from rounds (their images "
             "were not in those rounds' updates):", ""]
    for site, rounds in sorted(missed.items()):
        late = rounds[0] == 1 and rounds == list(range(1, len(rounds) + 1))
        what = f"joined late, at round {len(rounds) + 1}" if late else "missed rounds"
        lines.append(f"- {site}: {what} ({len(rounds)} rounds: {_spans(rounds)})")
    return lines


def write_report(out: Path, metrics: dict[str, Any]) -> Path:
    plan = metrics["plan"]
    rounds = metrics["rounds"]
    lines = [f"# {metrics['title']}", "", f"Command: `{metrics['command']}`", ""]
    lines += ["## Plan", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in plan.items()]
    lines += ["", "## Privacy", "", privacy_statement(
        dp=plan["dp"], secagg=plan["secagg"], epsilon=plan.get("epsilon_budget"), delta=plan["delta"],
        threshold=plan.get("threshold"), dp_mode=plan.get("dp_mode", "local"),
        colluders=plan.get("dp_colluders", 1)), ""]
    lines += ["## Results", "",
              f"Test accuracy of the untrained model: {metrics['initial_test_accuracy']:.3f}. "
              f"Final test accuracy: **{metrics['final']['test_accuracy']:.3f}** "
              f"(held-out BloodMNIST test split, {metrics['final']['test_images']} images). "
              f"Largest ε spent by a hospital: {metrics['final']['max_epsilon']}. "
              f"Wall time: {metrics['final']['wall_s']:.0f} s.", "", *_participation(metrics), "",
              "| round | status | test acc. | fed. val. acc. | sites | dropped / declined | max ε | wall s |",
              "|---|---|---|---|---|---|---|---|"]
    if len(rounds) > 60:
        lines.insert(len(lines) - 2, "Rounds whose model was tested, and every round with a dropout, decline or "
                                     "abandon (all rounds: metrics.json).\n")
    for r in rounds:
        if len(rounds) > 60 and r.get("test_accuracy") is None and r["status"] == "completed" \
                and not r.get("dropouts") and not r.get("declined"):
            continue
        eps = max(r.get("epsilon", {}).values(), default=None)
        fed = r.get("fed_val_accuracy")
        gone = ", ".join(r.get("dropouts", []) + [f"{s} (declined)" for s in r.get("declined", [])]) or "–"
        lines.append(
            f"| {r['round']} | {r['status']} | "
            f"{'–' if r.get('test_accuracy') is None else format(r['test_accuracy'], '.3f')} | "
            f"{'–' if fed is None else f'{fed:.3f}'} | {len(r.get('participants', []))} | {gone} | "
            f"{'–' if eps is None else f'{eps:.2f}'} | {r.get('wall_s', 0):.1f} |")
    lines += ["", "![accuracy](accuracy.png)", "", "![epsilon](epsilon.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
