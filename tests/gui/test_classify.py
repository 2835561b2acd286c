from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PySide6.QtCore import Qt

from hemafed.core.learning.classify import ModelFileError, load_model_file, percent, prepare_image
from hemafed.core.learning.models import images_to_tensor


def expected_prediction(model_file: Path, image: Path) -> np.ndarray:
    """The model's own forward pass on the training preprocessing, done by hand."""
    model = load_model_file(model_file)
    pixels, _, _ = prepare_image(image, model.input_size)
    with torch.no_grad():
        return torch.softmax(model.model(images_to_tensor(pixels[None], model.input_size)), 1)[0].numpy()


def test_classify_panel_gives_the_models_prediction_on_pbc_jpegs(qtbot, window, pbc: Path, model_file: Path,
                                                                 tmp_path: Path):
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
        table_row = panel._row_of(row)
        assert panel.table.item(table_row, 3).text().split()[0] == pred.predicted
        assert pred.original_size == (360, 363) or min(pred.original_size) > 100  # full-size microscope JPEG
        assert not panel.table.item(table_row, 0).icon().isNull()  # a thumbnail of the image
        assert panel.table.item(table_row, 2).text() == file.parent.name  # the class its folder names
        assert "100" not in panel.table.item(table_row, 4).text()
    # sorting by probability orders the rows by the number, and the selection still finds its image
    panel.table.sortItems(4, Qt.SortOrder.DescendingOrder)
    shown = [panel.prediction_at(r) for r in range(3)]
    assert [max(p.probabilities.values()) for p in shown] == sorted(
        (max(p.probabilities.values()) for p in report.predictions), reverse=True)
    panel.table.selectRow(2)
    assert panel.prediction_at(2) is shown[2]
    out = tmp_path / "predictions.csv"
    panel.export_csv(out)
    rows = list(csv.DictReader(out.open()))
    assert [r["file"] for r in rows] == [str(f) for f in files]
    for r, pred in zip(rows, report.predictions, strict=True):
        assert r["predicted"] == pred.predicted and r["class folder"] == Path(r["file"]).parent.name
        assert abs(float(r["p(" + pred.predicted + ")"]) - pred.probabilities[pred.predicted]) < 1e-9
    assert "not a diagnostic device" in " ".join(
        w.text() for w in panel.findChildren(type(panel.status)))
    # the model's confusion matrix on this site's validation split is shown once data is known
    assert "cnn4_28" in window.results_page.model_label.text()


def _class_folders(pbc: Path, folder: Path, classes: tuple[str, ...], per_class: int) -> Path:
    """`folder` with a sub-folder per class holding its first `per_class` PBC sample JPEGs."""
    for cls in classes:
        (folder / cls).mkdir(parents=True)
        for src in sorted((pbc / cls).glob("*.jpg"))[:per_class]:
            (folder / cls / src.name).write_bytes(src.read_bytes())
    return folder


