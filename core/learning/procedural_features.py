"""Image features learned from procedurally generated images only (no hospital data, no download).

After Baradad et al. 2021 ("Learning to See by Looking at Noise") and Tang et al. 2023 (DP-RandP):
a small GroupNorm CNN is trained with SimCLR's contrastive loss on "dead leaves" images (ellipses of
random colour, size and texture painted over each other), then frozen. No real image is ever seen,
so using these features costs no privacy; every site computes the same features from the weights
shipped in `hemafed.assets` (`ENCODER_ASSET`), which this module's `pretrain` made:

    python -m hemafed.core.learning.procedural_features --steps 3777 --out assets/procedural_encoder_28.npz

(3,777 steps of 256 images, 35 min on 2 CPU cores; docs/accuracy-levers.md has the screen.) `--size 64` pre-trains
on 64-px scenes (4.2 s per step here), `--start` begins from given weights and `--checkpoint-every N` lets a long run
stop (`--minutes`) and resume; a 200-step 64-px fine-tune of the shipped weights screened no better (eighth pass).

`LOOKS_ENCODER_ASSET` is those weights pre-trained 2,000 steps more with every view also in a random microscope look
(`microscope_look`: the simulation's range of stain, lamp and focus), 10 min here:

    python -m hemafed.core.learning.procedural_features --steps 2000 --start assets/procedural_encoder_28.npz \
        --looks --out assets/procedural_encoder_28_looks.npz

`CELLS_ENCODER_ASSET` is the looks encoder pre-trained 2,000 steps more on scenes half of which are shaped like a
blood-cell image (`cell_scenes`, which has its command), still under random looks.
"""

from __future__ import annotations

import argparse
import math
import threading
import time
from collections.abc import Callable
from functools import cache
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..npz_lock import open_npz
from .features import dihedral

SIZE = 28
ENCODER_ASSET = "procedural_encoder_28.npz"
# The same encoder pre-trained further with every view in a random microscope look (`--looks`), so that its features
# change less between hospitals' stains, lamps and focus (docs/appearance-remedies.md, third pass).
LOOKS_ENCODER_ASSET = "procedural_encoder_28_looks.npz"
# The looks encoder pre-trained further on procedural scenes shaped like a blood-cell image (one large cell with a
# lobed, mottled nucleus and granules among pale discs): +0.7 / +0.2 / +0.3 points on validation through the product
# at ε = 8 / 3 / 1, +0.4 / +0.3 / +0.6 on the test split (docs/accuracy-levers.md, twenty-third pass).
CELLS_ENCODER_ASSET = "procedural_encoder_28_cells.npz"
SHIPPED_ENCODERS = (ENCODER_ASSET, LOOKS_ENCODER_ASSET, CELLS_ENCODER_ASSET)
CHANNELS = 128  # of the encoder's last maps (7×7 at 28 px)
GROUPS = 16  # GroupNorm groups of the pooled features (8 channels each)


