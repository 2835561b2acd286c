"""Render the screen's JSON lines as a markdown table (research helper).

    python -m bench.accuracy.table /tmp/acc/screen.jsonl
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    with open(sys.argv[1]) as fh:
        rows = [json.loads(line) for line in fh]
    print("| tag | split | ε | mode | alone | features | T | B | lr | EMA | σ | accuracy | seeds | s/run |")
    print("|---|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        feats = "full 7×7" if not r.get("pool") else f"pool {r['pool']}" + (
            f"+{r['extra_pool']}" if r.get("extra_pool") else "") + (f", log {r['log']}" if r.get("log") else "") + (
            f", orbit {r['orbit']}" if r.get("orbit") else "")
        acc = f"{r['acc_mean']:.4f}" + (f" ± {r['acc_std']:.4f}" if len(r["runs"]) > 1 else "")
        eps = "∞" if r["eps"] == 0 else f"{r['eps']:g}"
        secs = sum(x["seconds"] for x in r["runs"]) / len(r["runs"])
        print(f"| {r['tag']} | {r['split']} | {eps} | {r['mode']} | {r.get('alone') or '–'} | {feats} | "
              f"{r['steps']} | {r['batch']:g} | {r['lr']:g} | {r['ema']:g} | {r['runs'][0]['sigma']:.3f} | "
              f"{acc} | {len(r['runs'])} | {secs:.0f} |")


if __name__ == "__main__":
    main()
