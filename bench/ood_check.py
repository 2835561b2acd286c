"""How well the shipped cell check ("not an image of a single blood cell", core/learning/cell_check.py) works.

Reads each hospital's own final model file from a `hemafed simulate` run (the federation's DP moments, the
hospital's threshold fitted on its own validation images) and reports, per hospital, the share of each set its
model file flags as "not recognised"; the table gives the mean ± std over the hospitals and the smallest.

In-distribution: BloodMNIST's test split (no hospital holds it) and the 200 PBC sample cells at BloodMNIST's crop.
Out-of-distribution, made from the PBC sample JPEGs:

- *screening sets* (`bench.ood_screen.ood_sets`; the cell check's candidate measurements, constants and the 12 of
  them it uses (`bench.cell_check_screen`) were chosen while looking at them, so they are not an unbiased test):
  3×3 whole fields, 110-px corner crops (red cells, magnified), uniform noise;
- *held-out sets*, built after the design was fixed and never used to choose anything: 2×2 and 4×4 whole fields;
  red cells at BloodMNIST's native scale (a 200-px window at the corner where four images meet, so any white cell
  is cut at the window's edge); computer-generated dead-leaves shapes; an empty slide (the background colour with
  sensor noise).

    python -m bench.ood_check --run RUN [RUN ...] [--doc NAME]  # one `hemafed simulate` folder per seed; writes
                                                                # docs/ood-check.md (or docs/NAME.md)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench._runs import run_command
from hemafed.core.data.bloodmnist import load_splits, locate
from hemafed.core.data.imaging import centre_crop_resize
from hemafed.core.learning.cell_check import FALSE_ALARMS
from hemafed.core.learning.classify import load_model_file
from hemafed.network.sim.experiment import OOD_DOC

DOCS = Path(__file__).resolve().parent.parent / "docs"


def held_out_sets(pbc_dir: Path, rng: np.random.Generator, size: int = 28) -> dict[str, np.ndarray]:
    from hemafed.core.learning.procedural_features import dead_leaves

    images = [Image.open(p).convert("RGB") for p in sorted(pbc_dir.glob("*/*.jpg"))]
    w, h = images[0].size

    def mosaic(k: int) -> Image.Image:
        canvas = Image.new("RGB", (k * w, k * h))
        for j, i in enumerate(rng.choice(len(images), k * k, replace=False)):
            canvas.paste(images[i].resize((w, h)), ((j % k) * w, (j // k) * h))
        return canvas

    def native_reds() -> np.ndarray:
        canvas = mosaic(2)
        return centre_crop_resize(canvas.crop((w - 100, h - 100, w + 100, h + 100)), size)

    background = np.median(np.stack([np.asarray(im.resize((28, 28))) for im in images]).reshape(-1, 3), 0)
    leaves = dead_leaves(100, torch.Generator().manual_seed(int(rng.integers(1 << 31))), size=size)
    return {
        "whole fields 2×2": np.stack([centre_crop_resize(mosaic(2), size) for _ in range(100)]),
        "whole fields 4×4": np.stack([centre_crop_resize(mosaic(4), size) for _ in range(100)]),
        "red cells, native scale": np.stack([native_reds() for _ in range(100)]),
        "dead-leaves shapes": (leaves.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8),
        "empty slide": np.clip(background + rng.normal(0, 4, (100, size, size, 3)), 0, 255).astype(np.uint8),
    }


def _commands(runs: list[Path]) -> str:
    commands = {run_command(run) for run in runs}
    return " / ".join(f"`{c}`" if c != "hemafed simulate" else "defaults" for c in sorted(commands))


def main(argv: list[str] | None = None) -> int:
    from bench.ood_screen import ood_sets

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, nargs="+", required=True,
                   help="`hemafed simulate` results folders (one per seed: every hospital of each counts)")
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--doc", default=OOD_DOC,
                   help=f"the doc's name in docs/, without .md (default: the main job's model's, {OOD_DOC})")
    args = p.parse_args(argv)
    started = time.perf_counter()
    files = [f for run in args.run for f in sorted(run.glob("sites/*/state/models/*/final.npz"))]
    if not files:
        raise SystemExit("no hospital model files under sites/*/state/models/ of " + ", ".join(map(str, args.run)))
    # every set at the model's input size, as its sites and the app give it images
    first = load_model_file(files[0])
    size = first.input_size
    data = locate(args.data, size=size)
    pbc_dir = data.parent.parent / "pbc_sample"
    screening = {f"{k} (screening)": np.asarray(v)
                 for k, v in ood_sets(pbc_dir, np.random.default_rng(0), size).items()}
    pbc = screening.pop("PBC cells (in-distribution) (screening)")
    sets = {"test split (in-distribution)": load_splits(data)["test"].images, "PBC sample cells (in-distribution)": pbc,
            **screening, **held_out_sets(pbc_dir, np.random.default_rng(1), size)}
    flagged: dict[str, list[float]] = {name: [] for name in sets}
    thresholds, sources = [], set()
    for path in files:
        model = load_model_file(path)
        stats, cal = model.cell_stats(), model.calibration
        if stats is None or cal is None or cal.not_a_cell_threshold is None:
            raise SystemExit(f"{path}: no cell check in this model file")
        thresholds.append(cal.not_a_cell_threshold)
        sources.add(cal.not_a_cell_from or "validation images")
        for name, images in sets.items():
            flagged[name].append(float(np.mean(stats.scores(images) > cal.not_a_cell_threshold)))
    rows = [f"| {name} | {len(sets[name])} | {np.mean(v):.1%} ± {np.std(v):.1%} | {min(v):.1%} | {max(v):.1%} |"
            for name, v in flagged.items()]
    doc = [
        "# The cell check: \"not an image of a single blood cell\"",
        "",
        f"Generated by `python -m bench.ood_check --run {' '.join(map(str, args.run))}"
        + (f" --doc {args.doc}" if args.doc != "ood-check" else "") + "` "
        f"({time.perf_counter() - started:.0f} s), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: the "
        f"{len(files)} hospitals' own final model files of {len(args.run)} `hemafed simulate` run(s) "
        f"({_commands(args.run)}, one per seed; model `{first.name}`, {size}-px images; the "
        "federation's DP moments; the threshold in the files, set to flag "
        f"{FALSE_ALARMS:.1%} of {' / '.join(sorted(sources))}: {min(thresholds):.0f} … {max(thresholds):.0f}). "
        "How the sets are made and which were used to choose the design: the script's docstring. Share flagged as "
        "\"not recognised\", mean ± std over every hospital of every run, smallest and largest:",
        "",
        "| set | images | flagged | smallest | largest |",
        "|---|---:|---:|---:|---:|",
        *rows,
        "",
    ]
    (DOCS / f"{args.doc}.md").write_text("\n".join(doc))
    print("\n".join(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
