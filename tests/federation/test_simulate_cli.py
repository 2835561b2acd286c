"""`hemafed simulate` end to end: separate processes, real TLS, a site killed mid-round."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def _small_bloodmnist(path: Path) -> Path:
    rng = np.random.default_rng(1)
    arrays = {}
    for split, n in (("train", 480), ("val", 40), ("test", 160)):
        labels = np.arange(n) % 8
        images = rng.integers(0, 255, (n, 28, 28, 3), dtype=np.uint8)
        images[..., 1] = (labels * 30)[:, None, None]
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels.reshape(-1, 1)
    np.savez(path, **arrays)
    return path


def test_simulate_with_a_site_killed_during_unmasking(tmp_path: Path) -> None:
    data = _small_bloodmnist(tmp_path / "bloodmnist.npz")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "hemafed.gui.cli", "simulate", "--sites", "3", "--rounds", "2",
           "--threshold", "2", "--model", "cnn4_28", "--batch-size", "16", "--lr", "0.1", "--epsilon", "20",
           "--data", str(data), "--out", str(out), "--drop", "3@1:unmask", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    first, second = metrics["rounds"]
    assert first["status"] == "completed" and first["survivors"] == ["hospital_01", "hospital_02", "hospital_03"]
    assert second["status"] == "completed" and second["participants"] == ["hospital_01", "hospital_02"]
    assert 0 < metrics["final"]["max_epsilon"] <= 20
    for name in ("report.md", "accuracy.png", "epsilon.png", "final_model.npz"):
        assert (out / name).stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "ε = 20" in report and "threshold t = 2" in report
    # the killed site's process really exited with the simulated-crash status
    assert "simulated crash at round 1, stage unmask" in (out / "sites" / "hospital_03" / "site.log").read_text()
    assert all(r["bytes"] for r in metrics["rounds"])