def test_classify_command_json_and_accuracy_per_class(pbc: Path, model_file: Path, tmp_path: Path, capsys):
    from hemafed.gui.cli import main

    folder = _class_folders(pbc, tmp_path / "mixed", ("eosinophil", "monocyte"), 2)
    (folder / "monocyte" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    loose = sorted((pbc / "basophil").glob("*.jpg"))[0]
    table = tmp_path / "out.csv"
    assert main(["classify", "--model", str(model_file), str(folder), str(loose), "--json", "--csv", str(table)]) == 0
    out = json.loads(capsys.readouterr().out)
    written = {Path(r["file"]).name: r for r in csv.DictReader(table.open())}
    assert set(written) == {Path(f["path"]).name for f in out["files"]}
    assert written["broken.jpg"]["problem"] and not written["broken.jpg"]["predicted"]
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


def test_classify_text_ends_with_each_class_and_all_of_them(pbc: Path, model_file: Path, tmp_path: Path, capsys):
    from hemafed.gui.cli import main

    folder = _class_folders(pbc, tmp_path / "labelled", ("eosinophil", "platelet"), 3)
    assert main(["classify", "--model", str(model_file), str(folder)]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = lines[lines.index(next(line for line in lines if line.startswith("class"))) + 1:]
    rows = {line.split()[0]: [int(line.split()[1]), int(line.split()[2])] for line in table}
    assert set(rows) == {"eosinophil", "platelet", "all"}
    assert rows["all"] == [6, rows["eosinophil"][1] + rows["platelet"][1]]


def test_bad_model_file_is_refused_in_words(tmp_path: Path) -> None:
    bad = tmp_path / "model.npz"
    np.savez(bad, weights=np.zeros(3, np.float32))
    with pytest.raises(ModelFileError, match="not a hemafed model file"):
        load_model_file(bad)
    with pytest.raises(ModelFileError, match="no such model file"):
        load_model_file(tmp_path / "nope.npz")


def test_a_model_file_of_another_layout_is_refused_in_words(model_file: Path, tmp_path: Path) -> None:
    arrays = dict(np.load(model_file, allow_pickle=False))
    arrays["weights"] = np.concatenate([arrays["weights"], np.zeros(944, arrays["weights"].dtype)])
    other = tmp_path / "older.npz"
    np.savez(other, **arrays)
    with pytest.raises(ModelFileError, match="another version of hemafed"):
        load_model_file(other)


def test_hemafed_alone_without_a_display_prints_usage(monkeypatch, capsys) -> None:
    from hemafed.gui import cli

    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert not cli._on_a_desktop()
    assert cli.main([]) == 2
    assert "gui" in capsys.readouterr().out
    monkeypatch.setenv("DISPLAY", ":0")
    assert cli._on_a_desktop()  # PySide6 is installed here: a desktop opens the app


def test_a_probability_is_never_shown_as_certain() -> None:
    assert percent(0.998) == "99.8%"
    assert percent(0.99996) == ">99.9%" and percent(1.0) == ">99.9%"
    assert percent(0.00004) == "<0.1%" and percent(0.0) == "<0.1%"
    assert percent(0.5) == "50.0%"


def test_classify_can_be_cancelled_and_keeps_what_was_shown(qtbot, window, pbc: Path, model_file: Path) -> None:
    panel = window.results_page.classify_panel
    window.state.set_model(model_file)
    qtbot.waitUntil(lambda: window.results_page.job is None, timeout=60_000)
    assert panel.classify([str(pbc)])
    assert panel.progress_row.isVisibleTo(panel) and panel.cancel_btn.isEnabled()
    panel.cancel()
    qtbot.waitUntil(lambda: panel.job is None, timeout=60_000)
    assert not panel.progress_row.isVisibleTo(panel)
    assert "Cancelled" in panel.status.text() and panel.table.rowCount() == 0
    assert panel.open_btn.isEnabled()


def test_an_image_that_is_not_a_cell_is_shown_as_not_recognised(qtbot, window, tmp_path: Path) -> None:
    from PIL import Image

    from tests.test_cell_check import cell_check_model, cells

    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (90, 90, 3), dtype=np.uint8)).save(folder / "noise.png")
    Image.fromarray(cells(1, 9)[0]).save(folder / "cell.png")
    window.state.set_model(cell_check_model(tmp_path / "final.npz"))
    qtbot.waitUntil(lambda: window.results_page.job is None, timeout=60_000)
    panel = window.results_page.classify_panel
    with qtbot.waitSignal(panel.classified, timeout=60_000) as blocker:
        assert panel.classify([str(folder / "noise.png"), str(folder / "cell.png")])
    noise, cell = blocker.args[0].predictions
    assert noise.out_of_distribution and not cell.out_of_distribution
    row = panel._row_of(0)
    assert panel.table.item(row, 3).text().startswith("not recognised")
    assert panel.table.item(row, 4).text() == "—"  # no class's probability for an image that is not a cell
    assert "not recognised" in panel.table.item(row, 3).toolTip()
    assert "1 not recognised as a single blood cell" in panel.status.text()
    panel.table.selectRow(row)
    assert "no class" in panel.probs.text()
    out = tmp_path / "predictions.csv"
    panel.export_csv(out)
    rows = {Path(r["file"]).name: r for r in csv.DictReader(out.open())}
    assert rows["noise.png"]["not recognised"] == "yes" and rows["noise.png"]["predicted"] == ""
    assert rows["cell.png"]["not recognised"] == "no" and rows["cell.png"]["predicted"]


