from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hemafed.core.learning.classify import ModelFileError, load_model_file, prepare_image
from hemafed.core.learning.models import images_to_tensor


def expected_prediction(model_file: Path, image: Path) -> np.ndarray:
    """The model's own forward pass on the training preprocessing, done by hand."""
    model = load_model_file(model_file)
    pixels, _, _ = prepare_image(image, model.input_size)
    with torch.no_grad():
        return torch.softmax(model.model(images_to_tensor(pixels[None], model.input_size)), 1)[0].numpy()


def test_classify_panel_gives_the_models_prediction_on_pbc_jpegs(qtbot, window, pbc: Path, model_file: Path):
    panel = window.results_page.classify_panel
    files = [sorted((pbc / c).glob("*.jpg"))[0] for c in ("neutrophil", "platelet", "lymphocyte")]
    assert not panel.classify([str(f) for f in files])  # no model yet: said, not crashed
    assert "No model yet" in panel.status.text()
    window.state.set_model(model_file)
    qtbot.waitUntil(lambda: window.results_page.job is None, timeout=60_000)
    with qtbot.waitSignal(panel.classified, timeout=60_000) as blocker:
        assert panel.classify([str(f) for f in files])
    report = blocker.args[0]
    assert panel.table.rowCount() == 3
    for row, (file, pred) in enumerate(zip(files, report.predictions, strict=True)):
        probs = expected_prediction(model_file, file)
        got = np.array([pred.probabilities[c] for c in load_model_file(model_file).classes])
        np.testing.assert_allclose(got, probs, rtol=1e-5, atol=1e-6)
        assert pred.predicted == load_model_file(model_file).classes[int(np.argmax(probs))]
        assert panel.table.item(row, 1).text() == pred.predicted
        assert pred.original_size == (360, 363) or min(pred.original_size) > 100  # full-size microscope JPEG
    assert "not a diagnostic device" in " ".join(
        w.text() for w in panel.findChildren(type(panel.status)))
    # the model's confusion matrix on this site's validation split is shown once data is known
    assert "cnn4_28" in window.results_page.model_label.text()


def test_classify_command_json_and_accuracy_per_class(pbc: Path, model_file: Path, tmp_path: Path, capsys):
    from hemafed.gui.cli import main

    folder = tmp_path / "mixed"
    for cls in ("eosinophil", "monocyte"):
        (folder / cls).mkdir(parents=True)
        for src in sorted((pbc / cls).glob("*.jpg"))[:2]:
            (folder / cls / src.name).write_bytes(src.read_bytes())
    (folder / "monocyte" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    loose = sorted((pbc / "basophil").glob("*.jpg"))[0]
    assert main(["classify", "--model", str(model_file), str(folder), str(loose), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    files = {Path(f["path"]).name: f for f in out["files"]}
    assert files["broken.jpg"]["error"].startswith(("not an image", "truncated", "unreadable"))
    one = files[loose.name]
    probs = expected_prediction(model_file, loose)
    assert one["true_class"] == "basophil"
    assert abs(sum(one["probabilities"].values()) - 1) < 1e-5
    assert one["predicted"] == max(one["probabilities"], key=one["probabilities"].get)
    np.testing.assert_allclose(list(one["probabilities"].values()), probs, rtol=1e-5, atol=1e-6)
    per_class = out["accuracy_per_class"]
    assert set(per_class) == {"basophil", "eosinophil", "monocyte"}
    assert per_class["eosinophil"]["images"] == 2 and per_class["monocyte"]["images"] == 2
    for name, row in per_class.items():
        hits = sum(1 for f in out["files"] if f.get("true_class") == name and f.get("predicted") == name)
        assert row["correct"] == hits


def test_bad_model_file_is_refused_in_words(tmp_path: Path) -> None:
    bad = tmp_path / "model.npz"
    np.savez(bad, weights=np.zeros(3, np.float32))
    with pytest.raises(ModelFileError, match="not a hemafed model file"):
        load_model_file(bad)
    with pytest.raises(ModelFileError, match="no such model file"):
        load_model_file(tmp_path / "nope.npz")


def test_hemafed_alone_without_a_display_prints_usage(monkeypatch, capsys) -> None:
    from hemafed.gui import cli

    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert not cli._on_a_desktop()
    assert cli.main([]) == 2
    assert "gui" in capsys.readouterr().out
    monkeypatch.setenv("DISPLAY", ":0")
    assert cli._on_a_desktop()  # PySide6 is installed here: a desktop opens the app
