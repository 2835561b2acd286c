from __future__ import annotations

import csv
from pathlib import Path

from PIL import Image
from PySide6.QtCore import Qt

from hemafed.core.data.classes import BLOODMNIST_CLASSES

from .conftest import scan


def test_pbc_sample_shows_8_classes_of_25_and_no_problems(qtbot, window, pbc: Path) -> None:
    scan(qtbot, window, pbc)
    page, state = window.data_page, window.state
    assert state.scan.report.per_class == {c: 25 for c in BLOODMNIST_CLASSES}
    assert page.problems.rowCount() == 0
    assert "no problem files" in page.summary.text()
    assert page.model.rowCount() == 200
    # filter by class: 25 thumbnails, all of that class
    page.filter.setCurrentIndex(1 + BLOODMNIST_CLASSES.index("platelet"))
    assert page.model.rowCount() == 25
    assert {page.model.index(r).data(256 + 2) for r in range(25)} == {"platelet"}
    # thumbnails load lazily in a worker
    qtbot.waitUntil(lambda: not page.model.busy(), timeout=20_000)
    # click → large preview with name, original size and file size
    index = page.model.index(0)
    with qtbot.waitSignal(page.grid.clicked, timeout=1000):
        qtbot.mouseClick(page.grid.viewport(), Qt.MouseButton.LeftButton, pos=page.grid.visualRect(index).center())
    qtbot.waitUntil(lambda: "pixels" in page.preview_info.text(), timeout=10_000)
    name = page.model.index(0).data()
    assert name in page.preview_info.text() and "KB" in page.preview_info.text()
    with Image.open(next(pbc.glob(f"platelet/{name}"))) as img:
        assert f"{img.size[0]} × {img.size[1]} pixels" in page.preview_info.text()
    # the split the site will use (the driver's own function and the plan's fraction and seed)
    from hemafed.core.data.partition import stratified_split

    train, val = stratified_split(state.scan.labels, state.plan.val_fraction, seed=state.plan.seed)
    total_row = page.split_table.rowCount() - 1
    assert page.split_table.item(total_row, 1).text() == str(len(train))
    assert page.split_table.item(total_row, 2).text() == str(len(val))
    assert len(val) > 0 and len(train) + len(val) == 200


def test_bad_files_are_each_listed_and_exported(qtbot, window, pbc: Path, tmp_path: Path) -> None:
    root = tmp_path / "site"
    for cls in ("neutrophil", "platelet"):
        (root / cls).mkdir(parents=True)
        for src in sorted((pbc / cls).glob("*.jpg"))[:3]:
            (root / cls / src.name).write_bytes(src.read_bytes())
    (root / "neutrophil" / "empty.jpg").write_bytes(b"")
    (root / "neutrophil" / "report.pdf.png").write_bytes(b"%PDF-1.4 not an image")
    good = next((pbc / "platelet").glob("*.jpg")).read_bytes()
    (root / "platelet" / "cut.jpg").write_bytes(good[: len(good) // 3])
    (root / "platelet" / "scan.docx").write_bytes(b"PK\x03\x04")
    Image.new("L", (64, 64), 128).save(root / "platelet" / "gray.png")
    (root / "smudge_cells").mkdir()
    Image.new("RGB", (64, 64), (200, 150, 180)).save(root / "smudge_cells" / "s1.png")
    scan(qtbot, window, root)
    page = window.data_page
    rows = {page.problems.item(r, 0).text(): page.problems.item(r, 1).text()
            for r in range(page.problems.rowCount())}
    assert rows["neutrophil/empty.jpg"] == "empty file"
    assert rows["neutrophil/report.pdf.png"] == "not an image"
    assert rows["platelet/cut.jpg"] in ("truncated image", "unreadable")
    assert rows["platelet/scan.docx"] == "unsupported file type"
    assert rows["platelet/gray.png"] == "converted (used)"
    assert rows["smudge_cells"] == "unknown class folder (not used)"
    unknown = next(page.problems.item(r, 2).text() for r in range(page.problems.rowCount())
                   if page.problems.item(r, 0).text() == "smudge_cells")
    assert "rename the folder to one of: basophil, eosinophil" in unknown  # what to do, with the names
    assert "rename it" in page.summary.text()
    assert window.state.scan.report.total_valid == 7
    assert "4 file(s) cannot be used" in page.summary.text()
    # the split says what it keeps, as a count and a share, not only the plan's per-class fraction
    assert " of 7 (" in page.split_note.text() and "rounded class by class" in page.split_note.text()
    out = tmp_path / "problems.csv"
    assert page.export_problems(out) == 6
    with out.open() as fh:
        exported = list(csv.reader(fh))
    assert exported[0] == ["file", "problem", "detail"]
    assert {r[0] for r in exported[1:]} == set(rows)


def test_missing_folder_is_said_in_words(qtbot, window, tmp_path: Path) -> None:
    window.data_page.start_scan(str(tmp_path / "unplugged-drive"))
    assert "does not exist" in window.data_page.summary.text()
    assert window.data_page.job is None


def test_cancel_stops_a_scan(qtbot, window, pbc: Path) -> None:
    page = window.data_page
    page.start_scan(str(pbc))
    job = page.job
    page.cancel_scan()
    qtbot.waitUntil(lambda: page.job is None, timeout=30_000)
    assert job.cancelled()
    assert window.state.scan is None
    assert "cancelled" in page.summary.text()


def test_a_16_bit_png_is_previewed_with_its_contrast_not_blank_white(qtbot, tmp_path) -> None:
    """Qt and PIL's plain convert("RGB") clip 16-bit samples to white; the app shows what training sees."""
    import numpy as np
    from PIL import Image

    from hemafed.gui.app.thumbnails import thumbnail_image

    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    path = tmp_path / "cell16.png"
    Image.fromarray(ramp).save(path)  # mode I;16
    image = thumbnail_image(path)
    pixels = [image.pixelColor(x, y).red() for x in (2, 40, 80) for y in (2, 40, 80)]
    assert max(pixels) - min(pixels) > 100 and min(pixels) < 60  # a dark-to-light ramp, not a white square


def test_images_unlike_the_federations_are_pointed_out_with_a_model(qtbot, window, tmp_path: Path) -> None:
    """With a previous federation's model file (one with the cell check), the scan lists the images the check does
    not recognise as a single blood cell; they stay usable."""
    import numpy as np

    from tests.test_cell_check import cell_check_model, cells

    root = tmp_path / "site"
    for k, cls in enumerate(("neutrophil", "platelet")):
        (root / cls).mkdir(parents=True)
        for i, img in enumerate(cells(6, 20 + k)):
            Image.fromarray(img).save(root / cls / f"cell{i}.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 80, 3), dtype=np.uint8)).save(
        root / "platelet" / "noise.png")
    window.state.set_model(cell_check_model(tmp_path / "final.npz"))
    scan(qtbot, window, root)
    page = window.data_page
    assert window.state.scan.report.total_valid == 13  # still used
    assert [Path(name).name for name, _ in window.state.scan.unlike] == ["noise.png"]
    assert "look unlike the federation's images" in page.summary.text()
    rows = [page.problems.item(r, 1).text() for r in range(page.problems.rowCount())]
    assert rows == ["looks unlike the federation's images (used)"]
    assert page.tabs.tabText(2) == "Problems (1)"
