from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from hemafed.core.data import bloodmnist
from hemafed.gui.cli import main


def _fake_npz(path: Path, n: int = 40) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, k in (("train", n), ("val", n // 4), ("test", n // 4)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (k, 28, 28, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(k) % 8).reshape(-1, 1).astype(np.uint8)
    np.savez(path, **arrays)
    return path


def test_explicit_local_copy_is_used_as_given(tmp_path: Path) -> None:
    npz = _fake_npz(tmp_path / "bloodmnist_28.npz")
    assert bloodmnist.locate(npz) == npz
    assert bloodmnist.locate(tmp_path) == npz
    with pytest.raises(bloodmnist.DatasetUnavailable):
        bloodmnist.locate(tmp_path / "nowhere")


def test_a_folder_gives_the_64_px_file_when_asked_and_the_28_px_one_otherwise(tmp_path: Path) -> None:
    """A 64-px model's simulation takes bloodmnist_64.npz from a data folder (MedMNIST+ layout); a folder with
    only the 28-px file still serves it (the sites resize), and 28 px is the default."""
    (tmp_path / "bloodmnist").mkdir()
    npz28 = _fake_npz(tmp_path / "bloodmnist" / "bloodmnist_28.npz")
    assert bloodmnist.locate(tmp_path, size=64) == npz28
    npz64 = _fake_npz(tmp_path / "bloodmnist" / "bloodmnist_64.npz")
    assert bloodmnist.locate(tmp_path, size=64) == npz64
    assert bloodmnist.locate(tmp_path) == npz28
    with pytest.raises(ValueError, match="28 or 64"):
        bloodmnist.locate(tmp_path, size=32)


def test_download_verifies_md5_and_caches(tmp_path: Path) -> None:
    """The real download code path, fed from a file:// URL so no network is touched."""
    src = _fake_npz(tmp_path / "official.npz")
    md5 = hashlib.md5(src.read_bytes()).hexdigest()
    target = tmp_path / "cache" / "bloodmnist.npz"
    got = bloodmnist.download_official(target, url=src.as_uri(), md5=md5)
    assert got == target and target.read_bytes() == src.read_bytes()
    with pytest.raises(bloodmnist.DatasetUnavailable, match="MD5"):
        bloodmnist.download_official(tmp_path / "cache" / "other.npz", url=src.as_uri(), md5="0" * 32)
    assert not (tmp_path / "cache" / "other.npz").exists()
    assert not list((tmp_path / "cache").glob("*.part"))


def test_cached_official_file_found_without_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HEMAFED_DATA_DIR", raising=False)
    monkeypatch.setattr(bloodmnist, "dev_data_dir", lambda: None)
    monkeypatch.setenv("HEMAFED_CACHE_DIR", str(tmp_path))
    with pytest.raises(bloodmnist.DatasetUnavailable):
        bloodmnist.locate(download=False)
    npz = _fake_npz(tmp_path / "bloodmnist.npz")
    monkeypatch.setattr(bloodmnist, "OFFICIAL_MD5", hashlib.md5(npz.read_bytes()).hexdigest())
    assert bloodmnist.locate(download=False) == npz
    with pytest.raises(bloodmnist.DatasetUnavailable):  # the 64-px file is another download, checked on its own
        bloodmnist.locate(download=False, size=64)
    npz64 = _fake_npz(tmp_path / "bloodmnist_64.npz")
    url, _, name = bloodmnist.OFFICIAL_64
    monkeypatch.setattr(bloodmnist, "OFFICIAL_64", (url, hashlib.md5(npz64.read_bytes()).hexdigest(), name))
    assert bloodmnist.locate(download=False, size=64) == npz64


def test_demo_data_cli_writes_site_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    npz = _fake_npz(tmp_path / "b.npz", n=400)
    out = tmp_path / "sites"
    assert main(["demo-data", "--sites", "4", "--partition", "dirichlet:0.5", "--seed", "0",
                 "--out", str(out), "--data", str(npz)]) == 0
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert folders == ["hospital_01", "hospital_02", "hospital_03", "hospital_04"]
    total = sum(1 for _ in out.rglob("*.png"))
    assert total == 400
    meta = json.loads((out / "partition.json").read_text())
    assert sum(sum(v) for v in meta["sites"].values()) == 400
    assert "hospital_01" in capsys.readouterr().out
    # a written hospital folder scans clean
    assert main(["scan", str(out / "hospital_01"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["total_valid"] == sum(meta["sites"]["hospital_01"]) and report["problems"] == []
    # refuses to write into a non-empty folder
    assert main(["demo-data", "--sites", "2", "--out", str(out), "--data", str(npz)]) == 1


@pytest.mark.realdata
@pytest.mark.slow
def test_demo_data_on_real_bloodmnist(shared_data: Path, tmp_path: Path) -> None:
    from hemafed.core.data.demo_data import write_demo_sites

    summary = write_demo_sites(tmp_path / "x", n_sites=10, scheme="dirichlet:0.5", seed=0,
                               data=shared_data / "bloodmnist" / "bloodmnist_28.npz")
    assert summary.counts.sum() == 11959
    totals = summary.counts.sum(1)
    assert len(set(totals.tolist())) == 10  # hospitals differ in size
    assert sum(1 for _ in (tmp_path / "x").rglob("*.png")) == 11959