def test_an_operator_adapts_a_copy_of_the_model_to_labelled_images_of_their_own(qtbot, window, pbc: Path,
                                                                                 model_file: Path, tmp_path: Path):
    from hemafed.core.learning.confidence import Calibration
    from hemafed.network.site import save_model_file

    page = window.results_page
    with np.load(model_file) as data:
        weights = data["weights"]
    old = load_model_file(model_file)
    plan_like = type("Plan", (), {"model": old.name, "classes": old.classes, "input_size": old.input_size,
                                  "federation_id": "gui-test"})
    theirs = save_model_file(tmp_path / "federation.npz", weights, plan_like, 2, Calibration.federation_only(
        1.4, federation_classes=[100] * len(old.classes)))
    before = theirs.read_bytes()
    window.state.set_model(theirs)
    qtbot.waitUntil(lambda: page.job is None and "federation gui-test" in page.model_label.text(), timeout=60_000)
    assert page.adapt_btn.isEnabled()
    ours = tmp_path / "ours.npz"
    assert page.adapt(pbc, ours)
    qtbot.waitUntil(lambda: "Adapted on" in page.model_label.text(), timeout=120_000)
    qtbot.waitUntil(lambda: page.job is None, timeout=60_000)
    text = page.model_label.text()
    assert "Adapted on 200 labelled images" in text and "ours.npz" in text and "lass scores" in text
    assert "Caution: only 200 labelled images" in text
    assert window.state.model_path == ours and theirs.read_bytes() == before
    cal = load_model_file(ours).calibration
    assert cal.images == 200 and cal.temperature == 1.4 and cal.threshold is not None

    # a file that cannot be adapted says so instead of offering it
    window.state.set_model(model_file)
    qtbot.waitUntil(lambda: page.job is None and str(model_file) in page.model_label.text(), timeout=60_000)
    assert not page.adapt_btn.isEnabled()


def test_the_sites_confusion_matrix_answers_as_the_model_file_does(pbc: Path, model_file: Path, tmp_path: Path):
    from hemafed.core.learning.confidence import Calibration
    from hemafed.gui.app.results_page import site_validation_confusion
    from hemafed.network.site import save_model_file

    _, plain = site_validation_confusion(model_file, str(pbc), 0.2, 0)
    assert plain.sum() == 40 and (plain.sum(axis=1) > 0).all()  # 5 of each class's 25 images
    old = load_model_file(model_file)
    offsets = [0.0] * len(old.classes)
    offsets[2] = 40.0  # this file's hospital shifts every answer to one class
    cal = Calibration(temperature=1.0, threshold=0.5, coverage_target=0.95, images=100, ece_before=None,
                      ece_after=None, nll_before=None, nll_after=None, class_offsets=tuple(offsets))
    plan_like = type("Plan", (), {"model": old.name, "classes": old.classes, "input_size": old.input_size,
                                  "federation_id": "gui-test"})
    with np.load(model_file) as data:
        shifted = save_model_file(tmp_path / "ours.npz", data["weights"], plan_like, 2, cal)
    _, confusion = site_validation_confusion(shifted, str(pbc), 0.2, 0)
    assert (confusion.sum(axis=1) == plain.sum(axis=1)).all() and confusion[:, 2].sum() == 40


def test_the_status_says_class_scores_were_adjusted_only_when_they_were(qtbot, window, tmp_path: Path) -> None:
    from hemafed.core.learning.classify import ClassifyReport, Prediction

    panel = window.results_page.classify_panel
    pred = Prediction(str(tmp_path / "a.png"), "basophil")
    pred.probabilities = {"basophil": 0.9, "ig": 0.1}
    declined = "class scores as the federation released them: re-fitted to this hospital's 80 labelled images, " \
               "they did not predict held-out ones better (loss 0.1 → 0.1)"
    panel.show_report(ClassifyReport("m", [pred], [], class_scores=declined), ["basophil", "ig"])
    assert "adjusted" not in panel.status.text()
    panel.show_report(ClassifyReport("m", [pred], [], class_scores="class scores re-fitted …",
                                     class_offsets_applied=True), ["basophil", "ig"])
    assert "class scores adjusted to this hospital's images" in panel.status.text()
