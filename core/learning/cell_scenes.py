"""Procedural scenes shaped like a blood smear's field of view, for pre-training the encoder (issue 16, lever 1:
"other generators").

The first encoder learned from dead leaves: ellipses of every size with smooth gratings. A blood-cell image is
one large cell in the middle (cytoplasm, a nucleus of one to four lobes, granules of one size and density), pale
discs around it (red cells, with a paler centre), and the classes differ in the nucleus's shape and the granules
(docs/accuracy-levers.md, nineteenth pass: the fine texture is what the 64-px maps are there for). `cell_scenes`
draws such scenes with random colours, sizes and counts. No real image goes into them: the features learned from
them cost no privacy.

The shipped `procedural_features.CELLS_ENCODER_ASSET` is the looks encoder pre-trained 2,000 steps more on batches
of half such scenes, half dead leaves, every view in a random microscope look (20.4 min on this project's 2 cores;
docs/accuracy-levers.md, twenty-third pass):

    python -m hemafed.core.learning.cell_scenes --steps 2000 --start assets/procedural_encoder_28_looks.npz \
        --out assets/procedural_encoder_28_cells.npz
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from . import procedural_features as pf


def cell_scenes(n: int, gen: torch.Generator, size: int = pf.SIZE) -> torch.Tensor:
    """(n, 3, size, size) images in [0, 1]: pale discs with paler centres around one large cell near the middle,
    whose cytoplasm carries granules of one size and density and whose nucleus is one to four overlapping ellipses.
    Sizes are given at 28 px and scale with size/28."""
    s = size / pf.SIZE
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")

    def u(*shape: int) -> torch.Tensor:
        return torch.rand(n, *shape, generator=gen)

    img = (0.6 + 0.4 * u(3, 1, 1)).expand(n, 3, size, size).clone()
    disc = (u(3, 1, 1) * 0.8).clamp(0, 1)
    for _ in range(14):  # red cells: about a cell's width apart, some cut by the edge, some under the centre cell
        cy, cx = u(1, 1) * (size + 6 * s) - 3 * s, u(1, 1) * (size + 6 * s) - 3 * s
        r, ratio, theta = (2.5 + 2.0 * u(1, 1)) * s, 0.75 + 0.25 * u(1, 1), u(1, 1) * math.pi
        rim = pf.ellipse_mask(ys, xs, cy, cx, r, ratio, theta) & (u(1, 1, 1) < 0.85)
        pale = pf.ellipse_mask(ys, xs, cy, cx, 0.5 * r, ratio, theta)
        colour = (disc + 0.1 * (u(3, 1, 1) - 0.5)).clamp(0, 1)
        img = torch.where(rim, torch.where(pale, 0.5 * (colour + img), colour), img)
    # the centre cell
    cy, cx = size / 2 + (u(1, 1) - 0.5) * 6 * s, size / 2 + (u(1, 1) - 0.5) * 6 * s
    r = (4.0 + 5.0 * u(1, 1)) * s
    cell = pf.ellipse_mask(ys, xs, cy, cx, r, 0.8 + 0.2 * u(1, 1), u(1, 1) * math.pi)
    img = torch.where(cell, u(3, 1, 1), img)
    grain_r, density = (0.35 + 0.8 * u(1, 1)) * s, u(1, 1, 1)
    grain_colour = u(3, 1, 1)
    for _ in range(40):  # granules: one size and colour per cell, as many as its density lets through
        gy = cy + (u(1, 1) * 2 - 1) * r
        gx = cx + (u(1, 1) * 2 - 1) * r
        g = pf.ellipse_mask(ys, xs, gy, gx, grain_r, torch.ones(n, 1, 1), torch.zeros(n, 1, 1)) & cell
        img = torch.where(g & (u(1, 1, 1) < density), grain_colour, img)
    lobes = 1 + (u(1, 1, 1) * 4).floor()  # 1–4
    nucleus = torch.zeros(n, 1, size, size, dtype=torch.bool)
    spread = u(1, 1) * 0.6 * r
    for k in range(4):
        angle = u(1, 1) * 2 * math.pi
        ly, lx = cy + spread * torch.sin(angle), cx + spread * torch.cos(angle)
        lr = (0.3 + 0.35 * u(1, 1)) * r
        lobe = pf.ellipse_mask(ys, xs, ly, lx, lr, 0.5 + 0.5 * u(1, 1), u(1, 1) * math.pi) & cell
        nucleus = nucleus | (lobe & (k < lobes))
    chromatin = 0.15 * torch.randn(n, 1, size, size, generator=gen)  # a nucleus's mottled texture
    nuc = (u(3, 1, 1) * 0.6 + chromatin).clamp(0, 1)
    return torch.where(nucleus, nuc, img)


def mixed(share: float):
    """A generator for `pf.pretrain`: each batch `share` cell scenes, the rest dead leaves."""
    def scenes(n: int, gen: torch.Generator, size: int = pf.SIZE) -> torch.Tensor:
        k = round(share * n)
        return torch.cat([cell_scenes(k, gen, size), pf.dead_leaves(n - k, gen, size=size)])
    return scenes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--start", type=Path, default=None)
    ap.add_argument("--share", type=float, default=0.5, help="of each batch in cell scenes (the rest dead leaves)")
    ap.add_argument("--size", type=int, default=pf.SIZE)
    ap.add_argument("--seed", type=int, default=0, help="of the scenes, views and initial projection head")
    ap.add_argument("--no-looks", action="store_true", help="views without the random microscope looks")
    ap.add_argument("--sample", type=Path, default=None, help="only write a PNG of 16 scenes here")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.sample:
        from PIL import Image

        x = cell_scenes(16, torch.Generator().manual_seed(0), args.size)
        grid = x.reshape(4, 4, 3, args.size, args.size).permute(0, 3, 1, 4, 2).reshape(4 * args.size, 4 * args.size, 3)
        Image.fromarray((grid * 255).round().byte().numpy()).resize((512, 512), Image.NEAREST).save(args.sample)
        return
    steps = pf.pretrain(args.steps, args.out, size=args.size, start=args.start, looks=not args.no_looks,
                        scenes=mixed(args.share), seed=args.seed)
    print(f"{steps} steps; encoder saved to {args.out}")


if __name__ == "__main__":
    main()
