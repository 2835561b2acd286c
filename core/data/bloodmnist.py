"""Finding BloodMNIST: an explicit local copy, the development data, or the official
MedMNIST file downloaded once into the user cache and checked against its MD5."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import FatalError
from ..npz_lock import open_npz
from ..paths import cache_dir, dev_data_dir
from .imaging import array_to_rgb_uint8

log = logging.getLogger(__name__)

OFFICIAL_URL = "https://zenodo.org/records/10519652/files/bloodmnist.npz?download=1"
OFFICIAL_MD5 = "7053d0359d879ad8a5505303e11de1dc"
OFFICIAL_NAME = "bloodmnist.npz"
LOCAL_NAMES = ("bloodmnist/bloodmnist_28.npz", "bloodmnist_28.npz", "bloodmnist/bloodmnist.npz",
               "bloodmnist.npz")
# MedMNIST+ (MedMNIST v3) publishes the same images at 64 px: its info.py's url_64 and MD5_64
OFFICIAL_64 = ("https://zenodo.org/records/10519652/files/bloodmnist_64.npz?download=1",
               "2b94928a2ae4916078ca51e05b6b800b", "bloodmnist_64.npz")
SPLITS = ("train", "val", "test")


class DatasetUnavailable(FatalError, RuntimeError):
    """BloodMNIST could not be found locally nor downloaded."""


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def locate(data: str | os.PathLike[str] | None = None, *, download: bool = True, size: int = 28) -> Path:
    """Path of a BloodMNIST `.npz`, at `size` pixels (28 or 64) where a folder offers a choice.

    `data` (a file, or a folder holding one) or `HEMAFED_DATA_DIR` win and are used
    as given: a local rebuild has a different checksum and is accepted when named
    explicitly. Otherwise the official file is taken from the cache, or downloaded.
    A folder without the `size`-pixel file falls back to the 28-pixel one (a site resizes what it holds).
    """
    if size not in (28, 64):
        raise ValueError(f"BloodMNIST is published at 28 or 64 px here, not {size}")
    names = (f"bloodmnist/bloodmnist_{size}.npz", f"bloodmnist_{size}.npz", *LOCAL_NAMES) if size != 28 else LOCAL_NAMES
    for base in [Path(data)] if data is not None else _env_candidates():
        if base.is_file():
            return base
        for name in names:
            if (base / name).is_file():
                return base / name
        if data is not None:
            raise DatasetUnavailable(f"no BloodMNIST .npz at {base}")
    url, md5, name = (OFFICIAL_URL, OFFICIAL_MD5, OFFICIAL_NAME) if size == 28 else OFFICIAL_64
    cached = cache_dir() / name
    if cached.is_file() and md5sum(cached) == md5:
        return cached
    if not download:
        raise DatasetUnavailable("BloodMNIST not found; pass --data or set HEMAFED_DATA_DIR")
    return download_official(cached, url, md5)


def _env_candidates() -> list[Path]:
    found = dev_data_dir()
    return [found] if found is not None else []


def download_official(target: Path, url: str = OFFICIAL_URL, md5: str = OFFICIAL_MD5) -> Path:
    """Download to a temporary file beside `target`, check the MD5, then rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading BloodMNIST from %s", url)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            while block := resp.read(1 << 20):
                out.write(block)
        got = md5sum(tmp)
        if got != md5:
            raise DatasetUnavailable(f"downloaded file has MD5 {got}, expected {md5}")
        os.replace(tmp, target)
    except OSError as exc:
        raise DatasetUnavailable(f"could not download BloodMNIST ({exc}); "
                                 "pass --data or set HEMAFED_DATA_DIR to a local copy") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return target


@dataclass
class Split:
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64


def load_splits(path: Path) -> dict[str, Split]:
    """All three splits of a MedMNIST-layout file."""
    out: dict[str, Split] = {}
    with open_npz(path) as data:
        for split in SPLITS:
            images = array_to_rgb_uint8(np.asarray(data[f"{split}_images"]))
            labels = np.asarray(data[f"{split}_labels"]).reshape(-1).astype(np.int64)
            out[split] = Split(images, labels)
    return out