def ellipse_mask(ys: torch.Tensor, xs: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor, r: torch.Tensor,
                 ratio: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """(n, 1, H, W): which pixels of the grid `ys`, `xs` lie inside each image's ellipse (centre, semi-axes r and
    r·ratio, turned by theta; each (n, 1, 1))."""
    dy, dx = ys - cy, xs - cx
    a = dx * torch.cos(theta) + dy * torch.sin(theta)
    b = -dx * torch.sin(theta) + dy * torch.cos(theta)
    return ((a / r) ** 2 + (b / (r * ratio)) ** 2 <= 1.0).unsqueeze(1)


def dead_leaves(n: int, gen: torch.Generator, shapes: int = 48, size: int = SIZE) -> torch.Tensor:
    """(n, 3, size, size) images in [0, 1]: ellipses painted back to front, radii from a power law. At another
    `size` the same kind of scene at that resolution: radii, margins and grating periods scale with size/SIZE."""
    s = size / SIZE
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    img = torch.rand(n, 3, 1, 1, generator=gen).expand(n, 3, size, size).clone()

    def u(*shape: int) -> torch.Tensor:
        return torch.rand(n, *shape, generator=gen)

    for _ in range(shapes):
        # p(r) ∝ r^-3 on [1.5, 14] px at 28 px: few large shapes, many small ones (as in natural images)
        lo, hi = (1.5 * s) ** -2, (14.0 * s) ** -2
        r = (lo + (hi - lo) * u(1, 1)) ** -0.5
        cy, cx = u(1, 1) * (size + 8 * s) - 4 * s, u(1, 1) * (size + 8 * s) - 4 * s
        theta, ratio = u(1, 1) * math.pi, 0.4 + 0.6 * u(1, 1)
        inside = ellipse_mask(ys, xs, cy, cx, r, ratio, theta)
        colour = u(3, 1, 1)
        freq, phase, ang = (0.2 + 1.3 * u(1, 1)) / s, u(1, 1) * 2 * math.pi, u(1, 1) * math.pi
        grating = torch.sin(freq * (xs * torch.cos(ang) + ys * torch.sin(ang)) + phase).unsqueeze(1)
        fill = (colour + 0.25 * u(1, 1, 1) * grating * (u(1, 1, 1) < 0.5)).clamp(0, 1)
        img = torch.where(inside, fill, img)
    return img


def microscope_look(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(n, 3, H, W) in [0, 1], each image as another microscope might show it, over the simulation's
    `core.data.appearance.LOOK_RANGE`: stain strengths and tint in HED optical density, a lamp level clipped at full
    scale (a brighter lamp saturates), and a Gaussian focus blur of its own σ."""
    from ..data.appearance import LOOK_RANGE, RGB_FROM_HED, low_pass, stain_densities

    n = len(x)

    def u(key: str, *shape: int) -> torch.Tensor:
        lo, hi = LOOK_RANGE[key]
        return lo + (hi - lo) * torch.rand(n, *shape, generator=gen)

    hed = stain_densities(x).permute(0, 2, 3, 1)
    factor = torch.cat([u("haematoxylin", 1), u("eosin", 1), torch.ones(n, 1)], 1)
    tint = torch.cat([u("tint", 2), torch.zeros(n, 1)], 1)
    hed = hed * factor[:, None, None] + tint[:, None, None]
    x = torch.exp(-(hed @ torch.as_tensor(RGB_FROM_HED, dtype=x.dtype))).permute(0, 3, 1, 2)
    x = (x * u("brightness", 1, 1, 1)).clamp(0, 1)
    return low_pass(x, u("blur").clamp_min(1e-3) * x.shape[-1] / SIZE)


def augment(x: torch.Tensor, gen: torch.Generator, looks: bool = False) -> torch.Tensor:
    """A SimCLR view: random resized crop, a symmetry of the square, colour jitter, blur, pixel noise; with `looks`,
    each image first in a random microscope look (`microscope_look`), so that the features learn to ignore it."""
    if looks:
        x = microscope_look(x, gen)

    n = len(x)
    scale = (0.35 + 0.65 * torch.rand(n, generator=gen)).sqrt()
    shift = (1 - scale).unsqueeze(1) * (2 * torch.rand(n, 2, generator=gen) - 1)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    x = dihedral(x, int(torch.randint(8, (1,), generator=gen)))
    gain = 0.6 + 0.8 * torch.rand(n, 3, 1, 1, generator=gen)
    bias = 0.2 * (torch.rand(n, 3, 1, 1, generator=gen) - 0.5)
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * gain + mean + bias
    grey = torch.rand(n, 1, 1, 1, generator=gen) < 0.2
    x = torch.where(grey, x.mean(1, keepdim=True).expand_as(x), x)
    blur = torch.rand(n, 1, 1, 1, generator=gen) < 0.4
    x = torch.where(blur, F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1), x)
    return x + 0.03 * torch.randn(x.shape, generator=gen)


def standardise(x: torch.Tensor) -> torch.Tensor:
    """Per image and channel. Removes the colour statistics that synthetic and stained images do not
    share, and makes the features independent of the input's per-channel normalisation."""
    return (x - x.mean((2, 3), keepdim=True)) / (x.std((2, 3), keepdim=True) + 1e-3)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(8, cout), nn.ReLU())


def encoder_body(width: int = 32) -> nn.Sequential:
    """28 px → (4·width)×7×7 maps; 277 k parameters at width 32."""
    w = width
    return nn.Sequential(_block(3, w), _block(w, 2 * w, 2), _block(2 * w, 2 * w), _block(2 * w, 4 * w, 2),
                         _block(4 * w, 4 * w))


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float = 0.2) -> torch.Tensor:
    """SimCLR's loss: each view must pick its partner among the 2n − 1 others."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / tau
    sim.fill_diagonal_(-1e9)
    n = len(z1)
    return F.cross_entropy(sim, torch.cat([torch.arange(n, 2 * n), torch.arange(n)]))


def pretrain(steps: int, out: Path, batch: int = 256, lr: float = 1e-3, seed: int = 0,
             minutes: float | None = None, log_every: int = 100, size: int = SIZE, start: Path | None = None,
             checkpoint_every: int = 0, looks: bool = False, scenes: Callable[..., torch.Tensor] | None = None) -> int:
    """SimCLR on dead-leaves images of `size` pixels (with `looks`, each view also in a random microscope look);
    saves the encoder body's weights to `out` (.npz) once `steps` steps are done. `start`: encoder weights (.npz) to
    begin from instead of a random initialisation.
    With `checkpoint_every`, the whole state (weights, optimiser, generators, step) goes to `checkpoint_path(out)`
    every that many steps, and a later call with the same `out` resumes from it, so a long pre-training can run in
    parts. Stops after `steps` steps in all or `minutes` in this part, whichever comes first; returns the steps
    taken in all. With `checkpoint_every` the weights are written only once they reach `steps`; without, whenever
    it stops. `scenes(n, gen, size=)`: another generator of the images in place of `dead_leaves` (research screens)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    body = encoder_body().to(memory_format=torch.channels_last)
    if start is not None:
        with start.open("rb") as fh:
            body.load_state_dict(_npz_state(fh))
    proj = nn.Sequential(nn.Linear(CHANNELS, 256), nn.ReLU(), nn.Linear(256, 128))
    opt = torch.optim.Adam([*body.parameters(), *proj.parameters()], lr)
    ckpt = checkpoint_path(out)
    step = 0
    if checkpoint_every and ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        body.load_state_dict(state["body"])
        proj.load_state_dict(state["proj"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        torch.set_rng_state(state["torch"])
        step = int(state["step"])
        print(f"resumed at step {step} from {ckpt}", flush=True)

    def embed(x: torch.Tensor) -> torch.Tensor:
        return proj(body(_channels_last(standardise(x))).mean((2, 3)))

    def save_checkpoint() -> None:
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"body": body.state_dict(), "proj": proj.state_dict(), "opt": opt.state_dict(),
                    "gen": gen.get_state(), "torch": torch.get_rng_state(), "step": step}, tmp)
        tmp.replace(ckpt)  # a part killed while saving leaves the previous checkpoint whole

    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    while step < steps and (minutes is None or time.monotonic() - started < 60 * minutes):
        x = (scenes or dead_leaves)(batch, gen, size=size)
        loss = nt_xent(embed(augment(x, gen, looks)), embed(augment(x, gen, looks)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if log_every and step % log_every == 0:
            print(f"step {step}: loss {loss.item():.3f} ({(time.monotonic() - started) / 60:.1f} min)", flush=True)
        if checkpoint_every and step % checkpoint_every == 0:
            save_checkpoint()
    if checkpoint_every and step < steps:
        save_checkpoint()
        return step
    np.savez(out, **{k: v.detach().numpy() for k, v in body.state_dict().items()})
    return step


def checkpoint_path(out: Path) -> Path:
    """Where `pretrain` keeps the state of an unfinished pre-training for `out`."""
    return out.with_name(out.stem + ".checkpoint.pt")


def _npz_state(fh: BinaryIO) -> dict[str, torch.Tensor]:
    """An encoder's weights from the .npz that `pretrain` writes."""
    with open_npz(fh) as arrays:
        return {k: torch.from_numpy(arrays[k].copy()) for k in arrays.files}


_LOAD_LOCK = threading.Lock()


def encoder_source(name: str | None = None) -> Traversable | Path:
    """The weights file `name`: a file shipped in `hemafed.assets` (by its name; None: `ENCODER_ASSET`) or a path."""
    from importlib.resources import files

    if name is None or name in SHIPPED_ENCODERS:
        return files("hemafed.assets") / (name or ENCODER_ASSET)
    return Path(name)


def load_encoder(path: str | None = None) -> nn.Sequential:
    """The frozen encoder (the shipped `ENCODER_ASSET` unless `path`: another shipped asset's name or a file), in eval
    mode, without gradients; loaded once per process.
    Sites running as threads of one process (tests, the app) ask for it at the same moment: the lock makes them
    share one load instead of each reading the file, and keeps numpy's header parsing (`ast.literal_eval`) out of
    parallel threads, where CPython 3.11 can fail with "AST constructor recursion depth mismatch"."""
    with _LOAD_LOCK:
        return _load_encoder(path)


@cache
def _load_encoder(path: str | None) -> nn.Sequential:
    body = encoder_body()
    with encoder_source(path).open("rb") as fh:
        body.load_state_dict(_npz_state(fh))
    body.requires_grad_(False)
    # channels-last: at 64 px the encoder runs about 25 % faster on this CPU; at 28 px it is a wash on one thread
    # (docs/accuracy-levers.md, eighth pass)
    return body.to(memory_format=torch.channels_last).eval()


@torch.no_grad()
def procedural_features(x: torch.Tensor, batch_size: int = 256, pool: int = 3,
                        body: nn.Module | None = None, depth: int | None = None) -> torch.Tensor:
    """(N, 3, 28, 28) images in [0, 1] → (N, 128, pool, pool): the encoder's maps, average-pooled,
    GroupNorm per image. `body`: another encoder than the shipped one (research screens). `depth`: the maps after
    the encoder's first `depth` blocks instead of all 5 (4 and 5 give 128 channels)."""
    body = body if body is not None else load_encoder()
    if depth is not None:
        body = body[:depth]
    parts = [F.adaptive_avg_pool2d(body(_channels_last(standardise(x[i:i + batch_size]))), pool)
             for i in range(0, len(x), batch_size)]
    feats = torch.cat(parts) if parts else x.new_zeros((0, CHANNELS, pool, pool))
    return F.group_norm(feats, GROUPS)


def main() -> None:
    ap = argparse.ArgumentParser(description="pre-train the procedural-image encoder (see module docstring)")
    ap.add_argument("--steps", type=int, default=3777)
    ap.add_argument("--minutes", type=float, default=None, help="stop earlier after this long")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=SIZE, help="side of the dead-leaves images in pixels")
    ap.add_argument("--start", type=Path, default=None, help="encoder weights (.npz) to start from")
    ap.add_argument("--checkpoint-every", type=int, default=0,
                    help="save the whole state every N steps and resume from it when run again with the same --out")
    ap.add_argument("--looks", action="store_true",
                    help="each view also in a random microscope look (stain, lamp, focus; core.data.appearance)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    steps = pretrain(args.steps, args.out, minutes=args.minutes, size=args.size, start=args.start,
                     checkpoint_every=args.checkpoint_every, looks=args.looks)
    if steps < args.steps:
        print(f"{steps} of {args.steps} steps; run the same command again to resume from {checkpoint_path(args.out)}")
    else:
        print(f"{steps} steps; encoder saved to {args.out}")


if __name__ == "__main__":
    main()
