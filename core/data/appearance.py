"""Hospitals whose images look different, and a per-image remedy that needs no hospital's data.

Simulation (`HospitalLook`, `apply_look`): in a real federation each hospital's stain batch, lamp, focus and
camera differ. A look is drawn per hospital from a documented range (`LOOK_RANGE`), in the terms a pathology lab
would use: haematoxylin and eosin stain strength (scaled optical density in the Ruifrok–Johnston HED space, as
Tellez et al. 2018 augment H&E), a stain tint (an optical-density offset), brightness (a multiplicative lamp
level), blur (focus; Gaussian σ in pixels at 28 px) and magnification (a zoom about the centre).

Remedy (`normalise_stain`): every image — at training, evaluation and classification alike — is mapped to a fixed
public reference before its features are computed: its background (the brightest pixels) is set to the
reference background, and its haematoxylin and eosin densities are rescaled so that their 99th percentiles match
the reference. The reference comes from the 200 public PBC sample images (`python -m
hemafed.core.data.appearance --reference PBC_DIR`), so it reads no hospital's records and costs no privacy.
Blur and magnification it does not undo.

A second remedy (`canonical_look(x, "lamp-focus")`) maps only the background, which undoes a lamp level and a tint of
the light but keeps the stain densities (which carry class information), and then blurs every image a little, so that
two focus settings differ less after it than before. Both are fixed functions of one image.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

# Ruifrok & Johnston's stain vectors (haematoxylin, eosin, DAB) as rows of RGB optical density.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)

# The simulation's range, each drawn uniformly per hospital.
LOOK_RANGE = {
    "haematoxylin": (0.7, 1.3),  # factor on the H optical density (stain strength, staining time)
    "eosin": (0.7, 1.3),  # factor on the E optical density
    "tint": (-0.05, 0.05),  # offset added to the H and E optical densities (stain batch)
    "brightness": (0.85, 1.15),  # lamp level (factor on transmitted light)
    "blur": (0.0, 0.8),  # Gaussian σ in pixels at 28 px (focus)
    "zoom": (0.9, 1.1),  # magnification relative to the reference microscope
}


@dataclass(frozen=True)
class HospitalLook:
    haematoxylin: float = 1.0
    eosin: float = 1.0
    tint_h: float = 0.0
    tint_e: float = 0.0
    brightness: float = 1.0
    blur: float = 0.0
    zoom: float = 1.0

    @classmethod
    def draw(cls, rng: np.random.Generator) -> HospitalLook:
        u = {k: float(rng.uniform(*v)) for k, v in LOOK_RANGE.items()}
        return cls(u["haematoxylin"], u["eosin"], u["tint"], float(rng.uniform(*LOOK_RANGE["tint"])),
                   u["brightness"], u["blur"], u["zoom"])

    def to_dict(self) -> dict:
        return asdict(self)


def hospital_looks(n: int, seed: int) -> list[HospitalLook]:
    """One look per hospital, reproducible from the simulation's seed."""
    rng = np.random.default_rng([seed, 0xA11])
    return [HospitalLook.draw(rng) for _ in range(n)]


