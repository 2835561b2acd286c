"""Writing simulated hospital image folders from BloodMNIST, for trying the site app
and the headless site on realistic folders."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .bloodmnist import load_splits, locate
from .classes import BLOODMNIST_CLASSES
from .partition import PartitionScheme, class_counts, partition


@dataclass
class DemoSummary:
    out: Path
    scheme: str
    counts: np.ndarray  # (sites, classes)

    def table(self) -> str:
        head = f"{'hospital':<13}" + "".join(f"{c[:6]:>8}" for c in BLOODMNIST_CLASSES)
        rows = [head + f"{'total':>8}"]
        for i, row in enumerate(self.counts):
            rows.append(f"{site_name(i):<13}" + "".join(f"{v:>8}" for v in row) + f"{row.sum():>8}")
        rows.append(f"{'all':<13}" + "".join(f"{v:>8}" for v in self.counts.sum(0))
                    + f"{self.counts.sum():>8}")
        return f"Wrote {len(self.counts)} hospital folders to {self.out} ({self.scheme})\n" + "\n".join(rows)


def site_name(i: int) -> str:
    return f"hospital_{i + 1:02d}"


def write_demo_sites(
    out: str | Path,
    n_sites: int = 10,
    scheme: str = "dirichlet:0.5",
    seed: int = 0,
    fmt: str = "png",
    data: str | Path | None = None,
) -> DemoSummary:
    """Split BloodMNIST's train split across `n_sites` and write one class-folder tree each."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    parsed = PartitionScheme.parse(scheme)
    train = load_splits(locate(data))["train"]
    parts = partition(train.labels, n_sites, parsed, seed=seed)
    for site, idx in enumerate(parts):
        site_dir = out / site_name(site)
        for name in BLOODMNIST_CLASSES:
            (site_dir / name).mkdir(parents=True, exist_ok=True)
        for i in idx:
            label = BLOODMNIST_CLASSES[train.labels[i]]
            Image.fromarray(train.images[i]).save(site_dir / label / f"img_{i:05d}.{fmt}")
    counts = class_counts(train.labels, parts, len(BLOODMNIST_CLASSES))
    (out / "partition.json").write_text(json.dumps({
        "scheme": str(parsed), "seed": seed, "classes": list(BLOODMNIST_CLASSES),
        "sites": {site_name(i): row.tolist() for i, row in enumerate(counts)},
    }, indent=2))
    return DemoSummary(out, str(parsed), counts)
