"""Opening untrusted image files safely and turning them into model input.

Everything here is defensive: an operator's folder can hold truncated JPEGs,
renamed PDFs, 16-bit TIFFs or a decompression bomb, and none of them may crash
the app or exhaust memory.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import HemafedError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"})
JUNK_NAMES = frozenset({".ds_store", "thumbs.db", "desktop.ini", ".directory"})
TEXT_EXTENSIONS = frozenset({".txt", ".md", ".csv", ".json", ".log", ".xml", ".ini", ".yaml"})

# A 4k×4k microscope tile is 16 Mpx; anything past 50 Mpx is refused before decoding,
# so a crafted header cannot make us allocate gigabytes.
MAX_PIXELS = 50_000_000
MIN_SIDE = 16


class Reason:
    """Why a file was skipped (stable strings: they appear in JSON reports)."""

    EMPTY = "empty file"
    NOT_AN_IMAGE = "not an image"
    UNSUPPORTED = "unsupported file type"
    TRUNCATED = "truncated image"
    UNREADABLE = "unreadable"
    TOO_LARGE = "too large (possible decompression bomb)"
    TOO_SMALL = "too small"
    MISSING = "file not found"


class ImageRejected(HemafedError):
    """A file that cannot be used as an image; `reason` is one of `Reason`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def is_junk(path: Path) -> bool:
    name = path.name.lower()
    return (
        name in JUNK_NAMES
        or name.startswith("._")
        or path.suffix.lower() in TEXT_EXTENSIONS
    )


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


@dataclass(frozen=True)
class OpenedImage:
    image: Image.Image  # RGB, fully decoded
    conversion: str | None  # what was converted, e.g. "grayscale → RGB"


def open_rgb(path: str | os.PathLike[str]) -> OpenedImage:
    """Decode `path` into an RGB image or raise `ImageRejected` with the reason.

    The pixel count is checked from the header before any decoding.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageRejected(Reason.EMPTY)
    except FileNotFoundError as exc:
        raise ImageRejected(Reason.MISSING) from exc
    except OSError as exc:
        raise ImageRejected(Reason.UNREADABLE, exc.strerror or str(exc)) from exc
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > MAX_PIXELS:
                    raise ImageRejected(Reason.TOO_LARGE, f"{width}×{height} pixels")
                if min(width, height) < MIN_SIDE:
                    raise ImageRejected(Reason.TOO_SMALL, f"{width}×{height} pixels")
                img.load()
                return to_rgb(img)
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(Reason.TOO_LARGE, str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise ImageRejected(Reason.NOT_AN_IMAGE) from exc
    except PermissionError as exc:
        raise ImageRejected(Reason.UNREADABLE, "permission denied") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        message = str(exc)
        if "truncated" in message.lower() or "image file is truncated" in message:
            raise ImageRejected(Reason.TRUNCATED, message) from exc
        raise ImageRejected(Reason.UNREADABLE, message) from exc
    except Exception as exc:  # a decoder bug must not stop the scan
        raise ImageRejected(Reason.UNREADABLE, f"{type(exc).__name__}: {exc}") from exc


def to_rgb(img: Image.Image) -> OpenedImage:
    """Convert any PIL mode to 8-bit RGB, saying what was converted."""
    mode = img.mode
    if mode == "RGB":
        return OpenedImage(img.copy(), None)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr8 = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        gray = Image.fromarray(arr8, mode="L")
        return OpenedImage(gray.convert("RGB"), "16-bit → 8-bit RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min(initial=0)), float(arr.max(initial=1))
        arr8 = np.clip((arr - lo) / max(hi - lo, 1e-12) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return OpenedImage(Image.fromarray(arr8, "L").convert("RGB"), "float → 8-bit RGB")
    if mode in ("L", "1"):
        return OpenedImage(img.convert("RGB"), "grayscale → RGB")
    if mode == "CMYK":
        return OpenedImage(img.convert("RGB"), "CMYK → RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return OpenedImage(
            Image.alpha_composite(background, rgba).convert("RGB"), "alpha removed (on white)"
        )
    if mode == "P":
        return OpenedImage(img.convert("RGB"), "palette → RGB")
    return OpenedImage(img.convert("RGB"), f"{mode} → RGB")


# BloodMNIST (MedMNIST v2) was made from the PBC analyser's full-field 360×363 JPEGs by a
# 200×200 centre crop, then a resize to 28×28 (bloodmnist/PROVENANCE.md). A model trained on
# it has only seen the cell at that magnification, so a full-field image must be cropped the
# same way before resizing, or the cell arrives at 56 % of the size the model knows.
# The rule: an image whose short side is at least FULL_FIELD_MIN_SIDE pixels is a full-field
# capture and keeps the centre square of side round(short side × FULL_FIELD_CROP) (200 px of
# a 360-px PBC image, exactly BloodMNIST's crop); a smaller image is taken as already cropped
# (every MedMNIST release, 28 to 224 px, is) and keeps its whole centre square.
FULL_FIELD_CROP = 200 / 360
FULL_FIELD_MIN_SIDE = 300


def crop_side(width: int, height: int) -> int:
    """Side of the centre square `centre_crop_resize` keeps of a width×height image."""
    short = min(width, height)
    if short >= FULL_FIELD_MIN_SIDE:
        return max(1, round(short * FULL_FIELD_CROP))
    return short


def centre_crop_resize(img: Image.Image, size: int,
                       resample: Image.Resampling = Image.Resampling.BILINEAR) -> np.ndarray:
    """Centre-crop (see `crop_side`), resize to `size`×`size` (antialiased), as HxWx3 uint8.

    The offsets are floor((W − side)/2), floor((H − side)/2), as BloodMNIST's: for a
    360×363 PBC image that is rows 81..280 and columns 80..279."""
    width, height = img.size
    side = crop_side(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    if side != width or side != height:
        img = img.crop((left, top, left + side, top + side))
    if side != size:
        img = img.resize((size, size), resample, reducing_gap=None)
    return np.asarray(img, dtype=np.uint8).copy()


def array_to_rgb_uint8(images: np.ndarray) -> np.ndarray:
    """MedMNIST arrays come as (N,H,W) gray or (N,H,W,3) RGB; return (N,H,W,3) uint8."""
    if images.ndim == 3:
        images = np.repeat(images[..., None], 3, axis=-1)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected (N,H,W) or (N,H,W,3) images, got shape {images.shape}")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    if images.dtype != np.uint8:
        if np.issubdtype(images.dtype, np.floating) and images.max(initial=0) <= 1.0:
            images = images * 255.0
        images = np.clip(images, 0, 255).astype(np.uint8)
    return images


def resize_array_batch(images: np.ndarray, size: int,
                       resample: Image.Resampling = Image.Resampling.BILINEAR) -> np.ndarray:
    """Centre-crop and resize a (N,H,W,3) uint8 batch to `size` (no-op when it already fits)."""
    if images.shape[1] == size and images.shape[2] == size:
        return images
    return np.stack([centre_crop_resize(Image.fromarray(im), size, resample) for im in images])