def apply_look(images: np.ndarray, look: HospitalLook) -> np.ndarray:
    """(N, H, W, 3) uint8 images as a hospital with `look` would have photographed them."""
    images = np.asarray(images)
    n, h, w, _ = images.shape
    od = -np.log(np.maximum(images.astype(np.float64), 1.0) / 255.0)
    hed = od @ HED_FROM_RGB
    hed[..., 0] = hed[..., 0] * look.haematoxylin + look.tint_h
    hed[..., 1] = hed[..., 1] * look.eosin + look.tint_e
    rgb = np.exp(-(hed @ RGB_FROM_HED)) * 255.0 * look.brightness
    out = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    if look.zoom == 1.0 and look.blur == 0.0:
        return out
    result = np.empty_like(out)
    side = max(2, round(h * look.zoom))
    for i in range(n):
        img = Image.fromarray(out[i]).resize((side, side), Image.Resampling.BILINEAR)
        if side >= h:  # zoom in: keep the middle
            off = (side - h) // 2
            img = img.crop((off, off, off + w, off + h))
        else:  # zoom out: the edge pixels continue outwards (a wider view of the same slide)
            pad = np.pad(np.asarray(img), (((h - side) // 2, h - side - (h - side) // 2),
                                           ((w - side) // 2, w - side - (w - side) // 2), (0, 0)), mode="edge")
            img = Image.fromarray(pad)
        if look.blur > 0:  # σ is given at 28 px: the same focus blurs a 64-px image over more pixels
            img = img.filter(ImageFilter.GaussianBlur(look.blur * h / 28))
        result[i] = np.asarray(img)
    return result


# The reference (public: the PBC sample at 28 px; see the module docstring): the background's optical density per
# RGB channel, and the 99th percentiles of the haematoxylin and eosin densities above it.
REFERENCE_BACKGROUND = (0.0, 0.1119, 0.2281)
REFERENCE_H99, REFERENCE_E99 = 1.8972, 0.7186
_BACKGROUND_QUANTILE = 0.05  # of the optical density: the brightest 5 % of pixels are the background
_SCALE_LIMITS = (0.5, 2.0)  # a rescaling beyond these is more likely an odd image than a stain difference


def normalise_stain(x: torch.Tensor, stains: bool = True) -> torch.Tensor:
    """(B, 3, H, W) images in [0, 1], mapped to the reference background and (with `stains`) stain densities, per
    image. Without `stains` only the background is mapped: the lamp level and a tint of the light."""
    flat = x.clamp(1.0 / 255.0, 1.0).flatten(2)  # (B, 3, P)
    od = -torch.log(flat)
    background = torch.quantile(od, _BACKGROUND_QUANTILE, dim=2, keepdim=True)
    od = (od - background).clamp_min(0.0)
    if stains:
        hed = torch.einsum("bcp,cs->bsp", od, torch.as_tensor(HED_FROM_RGB, dtype=od.dtype))
        for channel, reference in ((0, REFERENCE_H99), (1, REFERENCE_E99)):
            level = torch.quantile(hed[:, channel], 0.99, dim=1, keepdim=True).clamp_min(1e-3)
            hed[:, channel] = hed[:, channel] * (reference / level).clamp(*_SCALE_LIMITS)
        od = torch.einsum("bsp,sc->bcp", hed, torch.as_tensor(RGB_FROM_HED, dtype=od.dtype))
    od = od + torch.as_tensor(REFERENCE_BACKGROUND, dtype=od.dtype)[None, :, None]
    return torch.exp(-od).clamp(0.0, 1.0).reshape(x.shape)


def stain_densities(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) images in [0, 1] as optical densities unmixed into haematoxylin, eosin and a residual (Ruifrok–
    Johnston): a stain's strength is then a scale of one channel, and a lamp level or a tint an offset."""
    od = -torch.log(x.clamp(1.0 / 255.0, 1.0))
    return torch.einsum("bchw,cs->bshw", od, torch.as_tensor(HED_FROM_RGB, dtype=od.dtype))


# The canonical focus: every image is low-passed this much (Gaussian σ in pixels at 28 px) before its features, so
# that focus differences within LOOK_RANGE's blur change it less (docs/appearance-remedies.md).
CANONICAL_FOCUS = 0.5


def low_pass(x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) blurred by a Gaussian of `sigma` pixels (separable, edges replicated); `sigma` may also be a (B,)
    tensor of positive values, one per image."""
    if isinstance(sigma, torch.Tensor):
        r = int(np.ceil(3 * float(sigma.max())))
        b, c, h, w = x.shape
        k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype)[None] / sigma[:, None]) ** 2)
        k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B·C, 2r + 1): one kernel per image and channel
        y = torch.nn.functional.pad(x.reshape(1, b * c, h, w), (r, r, r, r), mode="replicate")
        y = torch.nn.functional.conv2d(y, k.view(b * c, 1, 1, -1), groups=b * c)
        return torch.nn.functional.conv2d(y, k.view(b * c, 1, -1, 1), groups=b * c).reshape(x.shape)
    if sigma <= 0:
        return x
    r = int(np.ceil(3 * sigma))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype) / sigma) ** 2)
    k = (k / k.sum()).repeat(x.shape[1], 1, 1, 1)
    x = torch.nn.functional.pad(x, (r, r, r, r), mode="replicate")
    x = torch.nn.functional.conv2d(x, k.view(-1, 1, 1, 2 * r + 1), groups=x.shape[1])
    return torch.nn.functional.conv2d(x, k.view(-1, 1, 2 * r + 1, 1), groups=x.shape[1])


def canonical_look(x: torch.Tensor, how: str) -> torch.Tensor:
    """(B, 3, H, W) images in [0, 1] in the canonical look `how`: "stain" (`normalise_stain`), or "lamp-focus" (the
    background mapped to the reference, which undoes a lamp level and a tint of the light, then the canonical focus,
    σ scaled to the image's size)."""
    if how == "stain":
        return normalise_stain(x)
    if how == "lamp-focus":
        return low_pass(normalise_stain(x, stains=False), CANONICAL_FOCUS * x.shape[-1] / 28)
    raise ValueError(f"unknown canonical look {how!r}")


def public_sample(pbc_dir: Path, size: int = 28) -> np.ndarray:
    """The public PBC sample's JPEGs as the model sees them: the references here and in core.learning.cell_check."""
    from .imaging import centre_crop_resize

    return np.stack([centre_crop_resize(Image.open(p).convert("RGB"), size) for p in sorted(pbc_dir.glob("*/*.jpg"))])


def _reference(pbc_dir: Path) -> None:
    images = public_sample(pbc_dir)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255.0
    od = -torch.log(x.clamp(1 / 255, 1).flatten(2))
    background = torch.quantile(od, _BACKGROUND_QUANTILE, dim=2, keepdim=True)
    hed = torch.einsum("bcp,cs->bsp", (od - background).clamp_min(0), torch.as_tensor(HED_FROM_RGB))
    print("REFERENCE_BACKGROUND =", tuple(round(float(v), 4) for v in background.median(0).values.reshape(-1)))
    print("REFERENCE_H99, REFERENCE_E99 =", *(round(float(torch.quantile(hed[:, c], 0.99, dim=1).median()), 4)
                                            for c in (0, 1)))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Print the stain reference from the public PBC sample.")
    p.add_argument("--reference", type=Path, metavar="PBC_DIR", required=True)
    _reference(p.parse_args(argv).reference)


if __name__ == "__main__":
    main()
