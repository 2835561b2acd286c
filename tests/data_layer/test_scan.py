"""The scan report on generated files of every problem kind, and on the real PBC sample."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hemafed.core.data.imaging import MAX_PIXELS, Reason
from hemafed.core.data.scan import scan_source


def _rgb(size: tuple[int, int] = (40, 36), value: int = 120) -> Image.Image:
    rng = np.random.default_rng(value)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _png_with_claimed_size(path: Path, width: int, height: int) -> None:
    """A tiny PNG whose header claims `width`×`height`: decoding it would need gigabytes."""
    raw = bytearray()
    _rgb((20, 20)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    raw += data
    path.write_bytes(bytes(raw))


@pytest.fixture()
def messy_site(tmp_path: Path) -> Path:
    root = tmp_path / "site"
    for cls in ("basophil", "Eosinophil", "platelet"):
        (root / cls).mkdir(parents=True)
    _rgb().save(root / "basophil" / "good1.JPG", format="JPEG")
    _rgb((360, 363)).save(root / "basophil" / "good2.png")
    (root / "basophil" / "nested" / "deeper").mkdir(parents=True)
    _rgb().save(root / "basophil" / "nested" / "deeper" / "good3.tif", format="TIFF")
    _rgb().save(root / "Eosinophil" / "good4.bmp", format="BMP")
    # conversions
    Image.new("L", (30, 30), 90).save(root / "Eosinophil" / "gray.png")
    Image.fromarray(np.full((30, 30), 40000, dtype=np.uint16)).save(root / "Eosinophil" / "deep16.png")
    Image.new("CMYK", (30, 30), (10, 20, 30, 0)).save(root / "platelet" / "cmyk.jpg", format="JPEG")
    Image.new("RGBA", (30, 30), (10, 20, 30, 128)).save(root / "platelet" / "alpha.png")
    # problems
    (root / "platelet" / "empty.png").write_bytes(b"")
    (root / "platelet" / "renamed.jpg").write_bytes(b"%PDF-1.4 definitely not a jpeg" * 10)
    full = root / "basophil" / "good1.JPG"
    (root / "platelet" / "truncated.jpg").write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    _png_with_claimed_size(root / "platelet" / "bomb.png", 30000, 30000)
    _rgb((8, 8)).save(root / "platelet" / "tiny.png")
    (root / "platelet" / "scan.gif").write_bytes(b"GIF89a")
    # junk and unknown classes
    (root / ".DS_Store").write_bytes(b"\0\0")
    (root / "basophil" / "Thumbs.db").write_bytes(b"\0")
    (root / "basophil" / "notes.txt").write_text("microscope 3")
    (root / "README.md").write_text("site data")
    (root / "smudge_cells").mkdir()
    _rgb().save(root / "smudge_cells" / "x.png")
    return root


def test_every_problem_kind_is_reported_and_skipped(messy_site: Path) -> None:
    report = scan_source(messy_site).report
    reasons = {Path(p.path).name: p.reason for p in report.problems}
    assert reasons == {
        "empty.png": Reason.EMPTY,
        "renamed.jpg": Reason.NOT_AN_IMAGE,
        "truncated.jpg": Reason.TRUNCATED,
        "bomb.png": Reason.TOO_LARGE,
        "tiny.png": Reason.TOO_SMALL,
        "scan.gif": Reason.UNSUPPORTED,
    }
    assert report.per_class["basophil"] == 3
    assert report.per_class["eosinophil"] == 3
    assert report.per_class["platelet"] == 2
    assert report.total_valid == 8
    conversions = {Path(c.path).name: c.conversion for c in report.converted}
    assert set(conversions) == {"gray.png", "deep16.png", "cmyk.jpg", "alpha.png"}
    assert "16-bit" in conversions["deep16.png"]
    assert "CMYK" in conversions["cmyk.jpg"]
    assert "alpha" in conversions["alpha.png"]
    assert report.unknown_classes == {"smudge_cells": 1}
    assert sorted(Path(p).name for p in report.ignored) == [".DS_Store", "README.md", "Thumbs.db", "notes.txt"]


def test_scan_with_size_keeps_preprocessed_pixels(messy_site: Path) -> None:
    site = scan_source(messy_site, size=28)
    assert site.images.shape == (8, 28, 28, 3)
    assert site.images.dtype == np.uint8
    assert sorted(np.bincount(site.labels, minlength=8).tolist()) == sorted([3, 3, 2, 0, 0, 0, 0, 0])
    # the 16-bit image at 40000/65535 becomes mid-gray, not saturated
    report = site.report
    idx = [i for i, c in enumerate(report.converted) if "deep16" in c.path]
    assert idx


def test_sixteen_bit_scaled_not_clipped(tmp_path: Path) -> None:
    root = tmp_path / "s" / "ig"
    root.mkdir(parents=True)
    Image.fromarray(np.full((20, 20), 32768, dtype=np.uint16)).save(root / "a.png")
    site = scan_source(tmp_path / "s", size=20)
    assert abs(int(site.images[0, 5, 5, 0]) - 128) <= 1


def test_bomb_is_refused_before_decoding(tmp_path: Path) -> None:
    """The header check fires before PIL allocates the 900-Mpx canvas."""
    root = tmp_path / "s" / "ig"
    root.mkdir(parents=True)
    _png_with_claimed_size(root / "huge.png", 30000, 30000)
    assert MAX_PIXELS < 30000 * 30000
    report = scan_source(tmp_path / "s", size=28).report
    assert [p.reason for p in report.problems] == [Reason.TOO_LARGE]


def test_csv_manifest(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        _rgb(value=i).save(tmp_path / "imgs" / f"{i}.png")
    (tmp_path / "manifest.csv").write_text(
        "path,label\nimgs/0.png,lymphocyte\nimgs/1.png,4\nimgs/2.png,Monocyte\n"
        "imgs/missing.png,ig\nimgs/0.png,megakaryocyte\nbroken-row\n"
    )
    site = scan_source(tmp_path / "manifest.csv", size=28)
    rep = site.report
    assert rep.kind == "csv"
    assert rep.per_class["lymphocyte"] == 2 and rep.per_class["monocyte"] == 1
    assert rep.unknown_classes == {"megakaryocyte": 1}
    assert {p.reason for p in rep.problems} == {Reason.MISSING, "malformed manifest row"}
    assert site.images.shape == (3, 28, 28, 3)


def test_npz_source_gray_and_rgb(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = np.array([[0], [1], [1], [9]])
    np.savez(tmp_path / "gray.npz", train_images=rng.integers(0, 255, (4, 28, 28), dtype=np.uint8),
             train_labels=labels)
    site = scan_source(tmp_path / "gray.npz", size=64)
    assert site.images.shape == (3, 64, 64, 3)
    assert site.report.per_class["eosinophil"] == 2
    assert site.report.unknown_classes == {"9": 1}
    with pytest.raises(ValueError, match="train_images"):
        np.savez(tmp_path / "bad.npz", x=np.zeros(3))
        scan_source(tmp_path / "bad.npz")


def test_report_json_has_documented_keys(messy_site: Path) -> None:
    data = json.loads(scan_source(messy_site).report.to_json())
    assert {"total_valid", "per_class", "problems", "unknown_classes", "converted", "ignored"} <= set(data)
    assert data["total_valid"] == 8
    assert all({"path", "reason"} <= set(p) for p in data["problems"])


def test_corrupt_pixel_data_is_unreadable(tmp_path: Path) -> None:
    root = tmp_path / "s" / "ig"
    root.mkdir(parents=True)
    _rgb((64, 64)).save(root / "ok.png")
    data = bytearray((root / "ok.png").read_bytes())
    idat = data.index(b"IDAT") + 8
    data[idat : idat + 200] = bytes(200)  # zeroed zlib stream, same length
    (root / "bad.png").write_bytes(bytes(data))
    (root.parent / "loose.png").write_bytes((root / "ok.png").read_bytes())
    report = scan_source(tmp_path / "s").report
    got = {Path(p.path).name: p.reason for p in report.problems}
    assert got["bad.png"] in (Reason.UNREADABLE, Reason.TRUNCATED)
    assert got["loose.png"] == "not in a class folder"
    assert report.total_valid == 1


@pytest.mark.realdata
def test_real_pbc_sample(shared_data: Path) -> None:
    site = scan_source(shared_data / "pbc_sample", size=28)
    report = site.report
    assert report.total_valid == 200
    assert set(report.per_class.values()) == {25}
    assert report.problems == []
    assert report.unknown_classes == {}
    assert site.images.shape == (200, 28, 28, 3)
    # full-size microscope images: a stained cell is darker than the background on average
    assert 60 < site.images.mean() < 230


def test_full_field_image_gets_bloodmnist_crop() -> None:
    """A 360×363 analyser image keeps rows 81..280, columns 80..279 (BloodMNIST's 200×200
    crop); a 64×64 or 224×224 image (already cropped, like every MedMNIST release) keeps
    its whole square."""
    from hemafed.core.data.imaging import centre_crop_resize, crop_side

    assert crop_side(360, 363) == 200
    assert crop_side(224, 224) == 224
    assert crop_side(64, 70) == 64
    # 360 wide, 363 high; the crop window is white, everything outside it black
    arr = np.zeros((363, 360, 3), np.uint8)
    arr[81:281, 80:280] = 255
    out = centre_crop_resize(Image.fromarray(arr), 28)
    assert out.shape == (28, 28, 3)
    assert out.min() == 255  # nothing from outside the window
    # the old full-square crop would have kept the black frame
    small = np.zeros((224, 224, 3), np.uint8)
    small[50:174, 50:174] = 255
    kept = centre_crop_resize(Image.fromarray(small), 28)
    assert kept[0, 0].max() == 0 and kept[14, 14].min() == 255


@pytest.mark.realdata
@pytest.mark.parametrize("size", [28, 64])
def test_pbc_jpegs_preprocess_like_bloodmnist(shared_data: Path, size: int) -> None:
    """Scanning the real full-size PBC JPEGs at 28 or 64 px gives the BloodMNIST arrays of the same images
    (bloodmnist_index.csv maps each file to its test index; bloodmnist_64.npz holds the same images in the same
    order) to within resampling rounding; without the 200/360 crop they differ by tens of grey levels."""
    import csv

    from hemafed.core.data.bloodmnist import load_splits, locate

    with open(shared_data / "bloodmnist" / "bloodmnist_index.csv", newline="") as fh:
        index = {Path(r["pbc_source_path"]).name: int(r["index"])
                 for r in csv.DictReader(fh) if r["split"] == "test"}
    npz = shared_data / "bloodmnist" / f"bloodmnist_{size}.npz"
    if not npz.exists():
        pytest.skip(f"{npz.name} is not in the shared data")
    test = load_splits(locate(npz))["test"].images
    assert test.shape[1:] == (size, size, 3)
    files: list[str] = []
    site = scan_source(shared_data / "pbc_sample", size=size, on_usable=lambda f, _: files.append(f.name))
    reference = np.stack([test[index[name]] for name in files]).astype(float)
    diff = np.abs(site.images.astype(float) - reference).mean(axis=(1, 2, 3))
    assert diff.mean() < 1.0, diff.mean()
    assert diff.max() < 4.0, diff.max()
